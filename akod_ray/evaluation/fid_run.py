"""FID of a model's samples, spread over a run's workers: the in-run evaluation (fid_c10, and Inception FID
where the pytorch-fid weights are present) and ``akod fid``.

Stages, per worker (``env``: rank r of W; a single process is rank 0 of 1):
  1. sample its share: chunks r, r + W, ... of the n images, each chunk from its own seeded generator
     (:func:`akod_ray.evaluation.sampling.sample_chunks`), so the images do not depend on W;
  2. features of each chunk, summed: N, sum f, sum f f^T (:class:`FeatureSums`, float64);
  3. the sums gathered from every worker and added; rank 0 turns them into (mu, Sigma) and the Frechet
     distance against the reference statistics:

         mu = sum f / N,    Sigma = (sum f f^T - N mu mu^T) / (N - 1)    (np.cov's unbiased estimate)

So n samples on W workers take about 1/W of the time, and W workers give the FID of one worker (the same
images; the sums differ only in the order of float64 additions).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from akod_ray import storage
from akod_ray.config import Config
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.errors import AkodError
from akod_ray.evaluation import fid as F
from akod_ray.evaluation.sampling import sample_chunks, sampling_record
from akod_ray.progress import progress

MIN_CHUNKS = 8  # a small evaluation still has a chunk for each of 8 workers
INCEPTION_REF_FILE = "fid_ref_inception.npz"  # where akod train / akod sweep keep the Inception reference


def chunk_size(n: int, batch_size: int = 256) -> int:
    """Images per chunk: a sampling batch, or fewer when n is small (a function of n only, never of W)."""
    return max(1, min(batch_size, math.ceil(n / MIN_CHUNKS)))


@dataclass
class FeatureSums:
    """N, sum of features [D] and sum of their outer products [D, D], in float64."""

    n: float
    s1: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> "FeatureSums":
        return cls(0.0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    def add(self, acts: np.ndarray) -> None:
        a = torch.as_tensor(acts, dtype=torch.float64)
        self.n += a.shape[0]
        self.s1 += a.sum(0)
        self.s2 += a.T @ a

    def flat(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.n], dtype=torch.float64), self.s1, self.s2.reshape(-1)])

    @classmethod
    def from_flat(cls, v: torch.Tensor, dim: int) -> "FeatureSums":
        v = v.double().cpu()
        return cls(v[0].item(), v[1:1 + dim].clone(), v[1 + dim:].reshape(dim, dim).clone())

    def statistics(self, source: str, implementation: str) -> F.FeatureStats:
        n = int(round(self.n))
        if n < 2:
            raise AkodError(f"FID needs at least 2 samples, got {n}")
        mu = self.s1 / n
        sigma = (self.s2 - n * torch.outer(mu, mu)) / (n - 1)
        return F.FeatureStats(mu.numpy(), ((sigma + sigma.T) / 2).numpy(), n, source, implementation)


class SingleProcess:
    """The WorkerEnv of one process (``akod fid``): rank 0 of 1."""

    rank, world_size = 0, 1

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _dim_and_implementation(feature: str, weights, device) -> tuple[int, str]:
    if feature == "inception":
        return F.INCEPTION_DIM, F.IMPLEMENTATIONS["inception"]
    net = F._cached_feature_net(str(weights) if weights is not None else None, str(device))
    return net.feature_dim, F.c10_implementation(net)


def sample_fid(cfg: Config, model, process: DiffusionProcess, n: int, seed: int, env, refs: dict[str, F.FeatureStats],
               weights: str | Path | None = None, progress_desc: str | None = None,
               **overrides) -> dict[str, F.FIDResult]:
    """FID against each reference of ``refs`` (feature -> statistics) of ``n`` samples drawn with ``seed``, this
    worker's share sampled here (module docstring). Rank 0 gets {feature: FIDResult}; other ranks get {}.
    ``overrides``: sampler, steps, eta, grid (default: the run's eval config); ``progress_desc``: show the
    progress of a single process under that name."""
    device = env.device
    dims = {f: _dim_and_implementation(f, weights, device) for f in refs}
    sums = {f: FeatureSums.zeros(dims[f][0]) for f in refs}
    chunk = chunk_size(n)
    with progress(progress_desc if env.world_size == 1 else None, n) as bar:
        for _, images in sample_chunks(cfg, model, process, n, seed, device, chunk=chunk, rank=env.rank,
                                       world_size=env.world_size, **overrides):
            for f in refs:
                sums[f].add(F.activations(images.float(), f, weights, device=device)[0])
            bar.update(images.shape[0])
    record = sampling_record(cfg, process.T, sampler=overrides.get("sampler"), steps=overrides.get("steps"),
                             grid=overrides.get("grid"))
    out = {}
    for f, ref in refs.items():
        dim, implementation = dims[f]
        total = env.gather(sums[f].flat()[None].to(device)).double().cpu().sum(0)
        if env.rank != 0:
            continue
        stats = FeatureSums.from_flat(total, dim).statistics("samples", implementation)
        out[f] = F.FIDResult(F.frechet_distance(stats, ref), F.METRIC_NAMES[f], stats.n, ref.n, ref.source,
                             ref.implementation, sampling=record)
    return out


def in_run_references(cfg: Config) -> dict[str, F.FeatureStats]:
    """The references an in-run evaluation scores against: the shipped fid_c10 statistics, and the Inception
    statistics of ``eval.inception_ref`` when ``eval.fid`` asks for Inception FID (the driver sets the file
    only where the weights are present). Empty without the fid_c10 classifier's statistics: the training
    loop's progress line reads fid_c10."""
    try:
        refs = {"c10": F.default_c10_reference()}
    except AkodError:
        return {}
    if cfg.eval.fid != "c10" and cfg.eval.inception_ref:
        refs["inception"] = F.load_reference_stats(cfg.eval.inception_ref)
    return refs


def evaluate_in_run(cfg: Config, model, process: DiffusionProcess, env, step: int) -> dict:
    """The in-run FID record at ``step`` (rank 0; {} elsewhere, or without the fid_c10 classifier):
    fid_c10 with its N and how the images were sampled, and ``fid`` / ``fid_n`` (Inception) when asked for.
    The samples: eval.fid_samples of them, seed train.seed * 7919 + step (``akod fid --seed`` repeats them)."""
    refs = in_run_references(cfg)
    if not refs:
        return {}
    results = sample_fid(cfg, model, process, cfg.eval.fid_samples, cfg.train.seed * 7919 + step, env, refs)
    if not results:
        return {}
    c10 = results["c10"]
    out = {"fid_c10": c10.value, "fid_c10_n": c10.n, "fid_c10_sampler": c10.sampling["sampler"],
           "fid_c10_nfe": c10.sampling["nfe"], "fid_c10_grid": c10.sampling["sampling_grid"]}
    if "inception" in results:
        out.update(fid=results["inception"].value, fid_n=results["inception"].n)
    return out


# --------------------------------------------------------------------------- the driver's part


def inception_weights_note(cfg: Config) -> str | None:
    """None when ``eval.fid`` does not ask for Inception FID or the weights are present; else the one line
    that says Inception FID is left out."""
    if cfg.eval.fid == "c10":
        return None
    try:
        F.inception_weights_path()
    except AkodError:
        from pytorch_fid.inception import FID_WEIGHTS_URL

        cache = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
        return (f"[akod] Inception FID: no pytorch-fid weights ({F.WEIGHTS_ENV} is not set and {str(cache)!r} "
                f"does not exist); runs record fid_c10 only")
    return None


def prepare_inception_reference(cfg: Config, data_dir: str | Path | None, folder: str | Path, out=print) -> Config:
    """``cfg`` with ``eval.inception_ref`` set where its runs should record Inception FID (``eval.fid`` asks
    for it and the weights are present): the file given, checked, or ``folder/fid_ref_inception.npz``,
    computed once from the run's training images. Without the weights: prints one line and returns ``cfg``."""
    note = inception_weights_note(cfg)
    if cfg.eval.fid == "c10" or note is not None:
        if note is not None:
            out(note, flush=True)
        return cfg
    if cfg.eval.inception_ref:
        F.check_reference(F.load_reference_stats(cfg.eval.inception_ref), cfg.eval.inception_ref)
        return cfg
    path = storage.location(folder) / INCEPTION_REF_FILE
    if not storage.is_file(path):
        from akod_ray.data.sources import load_training_data

        images = load_training_data(cfg, data_dir).train
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out(f"[akod] Inception FID: reference statistics of the {len(images):,} training images -> {path}", flush=True)
        source = f"{cfg.data.source} training images ({'all' if cfg.data.train_subset is None else cfg.data.train_subset}, "\
                 f"seed {cfg.data.seed}, N={len(images)})"
        F.image_stats(images, "inception", source, device=device, progress_desc="Inception reference features").save(path)
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, inception_ref=str(path)))
