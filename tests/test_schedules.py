"""Fixed schedules against the papers' formulas, the one validator, and schedule files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import (
    MAX_BETA,
    cosine_betas,
    fixed_schedule,
    linear_betas,
    load_schedule,
    save_schedule,
    validate_betas,
)
from akod_ray.errors import ConfigError, DataError

T = 1000


# ----------------------------------------------------------------- reference formulas (plain math)


def ho_linear_beta(i: int, T: int = 1000) -> float:
    """Ho et al. 2020, Sec. 4: beta linear from 1e-4 to 0.02 over T = 1000 steps (0-based i)."""
    return 1e-4 + (0.02 - 1e-4) * i / (T - 1)


def nichol_abar(t: int, T: int = 1000, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), 1-based t."""
    f = lambda u: math.cos(((u / T + s) / (1 + s)) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


# ----------------------------------------------------------------- linear


def test_linear_betas_literal_golden_values():
    b = linear_betas(T)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-14)
    assert b[499].item() == pytest.approx(0.01004004004004004, rel=1e-14)  # 1e-4 + 499 * 0.0199 / 999
    assert b[999].item() == pytest.approx(0.02, rel=1e-14)


@pytest.mark.parametrize("i", [0, 1, 137, 499, 500, 998, 999])
def test_linear_betas_match_ho_formula(i):
    assert linear_betas(T)[i].item() == pytest.approx(ho_linear_beta(i), rel=1e-13, abs=0)


def test_linear_abar_matches_product_of_alphas():
    p = DiffusionProcess(fixed_schedule("linear", T))
    for i in (0, 10, 499, 999):
        expected = math.prod(1 - ho_linear_beta(j) for j in range(i + 1))
        assert p.abar[i].item() == pytest.approx(expected, rel=1e-12)
    # Literal: abar_T of the linear schedule (its log-SNR, -10.12, is about dko.logsnr_min's default).
    assert p.abar[-1].item() == pytest.approx(4.0358297653756754e-05, rel=1e-10)


def test_linear_betas_other_T_keep_the_scaled_endpoints():
    b = linear_betas(500)
    assert b[0].item() == pytest.approx(2e-4, rel=1e-14)
    assert b[-1].item() == pytest.approx(0.04, rel=1e-14)


# ----------------------------------------------------------------- cosine


@pytest.mark.parametrize("t", [1, 2, 250, 500, 750, 999])
def test_cosine_abar_matches_nichol_formula(t):
    p = DiffusionProcess(fixed_schedule("cosine", T))
    assert p.abar[t - 1].item() == pytest.approx(nichol_abar(t), rel=1e-10)


def test_cosine_abar_literal_golden_values():
    abar = DiffusionProcess(cosine_betas(T)).abar
    assert abar[0].item() == pytest.approx(0.999958715775178, rel=1e-12)  # t = 1
    assert abar[499].item() == pytest.approx(0.49384359044063775, rel=1e-12)  # t = 500
    assert abar[749].item() == pytest.approx(0.1442721023857358, rel=1e-12)  # t = 750


def test_cosine_betas_match_formula_and_are_clipped_at_0_999():
    b = cosine_betas(T)
    assert b.dtype == torch.float64 and b.shape == (T,)
    for t in (1, 100, 500, 998, 999):
        expected = min(1 - nichol_abar(t) / nichol_abar(t - 1), 0.999)
        assert b[t - 1].item() == pytest.approx(expected, rel=1e-10)
    # f(T) = cos^2(pi/2) = 0 would make beta_T = 1; the clip keeps it at 0.999, only there.
    assert b[-1].item() == MAX_BETA == 0.999
    assert (b[:-1] < MAX_BETA).all()


def test_fixed_schedule_rejects_unknown_names():
    with pytest.raises(ConfigError, match="diffusion.schedule"):
        fixed_schedule("quadratic", T)


# ----------------------------------------------------------------- validator


