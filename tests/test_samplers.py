"""DDPM and DDIM samplers: DDIM(eta=1) variance is DDPM's, an oracle denoiser recovers x_0, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from akod_ray.diffusion.dko import NoiseBins, bin_probs, quantile_schedule
from akod_ray.diffusion.schedules import anchor_logsnr
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.dispatch import sample
from akod_ray.diffusion.samplers import ddim_sample, ddim_sigma, ddim_timesteps, ddpm_sample
from akod_ray.diffusion.schedules import cosine_betas, linear_betas


def dko_betas(T: int, seed: int = 0, bins: int = 16) -> torch.Tensor:
    """A learned-looking schedule: the DKO's export of a random correction of the loglinear prior's bins."""
    nb = NoiseBins(T, bins)
    correction = torch.randn(bins, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    return quantile_schedule(nb.step_distribution(bin_probs(correction, nb.mass, 0.1)),
                             anchor_logsnr("loglinear", T, 9.21, -10.13))


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "dko": dko_betas}


@pytest.fixture(scope="module", params=sorted(SCHEDULES))
def process(request):
    return DiffusionProcess(SCHEDULES[request.param](1000))


def x0_images(n: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class NoiseModel(torch.nn.Module):
    """A stand-in denoiser whose output depends on x and the noise level (not the truth)."""

    def forward(self, x, cond):
        return 0.5 * x * torch.sigmoid(cond[:, 0])[:, None, None, None]


# ----------------------------------------------------------------- DDIM sigma and timesteps


def test_ddim_eta_one_gives_ddpm_posterior_variance(process):
    """Song et al. Eq. 16 with eta = 1 and consecutive steps is beta~_t of Ho et al. Eq. 7."""
    for t in [1, 2, 10, 100, 500, 900, 998, 999]:
        sigma = ddim_sigma(process, t, t - 1, 1.0)
        assert sigma**2 == pytest.approx(process.posterior_variance[t].item(), rel=1e-9)
        # ... and both equal the formula from betas alone.
        abar_t, abar_prev = process.abar[t].item(), process.abar[t - 1].item()
        assert sigma**2 == pytest.approx(process.betas[t].item() * (1 - abar_prev) / (1 - abar_t), rel=1e-9)
    assert ddim_sigma(process, 0, None, 1.0) == 0.0 == process.posterior_variance[0].item()


def test_ddim_sigma_scales_with_eta(process):
    s1 = ddim_sigma(process, 500, 480, 1.0)
    assert s1 > 0
    assert ddim_sigma(process, 500, 480, 0.0) == 0.0
    assert ddim_sigma(process, 500, 480, 0.3) == pytest.approx(0.3 * s1, rel=1e-12)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(1000, 1) == [999]  # one step starts from pure noise (it was [0]: noise taken for x_0)
    assert ddim_timesteps(10, 4) == [9, 6, 3, 0]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="eval.sampler_steps"):
            ddim_timesteps(1000, bad)


def test_one_step_ddim_is_the_x0_prediction_from_pure_noise(oracle_model):
    """DDIM with S = 1 evaluates the network once, at t = T - 1, and returns its x0_hat."""
    process = DiffusionProcess(linear_betas(1000))
    x0 = x0_images()
    model = oracle_model(process, x0)
    out = ddim_sample(model, process, tuple(x0.shape), torch.Generator().manual_seed(0), steps=1)
    assert model.calls == [999]
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


# ----------------------------------------------------------------- oracle denoiser


@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_eta0_with_oracle_recovers_x0(process, oracle_model, steps):
    x0 = x0_images()
    model = oracle_model(process, x0)
    out = ddim_sample(model, process, tuple(x0.shape), torch.Generator().manual_seed(0), steps=steps, eta=0.0)
    assert model.calls == ddim_timesteps(process.T, steps)  # the oracle saw every step, in order
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_ddim_with_noise_and_oracle_still_recovers_x0(oracle_model):
    process = DiffusionProcess(cosine_betas(1000))
    x0 = x0_images()
    out = ddim_sample(oracle_model(process, x0), process, tuple(x0.shape), torch.Generator().manual_seed(0),
                      steps=20, eta=1.0)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("betas", [linear_betas(25), cosine_betas(20), dko_betas(40)],
                         ids=["linear25", "cosine20", "dko40"])
def test_ddpm_with_oracle_ends_at_x0(oracle_model, betas):
    process = DiffusionProcess(betas)
    x0 = x0_images()
    model = oracle_model(process, x0)
    out = ddpm_sample(model, process, tuple(x0.shape), torch.Generator().manual_seed(0))
    assert model.calls == list(range(process.T - 1, -1, -1))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_ddpm_first_step_matches_algorithm_2_by_hand():
    """One ancestral step from x_T, computed by hand: x_{T-1} = mu~(x_T, x0_hat) + sqrt(beta~_T) z."""
    process = DiffusionProcess(cosine_betas(2))
    shape = (1, 3, 4, 4)
    x = ddpm_sample(NoiseModel(), process, shape, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    xT = torch.randn(shape, generator=g)
    z = torch.randn(shape, generator=g)
    # Step t = 1 (0-based; the paper's T = 2).
    ls1 = process.log_snr[1].float()
    eps = 0.5 * xT * torch.sigmoid(ls1)
    a1, a0, b1 = process.abar[1].item(), process.abar[0].item(), process.betas[1].item()
    x0_hat = ((xT - math.sqrt(1 - a1) * eps) / math.sqrt(a1)).clamp(-1, 1)
    mean = math.sqrt(a0) * b1 / (1 - a1) * x0_hat + math.sqrt(1 - b1) * (1 - a0) / (1 - a1) * xT
    x1 = mean + math.sqrt(b1 * (1 - a0) / (1 - a1)) * z
    # Step t = 0: the posterior mean is x0_hat itself, no noise.
    ls0 = process.log_snr[0].float()
    eps0 = 0.5 * x1 * torch.sigmoid(ls0)
    expected = ((x1 - math.sqrt(1 - a0) * eps0) / math.sqrt(a0)).clamp(-1, 1)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_is_reproducible_from_the_seed(eta):
    process = DiffusionProcess(linear_betas(1000))
    run = lambda seed: ddim_sample(NoiseModel(), process, (2, 3, 8, 8), torch.Generator().manual_seed(seed),  # noqa: E731
                                   steps=10, eta=eta)
    a, b, c = run(1), run(1), run(2)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_ddim_noise_depends_on_eta():
    process = DiffusionProcess(linear_betas(1000))
    xT = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda seed, eta: ddim_sample(NoiseModel(), process, tuple(xT.shape),  # noqa: E731
                                        torch.Generator().manual_seed(seed), steps=10, eta=eta, x_T=xT)
    assert torch.equal(run(1, 0.0), run(2, 0.0))  # deterministic given x_T
    assert not torch.equal(run(1, 0.5), run(2, 0.5))


def test_ddpm_is_reproducible_from_the_seed():
    process = DiffusionProcess(linear_betas(30))
    run = lambda seed: ddpm_sample(NoiseModel(), process, (2, 3, 8, 8), torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_sample_batches_share_one_generator_and_clamp():
    process = DiffusionProcess(linear_betas(30))
    model = NoiseModel()
    a = sample(model, process, 5, torch.Generator().manual_seed(0), sampler="ddim", steps=5, image_size=16,
               batch_size=2)
    assert a.shape == (5, 3, 16, 16)
    assert torch.equal(a, sample(model, process, 5, torch.Generator().manual_seed(0), sampler="ddim", steps=5,
                                 image_size=16, batch_size=2))
    assert a.min() >= -1 and a.max() <= 1
    # The batches continue one generator: the same as calling the sampler batch after batch.
    g = torch.Generator().manual_seed(0)
    by_hand = torch.cat([ddim_sample(model, process, (k, 3, 16, 16), g, steps=5) for k in (2, 2, 1)]).clamp(-1, 1)
    assert torch.equal(a, by_hand)
    d = sample(model, process, 3, torch.Generator().manual_seed(0), sampler="ddpm", image_size=16)
    assert d.shape == (3, 3, 16, 16)
    assert torch.equal(d, ddpm_sample(model, process, (3, 3, 16, 16), torch.Generator().manual_seed(0)).clamp(-1, 1))
    with pytest.raises(ValueError, match="eval.sampler"):
        sample(model, process, 1, torch.Generator(), sampler="lms")
