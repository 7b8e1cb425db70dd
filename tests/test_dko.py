"""DKO building blocks (version 3): sigma_local against closed forms, the bins of the prior's steps, the
policy's distribution and its floor, the exported schedule, and the Wasserstein-1 distance between
distributions over noise levels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from akod_ray.diffusion.dko import (
    DKO,
    OBS_DIM,
    DKOContext,
    DKOPolicy,
    NoiseBins,
    bin_probs,
    floor_problem,
    gaussian_kernel,
    learned_schedule,
    local_variance,
    local_variance_map,
    log_sigma_local,
    marginal_probs,
    observations,
    quantile_schedule,
    uniform_logsnr_betas,
    w1_logsnr,
)
from akod_ray.config import DKOConfig
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import anchor_logsnr, validate_betas

LMAX, LMIN = 9.21, -10.13
KERNELS = (3, 5, 7, 9, 11)


def gaussian_1d(k: int) -> list[float]:
    """OpenCV's rule, by hand: sigma = 0.3 ((k - 1) / 2 - 1) + 0.8, normalized."""
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    g = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(k)]
    return [v / sum(g) for v in g]


# ----------------------------------------------------------------- Gaussian kernel


@pytest.mark.parametrize("k", KERNELS)
def test_gaussian_kernel_is_normalized_symmetric_and_separable(k):
    G = gaussian_kernel(k)
    assert G.shape == (k, k) and G.dtype == torch.float64
    assert G.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert (G > 0).all()
    assert torch.equal(G, G.T) and torch.equal(G, G.flip(0)) and torch.equal(G, G.flip(1))
    assert G[k // 2, k // 2] == G.max()
    g = torch.tensor(gaussian_1d(k), dtype=torch.float64)
    torch.testing.assert_close(G, torch.outer(g, g), rtol=1e-13, atol=1e-16)


def test_gaussian_kernel_literal():
    # k = 3: sigma = 0.8, 1-D weights (e^-0.78125, 1, e^-0.78125) / sum.
    e = math.exp(-1 / (2 * 0.64))
    assert gaussian_kernel(3)[1, 1].item() == pytest.approx((1 / (1 + 2 * e)) ** 2, rel=1e-14)
    assert gaussian_kernel(3)[1, 1].item() == pytest.approx(0.27249597351072813, rel=1e-12)


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 4, 6, 10])
def test_even_or_small_kernel_is_rejected(k):
    with pytest.raises(ValueError, match=r"dko\.kernel_size must be odd and >= 3"):
        gaussian_kernel(k)
    with pytest.raises(ValueError, match=r"dko\.kernel_size"):
        local_variance(torch.zeros(1, 3, 16, 16), k)


# ----------------------------------------------------------------- local variance


@pytest.mark.parametrize("k", KERNELS)
def test_local_variance_of_a_constant_image_is_zero(k):
    x = torch.full((2, 3, 16, 16), 0.37, dtype=torch.float64)
    assert local_variance(x, k).abs().max().item() < 1e-15
    assert local_variance(x.float() - 1.2, k).abs().max().item() < 1e-6


@pytest.mark.parametrize("k", KERNELS)
def test_local_variance_of_unit_white_noise_is_one_minus_sum_of_squared_weights(k):
    """E[var_k] = E[G*(x^2)] - E[(G*x)^2] = 1 - sum(G_k^2) for i.i.d. N(0, 1) pixels."""
    expected = 1 - sum(w * w for w in gaussian_1d(k)) ** 2
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(k))
    got = local_variance(x, k).item()
    # The sample mean of x^2 over ~7.5e5 pixels has relative std sqrt(2 / 7.5e5) = 0.0016; 5 of them.
    assert got == pytest.approx(expected, rel=0.008)
    assert abs(got - 1.0) > 0.012  # distinguishable from the plain variance even at k = 11


def test_local_variance_literal_closed_forms():
    assert 1 - float((gaussian_kernel(3) ** 2).sum()) == pytest.approx(0.8504379800088643, rel=1e-12)
    assert 1 - float((gaussian_kernel(7) ** 2).sum()) == pytest.approx(0.9576423872119, rel=1e-12)