def test_validator_accepts_fixed_schedules_and_returns_them():
    for name in ("linear", "cosine"):
        b = fixed_schedule(name, T)
        assert validate_betas(b, T) is b


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.index_fill_(0, torch.tensor([3]), 0.0), r"beta_t must lie in \(0, 0.999\], got beta\[3\]"),
        (lambda b: b.index_fill_(0, torch.tensor([7]), -1e-3), r"beta\[7\]"),
        (lambda b: b.index_fill_(0, torch.tensor([9]), 0.9991), r"beta\[9\] = 0.9991"),
        (lambda b: b.index_fill_(0, torch.tensor([9]), 1.0), r"beta\[9\]"),
        (lambda b: b.index_fill_(0, torch.tensor([5]), float("nan")), "NaN or inf"),
        (lambda b: b.index_fill_(0, torch.tensor([5]), float("inf")), "NaN or inf"),
        # 1e-20 > 0, but 1 - 1e-20 == 1 in float64: abar stops decreasing.
        (lambda b: b.index_fill_(0, torch.tensor([4]), 1e-20), r"strictly decreasing, but abar\[4\] >= abar\[3\]"),
        # At the first step too: abar_0 == 1 would make log-SNR_0 infinite.
        (lambda b: b.index_fill_(0, torch.tensor([0]), 1e-20), r"strictly decreasing, but abar\[0\] >= 1"),
    ],
)
def test_validator_rejects_bad_values(mutate, message):
    b = mutate(linear_betas(T).clone())
    with pytest.raises(ValueError, match=message):
        validate_betas(b, T, name="my schedule")
    with pytest.raises(ValueError, match="my schedule"):
        validate_betas(b, T, name="my schedule")


def test_validator_rejects_wrong_dtype_and_shape():
    b = linear_betas(T)
    with pytest.raises(ValueError, match="float64"):
        validate_betas(b.float())
    with pytest.raises(ValueError, match=r"shape \[1000\], got \[999\]"):
        validate_betas(b[:-1], T)
    with pytest.raises(ValueError, match="shape"):
        validate_betas(b.reshape(10, 100))
    with pytest.raises(ValueError, match="shape"):
        validate_betas(torch.tensor(0.01, dtype=torch.float64))


def test_process_refuses_an_invalid_schedule():
    b = linear_betas(T).clone()
    b[0] = 0.0
    with pytest.raises(ValueError, match="beta"):
        DiffusionProcess(b)


# ----------------------------------------------------------------- schedule files


def test_schedule_file_round_trip_is_exact(tmp_path):
    b = cosine_betas(T)
    path = save_schedule(tmp_path / "sub" / "learned.json", b, source="test", step=3)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    data = json.loads(path.read_text())
    assert data["T"] == T and data["source"] == "test" and data["step"] == 3
    loaded = load_schedule(path, T)
    assert loaded.dtype == torch.float64
    assert torch.equal(loaded, b)
    assert torch.equal(load_schedule(path), b)


def test_save_schedule_refuses_an_invalid_schedule(tmp_path):
    b = linear_betas(T).clone()
    b[10] = 2.0
    with pytest.raises(ValueError):
        save_schedule(tmp_path / "bad.json", b)
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\x00\xff\xfe garbage",
        b'{"T": 3}',  # no betas
        b'[0.1, 0.2]',  # not a mapping
        b'{"betas": ["a", "b"]}',
        b'{"betas": [0.1, 0.0, 0.2]}',  # invalid schedule
        b'{"betas": [[0.1, 0.2]]}',  # wrong shape
        b"",
    ],
)
def test_corrupt_schedule_file_raises_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "corrupt.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match="corrupt.json"):
        load_schedule(path)


def test_schedule_file_of_the_wrong_length_raises_data_error(tmp_path):
    path = save_schedule(tmp_path / "s.json", linear_betas(T))
    with pytest.raises(DataError, match=r"s\.json.*shape \[500\]"):
        load_schedule(path, T=500)


def test_missing_or_unreadable_schedule_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.json.*does not exist"):
        load_schedule(tmp_path / "nope.json")
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(DataError, match="adir.json"):
        load_schedule(tmp_path / "adir.json")


# ----------------------------------------------------------------- anchors: edm and laplace (issue 16)


