"""FID stages: statistics, the Frechet distance (closed forms, scipy reference), reference
statistics files, and the Inception pipeline with the real architecture and random weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from pytorch_fid.inception import FID_WEIGHTS_URL

from akod_ray.errors import AkodError, DataError
from akod_ray.evaluation import fid
from akod_ray.evaluation.fid import FeatureStats, frechet_distance, statistics
from inception_helpers import standin_inception_weights

INCEPTION = fid.IMPLEMENTATIONS["inception"]


pytestmark = pytest.mark.usefixtures("torch_single_thread_module")  # one torch thread: a shared, busy CPU


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def scipy_reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), straight from the definition."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------- Frechet distance


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    sigma = _spd(rng, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    d = frechet_distance(FeatureStats(mu1, sigma, 100, implementation=INCEPTION),
                         FeatureStats(mu2, sigma, 100, implementation=INCEPTION))
    assert d == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-7, abs=1e-9)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(1)
    s = statistics(rng.normal(size=(300, 10)), implementation=INCEPTION)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-8)


def test_scaled_isotropic_gaussians_closed_form():
    # N(0, a^2 I) vs N(0, b^2 I) in D dims: d^2 = D (a - b)^2.
    d = frechet_distance(FeatureStats(np.zeros(5), 4.0 * np.eye(5), 10, implementation=INCEPTION),
                         FeatureStats(np.zeros(5), 1.0 * np.eye(5), 10, implementation=INCEPTION))
    assert d == pytest.approx(5 * (2.0 - 1.0) ** 2, rel=1e-9)


def test_agrees_with_scipy_sqrtm_reference():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = 0.7 * rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.3
    ours = frechet_distance(statistics(a, implementation=INCEPTION), statistics(b, implementation=INCEPTION))
    ref = scipy_reference_fid(a, b)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)


def test_statistics_are_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    s = statistics(x, "src", INCEPTION)
    assert s.n == 3
    np.testing.assert_allclose(s.mu, [2.0, 4.0])
    np.testing.assert_allclose(s.sigma, [[4.0, 7.0], [7.0, 13.0]])
    with pytest.raises(ValueError, match="N >= 2"):
        statistics(x[:1])


def test_different_feature_spaces_refuse_comparison():
    rng = np.random.default_rng(3)
    a = statistics(rng.normal(size=(50, 4)), implementation=INCEPTION)
    b = statistics(rng.normal(size=(50, 4)), implementation=fid.IMPLEMENTATIONS["c10"] + " (4-d)")
    with pytest.raises(AkodError, match="different feature spaces"):
        frechet_distance(a, b)


# --------------------------------------------------------------------------- reference statistics files


def test_reference_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    s = statistics(rng.normal(size=(20, 6)), "cifar10/train.parquet (all, N=20)", INCEPTION)
    path = s.save(tmp_path / "ref.npz")
    back = fid.load_reference_stats(path)
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert (back.n, back.source, back.implementation, back.feature) == (20, s.source, INCEPTION, "inception")
    assert not list(tmp_path.glob("*.tmp"))


def test_reference_stats_missing_and_corrupt_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="nope.npz.*do not exist"):
        fid.load_reference_stats(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz at all")
    with pytest.raises(DataError, match="garbage.npz.*corrupt"):
        fid.load_reference_stats(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=np.zeros(3))
    with pytest.raises(DataError, match="partial.npz.*corrupt"):
        fid.load_reference_stats(partial)
    bad_shape = tmp_path / "shape.npz"
    np.savez(bad_shape, mu=np.zeros(3), sigma=np.eye(4), n=5, source="x", implementation=INCEPTION)
    with pytest.raises(DataError, match="shape.npz.*corrupt"):
        fid.load_reference_stats(bad_shape)
    truncated = tmp_path / "trunc.npz"
    good = statistics(np.random.default_rng(0).normal(size=(10, 3)), "x", INCEPTION).save(tmp_path / "good.npz")
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="trunc.npz.*corrupt"):
        fid.load_reference_stats(truncated)


def test_image_ranges():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    f = u8.float() / 127.5 - 1.0
    np.testing.assert_allclose(fid.to_unit_range(u8).flatten().numpy(), [0.0, 0.2, 1.0], atol=1e-7)
    np.testing.assert_allclose(fid.to_unit_range(f).flatten().numpy(), [0.0, 0.2, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fid.to_unit_range(f * 3)


# --------------------------------------------------------------------------- Inception pipeline


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """The real FID Inception architecture with seeded random weights, saved to a file, and loaded."""
    path = standin_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")
    return path, fid.build_inception(weights=path)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_inception_weights_file_is_loaded(random_inception):
    path, model = random_inception
    saved = torch.load(path, weights_only=True)
    # InceptionV3.blocks[0][0] is the trunk's Conv2d_1a_3x3.
    assert torch.equal(model.blocks[0][0].conv.weight, saved["Conv2d_1a_3x3.conv.weight"])
    assert not model.training


def test_inception_shapes_batching_and_resize(random_inception):
    _, model = random_inception
    x = _images(3)
    acts = fid.inception_activations(x, model, batch_size=3)
    assert acts.shape == (3, 2048) and acts.dtype == np.float64
    assert np.isfinite(acts).all() and acts.std() > 1e-3
    assert np.abs(acts[0] - acts[1]).max() > 1e-3  # different images, different features
    # Batching does not change the features.
    np.testing.assert_allclose(fid.inception_activations(x, model, batch_size=2), acts, rtol=1e-4, atol=1e-5)
    # 32x32 input is resized to 299 by pytorch-fid's own bilinear resize: feeding the image already
    # resized (as a [-1, 1] float, the model range) gives the same features.
    x299 = F.interpolate(x[:1].float() / 255.0, size=(299, 299), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(fid.inception_activations(x299 * 2 - 1, model), acts[:1], rtol=1e-4, atol=1e-5)


def test_inception_image_stats_name_n_and_implementation(random_inception, monkeypatch):
    path, _ = random_inception
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(path))
    ref = fid.image_stats(_images(3, seed=1), "inception", source="ref images", batch_size=3)
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048) and ref.n == 3
    assert (ref.implementation, ref.feature, ref.source) == (INCEPTION, "inception", "ref images")


def test_weights_path_flag_env_and_hub_cache(random_inception, tmp_path, monkeypatch):
    path, _ = random_inception
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    assert fid.inception_weights_path(path) == path
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(path))
    assert fid.inception_weights_path() == path
    other = tmp_path / "flag_wins.pth"
    other.write_bytes(b"")
    assert fid.inception_weights_path(other) == other  # the flag beats the environment
    monkeypatch.delenv(fid.WEIGHTS_ENV)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    cache.parent.mkdir(parents=True)
    cache.symlink_to(path)
    assert fid.inception_weights_path() == cache


def test_missing_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    with pytest.raises(AkodError) as info:
        fid.build_inception()
    msg = str(info.value)
    assert FID_WEIGHTS_URL in msg and fid.WEIGHTS_ENV in msg and "empty_torch_home" in msg and "fid_c10" in msg
    with pytest.raises(AkodError, match="nowhere.pth.*--inception-weights.*do not exist"):
        fid.build_inception(tmp_path / "nowhere.pth")
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "env_nowhere.pth"))
    with pytest.raises(AkodError, match=f"env_nowhere.pth.*{fid.WEIGHTS_ENV}"):
        fid.build_inception()


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(AkodError, match="bad.pth.*corrupt"):
        fid.build_inception(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(AkodError, match="wrong.pth.*not the FID Inception"):
        fid.build_inception(wrong)