def test_local_variance_map_matches_a_direct_computation():
    k = 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    m = local_variance_map(x, k)
    assert m.shape == (2, 3, 9 - k + 1, 11 - k + 1)  # 'valid': no padding
    w = torch.tensor(gaussian_1d(k), dtype=torch.float64)
    W = torch.outer(w, w)
    for b, c, i, j in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 2, 3)]:
        patch = x[b, c, i:i + k, j:j + k]
        mean = (W * patch).sum()
        var = (W * (patch - mean) ** 2).sum()  # the weighted variance around the weighted mean
        assert m[b, c, i, j].item() == pytest.approx(var.item(), rel=1e-10)
    torch.testing.assert_close(local_variance(x, k), m.mean(dim=(1, 2, 3)))


def test_local_variance_is_shift_invariant_and_scales_quadratically():
    x = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = local_variance(x, 7)
    assert v.shape == (3,)
    torch.testing.assert_close(local_variance(2.5 * x - 0.3, 7), 6.25 * v, rtol=1e-10, atol=0)


def test_log_sigma_local_is_half_the_log_local_variance_and_ignores_a_flip():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    f = log_sigma_local(x, 7)
    torch.testing.assert_close(f, 0.5 * torch.log(local_variance(x, 7)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_sigma_local(x.flip(-1), 7), f, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(log_sigma_local(torch.zeros(1, 3, 32, 32), 7)).all()  # a flat image: finite, very low


# ----------------------------------------------------------------- bins of the prior's steps


@pytest.mark.parametrize("T, J", [(1000, 32), (1000, 7), (50, 8), (10, 10)])
def test_bins_cut_the_steps_into_contiguous_runs_with_their_share_as_mass(T, J):
    bins = NoiseBins(T, J)
    assert bins.edges[0] == 0 and bins.edges[-1] == T and (bins.size >= T // J).all()
    assert float(bins.mass.sum()) == pytest.approx(1.0, abs=1e-12)
    t = torch.arange(T)
    j = bins.of_step(t)
    assert j.min() == 0 and j.max() == J - 1 and (torch.diff(j) >= 0).all()
    assert torch.equal(torch.bincount(j, minlength=J), bins.size)
    assert float(bins.step_distribution(bins.mass).sum()) == pytest.approx(1.0)
    torch.testing.assert_close(bins.step_distribution(bins.mass), torch.full((T,), 1.0 / T, dtype=torch.float64))


def test_a_step_is_drawn_uniformly_within_its_bin():
    bins = NoiseBins(1000, 32)
    g = torch.Generator().manual_seed(0)
    j = torch.full((64_000,), 5)
    t = bins.draw_steps(j, g)
    assert torch.equal(bins.of_step(t), j)
    counts = torch.bincount(t - int(bins.edges[5]), minlength=int(bins.size[5])).double()
    expected = 64_000 / int(bins.size[5])
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 80  # 30 degrees of freedom: p < 1e-6 beyond
    assert bins.draw_steps(torch.tensor([0, 31]), g).tolist() != []


def test_bins_refuse_more_bins_than_steps():
    with pytest.raises(ValueError, match="dko.bins"):
        NoiseBins(10, 11)


# ----------------------------------------------------------------- the policy's distribution


def test_a_zero_correction_is_the_prior_exactly_and_the_initial_dko_outputs_zero():
    bins = NoiseBins(1000, 32)
    torch.testing.assert_close(bin_probs(torch.zeros(32, dtype=torch.float64), bins.mass, 0.1), bins.mass, rtol=1e-14,
                               atol=0)
    net = DKO(32, (16, 16))
    obs = torch.randn(5, OBS_DIM)
    assert torch.equal(net(obs), torch.zeros(5, 32))
    policy = DKOPolicy(None, bins, 0.1, (16, 16), 7)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(policy.probs_of_images(x), bins.mass.float().expand(6, 32))


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(0.0, 50.0), floor=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_any_correction_keeps_every_bin_above_its_floor(scale, floor, seed):
    bins = NoiseBins(1000, 32)
    a = torch.randn(3, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    p = bin_probs(a, bins.mass, floor)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, dtype=torch.float64))
    assert (p >= floor * bins.mass - 1e-15).all()


def test_observation_layout():
    ctx = DKOContext(progress=0.25, probe_loss=0.5)
    obs = observations(torch.tensor([-1.5, -2.0]), ctx)
    assert obs.shape == (2, OBS_DIM) and obs.dtype == torch.float32
    torch.testing.assert_close(obs, torch.tensor([[-1.5, 0.25, math.log(0.5)], [-2.0, 0.25, math.log(0.5)]]))
    assert DKOContext.from_dict(ctx.to_dict()) == ctx and DKOContext.from_dict(None) == DKOContext()


def test_the_policy_reads_the_image_feature():
    bins = NoiseBins(1000, 16)
    torch.manual_seed(0)
    net = DKO(16, (8,))
    torch.nn.init.normal_(net.head.weight)
    policy = DKOPolicy({"weights": net.state_dict(), "context": {}}, bins, 0.1, (8,), 7)
    p = policy.probs(torch.tensor([-3.0, -1.0]))
    assert not torch.allclose(p[0], p[1])


# ----------------------------------------------------------------- the exported schedule and W1


PRIOR = anchor_logsnr("laplace", 1000, LMAX, LMIN, 0.75)


def test_the_prior_exports_its_own_schedule():
    bins = NoiseBins(1000, 32)
    p = DiffusionProcess(quantile_schedule(bins.step_distribution(bins.mass), PRIOR))
    torch.testing.assert_close(p.log_snr, PRIOR, rtol=0, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(0.0, 30.0), seed=st.integers(0, 2**31 - 1))
def test_any_policy_at_the_configured_floor_exports_a_valid_schedule_with_the_same_endpoints(scale, seed):
    bins = NoiseBins(1000, 32)
    a = torch.randn(32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    betas = quantile_schedule(bins.step_distribution(bin_probs(a, bins.mass, DKOConfig().floor)), PRIOR)
    lam = DiffusionProcess(validate_betas(betas, 1000)).log_snr
    assert float(lam[0]) == pytest.approx(LMAX, abs=1e-9) and float(lam[-1]) == pytest.approx(LMIN, abs=1e-9)


def test_the_exported_schedule_trains_on_the_policys_distribution():
    """Uniform t on the exported schedule is the policy's marginal: W1 between them (in log-SNR) is small."""
    from scipy.stats import wasserstein_distance

    bins = NoiseBins(1000, 32)
    probs = bin_probs(torch.linspace(-2, 2, 32, dtype=torch.float64), bins.mass, 0.1)
    exported = DiffusionProcess(quantile_schedule(bins.step_distribution(probs), PRIOR)).log_snr
    w = wasserstein_distance(exported.numpy(), PRIOR.numpy(), v_weights=bins.step_distribution(probs).numpy())
    assert w < 0.02
    moved = wasserstein_distance(exported.numpy(), PRIOR.numpy())
    assert moved > 0.2  # and it did move away from the prior


def test_the_floor_check_finds_the_bin_whose_floor_breaks_the_export():
    """laplace(0.75)'s last run of steps holds its steepest steps: at a floor of 0.1 a policy that keeps the last
    bin at its floor exports a final step with beta > 0.999 (and a config with it is refused, test_config.py)."""
    bins = NoiseBins(1000, 32)
    assert "bin 31 of 32" in floor_problem(PRIOR, bins, 0.1)
    assert floor_problem(PRIOR, bins, DKOConfig().floor) is None


def test_w1_closed_forms():
    lam = torch.linspace(4.0, -4.0, 9, dtype=torch.float64)  # steps one log-SNR apart
    a, b = torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)
    a[1], b[6] = 1.0, 1.0
    assert w1_logsnr(a, b, lam) == pytest.approx(5.0)
    assert w1_logsnr(a, a, lam) == 0.0
    u = torch.ones(9, dtype=torch.float64)
    assert w1_logsnr(u, u * 3, lam) == pytest.approx(0.0)  # normalized
    half = torch.zeros(9, dtype=torch.float64)
    half[1], half[2] = 0.5, 0.5
    assert w1_logsnr(a, half, lam) == pytest.approx(0.5)


def test_learned_schedule_of_the_initial_dko_is_the_prior():
    bins = NoiseBins(1000, 32)
    features = torch.tensor([-2.0, -1.0, -1.5])
    betas = learned_schedule({"weights": DKO(32, (8,)).state_dict(), "context": {"progress": 0.5}}, features, bins,
                             0.1, (8,), 7, PRIOR)
    torch.testing.assert_close(DiffusionProcess(betas).log_snr, PRIOR, rtol=0, atol=1e-6)  # the policy is float32
    torch.testing.assert_close(marginal_probs(None, features, bins, 0.1, (8,), 7), bins.mass.double(), rtol=0,
                               atol=1e-7)


def test_uniform_logsnr_betas_are_linear_in_log_snr():
    p = DiffusionProcess(uniform_logsnr_betas(1000, LMAX, LMIN))
    torch.testing.assert_close(p.log_snr, torch.linspace(LMAX, LMIN, 1000, dtype=torch.float64), rtol=0, atol=1e-9)