def test_anchor_schedules_are_the_quantiles_of_their_distribution_within_the_shared_endpoints():
    from scipy import stats

    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import anchor_logsnr, edm_betas, laplace_betas

    lmax, lmin, T = 9.21, -10.13, 1000
    for name, dist, betas in (("edm", stats.norm(2.4, 2.4), edm_betas(T, lmax, lmin)),
                              ("laplace", stats.laplace(0.0, 1.0), laplace_betas(T, lmax, lmin, 1.0))):
        lam = anchor_logsnr(name, T, lmax, lmin, 1.0)
        assert lam[0] == lmax and lam[-1] == lmin
        # step t sits at the quantile 1 - t / (T - 1) of the distribution truncated to [lmin, lmax]
        hi, lo = dist.cdf(lmax), dist.cdf(lmin)
        for t in (1, 100, 500, 900, 998):
            u = 1 - t / (T - 1)
            assert lam[t].item() == pytest.approx(dist.ppf(lo + u * (hi - lo)), abs=1e-6)
        # the process built from the betas has these log-SNRs (and hence this training distribution)
        torch.testing.assert_close(DiffusionProcess(betas).log_snr, lam, rtol=0, atol=1e-6)
    # a Laplace(0, 1) schedule puts half its steps within |log-SNR| < ln 2
    lam = anchor_logsnr("laplace", T, lmax, lmin, 1.0)
    assert ((lam.abs() < math.log(2)).double().mean().item()) == pytest.approx(0.5, abs=0.01)


def test_a_too_concentrated_laplace_schedule_is_refused_naming_the_scale():
    from akod_ray.config import load_config
    from akod_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^diffusion\.laplace_scale: the laplace schedule is invalid for "
                                          r"diffusion\.T=1000 .*beta_t must lie in \(0, 0\.999\]"):
        load_config(None, ["diffusion.schedule=laplace", "diffusion.laplace_scale=0.5"])
    assert load_config(None, ["diffusion.schedule=laplace", "diffusion.laplace_scale=0.75"]).diffusion.laplace_scale == 0.75


def test_the_laplace_centre_moves_the_quantiles_and_loc_0_is_the_old_schedule():
    """diffusion.laplace_loc (issue 22): step t sits at the quantile 1 - t / (T - 1) of Laplace(loc, scale)
    truncated to the shared endpoints; loc 0 gives exactly what callers without a centre got."""
    from scipy import stats

    from akod_ray.diffusion.schedules import anchor_betas, anchor_logsnr, laplace_betas

    lmax, lmin, T = 9.21, -10.13, 1000
    assert torch.equal(laplace_betas(T, lmax, lmin, 1.0), laplace_betas(T, lmax, lmin, 1.0, 0.0))
    assert torch.equal(anchor_betas("laplace", T, lmax, lmin, 0.75), laplace_betas(T, lmax, lmin, 0.75, 0.0))
    dist = stats.laplace(-1.5, 0.8)
    lam = anchor_logsnr("laplace", T, lmax, lmin, 0.8, -1.5)
    assert lam[0] == lmax and lam[-1] == lmin
    hi, lo = dist.cdf(lmax), dist.cdf(lmin)
    for t in (1, 100, 500, 900, 998):
        assert lam[t].item() == pytest.approx(dist.ppf(lo + (1 - t / (T - 1)) * (hi - lo)), abs=1e-6)
    assert lam.median().item() == pytest.approx(-1.5, abs=0.02)  # half the steps on either side of the centre


def test_a_laplace_centre_that_breaks_the_schedule_is_refused_naming_the_centre():
    from akod_ray.config import load_config
    from akod_ray.errors import ConfigError

    base = ["diffusion.schedule=laplace", "diffusion.laplace_scale=0.75"]
    with pytest.raises(ConfigError, match=r"^diffusion\.laplace_loc: the laplace schedule is invalid for diffusion\.T=1000 "
                                          r".*\(scale 0\.75, centre 2\): beta_t must lie in \(0, 0\.999\]"):
        load_config(None, [*base, "diffusion.laplace_loc=2"])
    with pytest.raises(ConfigError, match=r"^diffusion\.laplace_loc must be in \[-20, 20\]"):
        load_config(None, [*base, "diffusion.laplace_loc=25"])
    with pytest.raises(ConfigError, match=r"^diffusion\.laplace_loc must be 0 with diffusion\.schedule=akod"):
        load_config(None, ["diffusion.schedule=akod", "dko.prior=laplace", "diffusion.laplace_loc=0.5"])
    assert load_config(None, [*base, "diffusion.laplace_loc=-2"]).diffusion.laplace_loc == -2.0
