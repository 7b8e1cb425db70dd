"""The offline FID (fid_c10): the shipped classifier's feature space on real CIFAR-10.

Real test images must be far closer to the training set than blurred or noised training
images, and the distance must grow with the blur. N = 1000 images per set (reference: 1000
training images; degraded: 1000 other training images), so that the module runs in well
under a minute on one busy CPU thread.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from akod_ray.data.parquet import load_images, to_model_range
from akod_ray.errors import AkodError, CheckpointError
from akod_ray.evaluation import fid
from akod_ray.evaluation.feature_net import DEFAULT_WEIGHTS, C10FeatureNet, load_feature_net, weights_record
from ray_helpers import CIFAR_DIR as DATA

N = 1000


pytestmark = pytest.mark.usefixtures("torch_single_thread_module")  # one torch thread: a shared, busy CPU


def _save_random_net(path: Path, width: int = 8) -> Path:
    torch.manual_seed(0)
    net = C10FeatureNet(width)
    torch.save({"width": width, "state_dict": {k: v.half() if v.is_floating_point() else v
                                               for k, v in net.state_dict().items()}}, path)
    return path


# --------------------------------------------------------------------------- without the shipped weights


def test_feature_net_shapes_and_weight_file_errors(tmp_path):
    path = _save_random_net(tmp_path / "net.pt")
    net = load_feature_net(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert net.features(x).shape == (3, 64) and net(x).shape == (3, 10)
    assert len(net.weights_id) == 12 and not net.training
    with pytest.raises(CheckpointError, match="missing.pt.*do not exist.*train_classifier"):
        load_feature_net(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt.*corrupt"):
        load_feature_net(bad)


@pytest.mark.skipif(not (DATA / "train.parquet").is_file(), reason=f"CIFAR-10 Parquet copy not found at {DATA}")
def test_reference_stats_file_for_c10(tmp_path):
    weights = _save_random_net(tmp_path / "net.pt")
    out = tmp_path / "c10_ref.npz"
    stats = fid.compute_reference_stats(DATA, out, feature="c10", count=200, seed=3, weights=weights)
    back = fid.load_reference_stats(out)
    assert back.n == 200 and back.mu.shape == (64,) and back.sigma.shape == (64, 64)
    assert back.feature == "c10" and "64-d" in back.implementation
    assert "train.parquet" in back.source and "N=200" in back.source and "seed 3" in back.source
    np.testing.assert_allclose(back.sigma, stats.sigma)
    # The same images score 0 against their own statistics.
    same = load_images(DATA, "train", count=200, seed=3)
    result = fid.score(same, back, weights=weights)
    assert result.name == "fid_c10" and result.n == 200 and result.value == pytest.approx(0.0, abs=1e-6)
    # Statistics from other weights are another feature space: refused, never compared.
    other = _save_random_net(tmp_path / "other.pt", width=16)
    with pytest.raises(AkodError, match="different feature spaces"):
        fid.fid_c10(same, back, net=load_feature_net(other))
    inception_like = fid.FeatureStats(back.mu, back.sigma, back.n, "x", fid.IMPLEMENTATIONS["inception"])
    with pytest.raises(AkodError, match="fid_c10 needs fid_c10 reference statistics"):
        fid.fid_c10(same, inception_like, net=load_feature_net(weights))


# --------------------------------------------------------------------------- the shipped classifier on real data


needs_real = pytest.mark.skipif(
    not (DATA / "train.parquet").is_file() or not DEFAULT_WEIGHTS.is_file(),
    reason=f"needs the CIFAR-10 Parquet copy at {DATA} and the trained classifier at {DEFAULT_WEIGHTS}",
)


@pytest.fixture(scope="module")
def real_sets():
    """fid_c10 against the statistics of N training images (set A) of: N test images, and N other
    training images (set B, disjoint from A) blurred or noised, so that every set pays the same
    finite-sample bias."""
    net = load_feature_net()
    train = load_images(DATA, "train", count=2 * N, seed=1)
    a, b = train[0::2], to_model_range(train[1::2])
    test = load_images(DATA, "test", count=N, seed=2)
    ref = fid.statistics(fid.c10_activations(a, net), f"train A (N={N})", fid.c10_implementation(net))

    def score(images: torch.Tensor) -> float:
        return fid.fid_c10(images, ref, net=net)

    blur = {s: score(gaussian_blur(b, kernel_size=9, sigma=s)) for s in (0.5, 1.0, 2.0)}
    noise = score((b + 0.2 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    return {"test": score(test), "blur": blur, "noise": noise}


@needs_real
def test_real_test_set_is_far_closer_than_degraded_train(real_sets):
    # Measured (N = 1000): test 0.40; blur sigma 0.5 / 1 / 2: 0.69 / 8.3 / 20.6; noise std 0.2: 6.1.
    # (bench/fid_c10.py: test N = 10000 vs all 50000 training images: 0.03; the rest is finite-N bias.)
    d_test = real_sets["test"]
    assert 0 < d_test < 1.0, real_sets
    assert real_sets["blur"][1.0] > 5 * d_test, real_sets
    assert real_sets["noise"] > 5 * d_test, real_sets


@needs_real
def test_fid_c10_grows_with_blur(real_sets):
    b = real_sets["blur"]
    assert real_sets["test"] < b[0.5] < b[1.0] < b[2.0], real_sets


@needs_real
def test_shipped_weights_record():
    record = weights_record()
    assert record["test_accuracy"] >= 0.85, record["test_accuracy"]
    assert {"epochs", "seed", "command", "train_time_s"} <= set(record)
    assert DEFAULT_WEIGHTS.stat().st_size < 8_000_000
    assert record["sha256"] == hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    # The shipped training-set statistics belong to these weights (fid_c10 refuses any others).
    ref = fid.default_c10_reference()
    assert ref.n == 50_000 and ref.implementation == fid.c10_implementation()
