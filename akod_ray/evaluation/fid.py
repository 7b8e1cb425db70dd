"""FID in pure stages: images -> activations -> statistics (mu, sigma, N) -> Frechet distance.

Two feature spaces, never mixed:

- ``inception``: pytorch-fid's InceptionV3 (2048-d final average pool, the FID of Heusel
  et al. 2017 as the TensorFlow original computes it). Its weights come from the torch hub
  cache or from a file given by ``--inception-weights`` / ``AKOD_INCEPTION_WEIGHTS``; this
  module never downloads.
- ``c10``: the penultimate features of the project's CIFAR-10 classifier
  (:mod:`akod_ray.evaluation.feature_net`). The result is called ``fid_c10``, never "FID",
  and is not comparable with Inception FID.

Both use pytorch-fid's ``calculate_frechet_distance``:

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

which adds eps = 1e-6 to both diagonals when the product is singular and drops an
imaginary part of the matrix square root below 1e-3 (raising otherwise). Statistics carry
their sample count, source and implementation, so every number can be reported with them,
and statistics of different feature spaces refuse to be compared.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from akod_ray import storage
from akod_ray.errors import AkodError, DataError
from akod_ray.progress import progress

FEATURES = ("inception", "c10")
IMPLEMENTATIONS = {
    "inception": "pytorch-fid InceptionV3 pool3 (2048-d)",
    "c10": "akod_ray fid_c10 classifier features",
}
METRIC_NAMES = {"inception": "FID", "c10": "fid_c10"}
WEIGHTS_ENV = "AKOD_INCEPTION_WEIGHTS"
INCEPTION_DIM = 2048


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of a feature set: mean [D], covariance [D, D], sample count N."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    source: str = ""  # what the features came from, e.g. "/data/cifar10/train.parquet (all)"
    implementation: str = ""  # one of IMPLEMENTATIONS' values

    @property
    def feature(self) -> str:
        """'inception' or 'c10' (from the implementation)."""
        for key, name in IMPLEMENTATIONS.items():
            if self.implementation.startswith(name):
                return key
        raise AkodError(f"unknown FID implementation {self.implementation!r}")

    def save(self, path: str | Path) -> Path:
        """Write an .npz (mu, sigma, n, source, implementation), published whole (a folder or an object store)."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), source=np.str_(self.source),
                 implementation=np.str_(self.implementation))
        return storage.write_bytes(path, buf.getvalue())


def statistics(acts: np.ndarray, source: str = "", implementation: str = "") -> FeatureStats:
    """mu and the unbiased covariance (np.cov, as pytorch-fid) of activations [N, D], N >= 2."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"activations must be [N >= 2, D], got shape {list(acts.shape)}")
    return FeatureStats(acts.mean(axis=0), np.cov(acts, rowvar=False), int(acts.shape[0]), source, implementation)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """pytorch-fid's Frechet distance between two statistics of the same feature space."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    if a.implementation != b.implementation:
        raise AkodError(f"cannot compare statistics of different feature spaces: {a.implementation!r} vs {b.implementation!r}")
    if a.mu.shape != b.mu.shape:
        raise AkodError(f"statistics have different dimensions: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    with warnings.catch_warnings():
        # pytorch-fid 0.3.0 passes sqrtm(disp=False), deprecated since SciPy 1.16; the result is unchanged.
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        return float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def load_reference_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by :meth:`FeatureStats.save`; a missing or corrupt file is a DataError."""
    path = storage.location(path)
    if not storage.is_file(path):
        raise DataError(f"reference statistics {str(path)!r} do not exist; compute them with `akod fid stats`")
    try:
        with storage.local_copy(path) as local:
            z = np.load(local, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with z:
                stats = FeatureStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["n"]),
                                     str(z["source"]), str(z["implementation"]))
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as e:
        raise DataError(f"reference statistics {str(path)!r} are corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    d = stats.mu.shape
    if len(d) != 1 or stats.sigma.shape != (d[0], d[0]) or stats.n < 2:
        raise DataError(f"reference statistics {str(path)!r} are corrupt: mu {list(stats.mu.shape)}, "
                        f"sigma {list(stats.sigma.shape)}, n {stats.n}")
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
        raise DataError(f"reference statistics {str(path)!r} are corrupt: NaN or inf values")
    try:
        stats.feature
    except AkodError:
        raise DataError(f"reference statistics {str(path)!r} name an unknown implementation {stats.implementation!r}") from None
    return stats


def check_reference(ref: FeatureStats, path: str | Path, weights: str | Path | None = None) -> None:
    """Fail before sampling when ``ref`` cannot be compared with what this machine computes: fid_c10
    statistics of another classifier (another feature width or weights), or missing Inception weights."""
    if ref.feature == "inception":
        if ref.mu.shape[0] != INCEPTION_DIM:
            raise DataError(f"reference statistics {str(path)!r} are corrupt: Inception statistics are {INCEPTION_DIM}-d, "
                            f"these are {ref.mu.shape[0]}-d")
        inception_weights_path(weights)
        return
    current = c10_implementation(weights=weights)
    if ref.implementation != current:
        raise DataError(f"reference statistics {str(path)!r} were computed with {ref.implementation!r}, not with this "
                        f"installation's {current!r}; recompute them with `akod fid stats --feature c10`")


# --------------------------------------------------------------------------- images


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images [N, 3, H, W] -> float32 [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"float images must lie in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]")
    return ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- Inception


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """The Inception weights file: ``weights`` (a flag), then $AKOD_INCEPTION_WEIGHTS, then the torch hub cache."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    for origin, value in (("--inception-weights", weights), (WEIGHTS_ENV, os.environ.get(WEIGHTS_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise AkodError(f"Inception weights {str(path)!r} (from {origin}) do not exist")
            return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    if cached.is_file():
        return cached
    raise AkodError(
        f"FID Inception weights not found in the torch hub cache ({str(cached)!r}) and neither "
        f"--inception-weights nor {WEIGHTS_ENV} is set. On a connected machine download {FID_WEIGHTS_URL} "
        f"into {str(cached.parent)!r} (or $TORCH_HOME/hub/checkpoints), or set {WEIGHTS_ENV}=/path/to/"
        f"{cached.name}. Without Inception weights use the offline metric fid_c10 (not comparable with FID)."
    )


def fid_inception_architecture() -> torch.nn.Module:
    """pytorch-fid's FID Inception (``fid_inception_v3``) with random weights, built without downloading."""
    from pytorch_fid import inception as pfi

    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


def build_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3`` (2048-d block, resize to 299, normalize) with local weights, in eval mode."""
    from pytorch_fid import inception as pfi

    path = inception_weights_path(weights)
    from akod_ray.training.checkpoint import LOAD_ERRORS, load_plain, torch_load_error

    try:
        state = load_plain(path)
        net = fid_inception_architecture()
        net.load_state_dict(state)
    except LOAD_ERRORS as e:
        raise AkodError(f"Inception weights {str(path)!r} are corrupt or not the FID Inception: {torch_load_error(e)}") from None
    # InceptionV3 builds its trunk with fid_inception_v3(), which downloads; hand it ours instead.
    with mock.patch.object(pfi, "fid_inception_v3", lambda: net):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    return model.to(device).eval()


@functools.lru_cache(maxsize=1)
def _cached_inception(path: str, device: str) -> torch.nn.Module:
    return build_inception(path, device)


@torch.no_grad()
def inception_activations(images: torch.Tensor, model: torch.nn.Module, batch_size: int = 100,
                          device: str | torch.device = "cpu", progress_desc: str | None = None) -> np.ndarray:
    """[N, 2048] pool3 activations of uint8 or [-1, 1] images of any size (resized to 299 by InceptionV3);
    ``progress_desc``: show progress under that name."""
    out = []
    with progress(progress_desc, images.shape[0]) as bar:
        for i in range(0, images.shape[0], batch_size):
            x = to_unit_range(images[i:i + batch_size]).to(device)
            out.append(model(x)[0].squeeze(3).squeeze(2).double().cpu().numpy())
            bar.update(x.shape[0])
    return np.concatenate(out)


# --------------------------------------------------------------------------- fid_c10


@functools.lru_cache(maxsize=4)
def _cached_feature_net(path: str | None, device: str):
    from akod_ray.evaluation.feature_net import load_feature_net

    return load_feature_net(path, device)


@torch.no_grad()
def c10_activations(images: torch.Tensor, net: torch.nn.Module | None = None, batch_size: int = 500,
                    device: str | torch.device = "cpu", weights: str | Path | None = None,
                    progress_desc: str | None = None) -> np.ndarray:
    """[N, D] penultimate classifier features of uint8 or [-1, 1] 32x32 images (float32 inference)."""
    if net is None:
        net = _cached_feature_net(str(weights) if weights is not None else None, str(device))
    out = []
    with progress(progress_desc, images.shape[0]) as bar:
        for i in range(0, images.shape[0], batch_size):
            x = to_unit_range(images[i:i + batch_size]).to(device) * 2.0 - 1.0
            out.append(net.features(x.contiguous(memory_format=torch.channels_last)).double().cpu().numpy())
            bar.update(x.shape[0])
    return np.concatenate(out)


def default_c10_reference() -> FeatureStats:
    """The shipped fid_c10 statistics of the CIFAR-10 training set (all 50,000 images) under the shipped classifier."""
    from akod_ray.evaluation.feature_net import DEFAULT_C10_REFERENCE

    if not DEFAULT_C10_REFERENCE.is_file():
        raise DataError(f"fid_c10 reference statistics {str(DEFAULT_C10_REFERENCE)!r} do not exist; compute them with "
                        "`akod fid stats --feature c10` (compute_reference_stats(data_dir, out_npz, feature='c10'))")
    return load_reference_stats(DEFAULT_C10_REFERENCE)


def c10_implementation(net: torch.nn.Module | None = None, weights: str | Path | None = None) -> str:
    """The implementation string of fid_c10 statistics: it names the feature width and the weights."""
    if net is None:
        net = _cached_feature_net(str(weights) if weights is not None else None, "cpu")
    return f"{IMPLEMENTATIONS['c10']} ({net.feature_dim}-d, weights {net.weights_id})"


# --------------------------------------------------------------------------- end to end


def activations(images: torch.Tensor, feature: str = "inception", weights: str | Path | None = None,
                batch_size: int | None = None, device: str | torch.device = "cpu",
                progress_desc: str | None = None) -> tuple[np.ndarray, str]:
    """Activations of ``images`` in ``feature`` space and the implementation string.

    ``weights`` is the Inception weights file for ``inception``, the classifier file for ``c10``
    (None: the hub cache / AKOD_INCEPTION_WEIGHTS, or the shipped classifier).
    """
    if feature == "inception":
        model = _cached_inception(str(inception_weights_path(weights)), str(device))
        acts = inception_activations(images, model, batch_size or 100, device, progress_desc)
        return acts, IMPLEMENTATIONS["inception"]
    if feature == "c10":
        acts = c10_activations(images, batch_size=batch_size or 500, device=device, weights=weights,
                               progress_desc=progress_desc)
        return acts, c10_implementation(weights=weights)
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


def image_stats(images: torch.Tensor, feature: str = "inception", source: str = "",
                weights: str | Path | None = None, batch_size: int | None = None,
                device: str | torch.device = "cpu", progress_desc: str | None = None) -> FeatureStats:
    """Statistics of ``images`` (uint8 or [-1, 1]) in ``feature`` space."""
    acts, impl = activations(images, feature, weights, batch_size, device, progress_desc)
    return statistics(acts, source, impl)


def compute_reference_stats(data_dir: str | Path, out_npz: str | Path, feature: str = "inception",
                            count: int | None = None, split: str = "train", seed: int = 0,
                            weights: str | Path | None = None, batch_size: int | None = None,
                            device: str | torch.device = "cpu") -> FeatureStats:
    """Reference statistics of a Parquet dataset split (all of it, or a seeded subset of ``count``), cached as .npz."""
    from akod_ray.data.parquet import load_images

    if feature == "inception":
        inception_weights_path(weights)  # fail before decoding 50,000 images
    elif feature != "c10":
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    from akod_ray.storage import location

    data_dir = location(data_dir)  # a folder, or a bucket (AKOD_DATA_DIR=s3://...)
    images = load_images(data_dir, split, count=count, seed=seed)
    subset = "all" if count is None else f"seeded subset of {count}, seed {seed}"
    source = f"{(data_dir / f'{split}.parquet').resolve()} ({subset}, N={images.shape[0]})"
    stats = image_stats(images, feature, source, weights, batch_size, device,
                        progress_desc=f"{METRIC_NAMES[feature]} reference features")
    stats.save(out_npz)
    return stats


@dataclass(frozen=True)
class FIDResult:
    """A Frechet distance with everything needed to report it."""

    value: float
    name: str  # "FID" or "fid_c10"
    n: int  # samples evaluated
    ref_n: int
    ref_source: str
    implementation: str
    sampling: dict | None = None  # what was sampled (evaluation.sampling.sampling_record), when known

    def __str__(self) -> str:
        from akod_ray.evaluation.sampling import describe_sampling

        how = f"; sampled with {describe_sampling(self.sampling)}" if self.sampling else ""
        return (f"{self.name} = {self.value:.3f} (N = {self.n} samples vs reference N = {self.ref_n}, "
                f"{self.ref_source}; {self.implementation}{how})")

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "n": self.n, "ref_n": self.ref_n,
                "ref_source": self.ref_source, "implementation": self.implementation, "sampling": self.sampling}


def score(images: torch.Tensor, ref: FeatureStats, weights: str | Path | None = None,
          batch_size: int | None = None, device: str | torch.device = "cpu") -> FIDResult:
    """FID or fid_c10 of ``images`` against ``ref``, in ``ref``'s feature space."""
    feature = ref.feature
    stats = image_stats(images, feature, "samples", weights, batch_size, device)
    value = frechet_distance(stats, ref)
    return FIDResult(value, METRIC_NAMES[feature], stats.n, ref.n, ref.source, ref.implementation)


def fid_c10(images: torch.Tensor, ref_stats: FeatureStats, net: torch.nn.Module | None = None,
            batch_size: int = 500, device: str | torch.device = "cpu", progress_desc: str | None = None) -> float:
    """The offline FID: the Frechet distance in the classifier's feature space (not comparable with FID)."""
    if ref_stats.feature != "c10":
        raise AkodError(f"fid_c10 needs fid_c10 reference statistics, got {ref_stats.implementation!r}")
    acts = c10_activations(images, net, batch_size, device, progress_desc=progress_desc)
    return frechet_distance(statistics(acts, "samples", c10_implementation(net)), ref_stats)


def fid_from_checkpoint(checkpoint: str | Path, ref_stats: str | Path, n: int = 10_000, seed: int = 0,
                        sampler: str | None = None, steps: int | None = None, eta: float | None = None,
                        weights: str | Path | None = None, device: str | torch.device = "cpu",
                        grid: str | None = None) -> FIDResult:
    """Sample ``n`` images from a checkpoint's EMA model (sampler, steps, eta and sampling grid default
    to its eval config) and score them against the reference statistics file (FID or fid_c10, by the file).
    The samples are those of an in-run evaluation with the same seed (:func:`akod_ray.evaluation.fid_run.sample_fid`)."""
    from akod_ray.evaluation.fid_run import SingleProcess, sample_fid
    from akod_ray.evaluation.sampling import check_sampling
    from akod_ray.training.checkpoint import load_for_sampling

    ref = load_reference_stats(ref_stats)
    check_reference(ref, ref_stats, weights)
    model, process, cfg = load_for_sampling(checkpoint, device)
    check_sampling(cfg, process, sampler=sampler, steps=steps, grid=grid)
    results = sample_fid(cfg, model, process, n, seed, SingleProcess(device), {ref.feature: ref}, weights=weights,
                         progress_desc="fid samples", sampler=sampler, steps=steps, eta=eta, grid=grid)
    return results[ref.feature]
