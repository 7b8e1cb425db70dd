"""Training schedule and sampling grid apart: conditioning at any log-SNR, the common grid, the x0 clipping rule."""

from __future__ import annotations

import math

import pytest
import torch

from akod_ray.config import load_config
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.samplers import Denoiser, ddim_sample, ddim_timesteps, ddpm_sample, sampling_grid
from akod_ray.diffusion.schedules import cosine_betas, laplace_betas, linear_betas, uniform_logsnr_betas
from akod_ray.evaluation.sampling import sample_as_configured, sampling_record

LMAX, LMIN = 9.21, -10.13


class LogSNROracle(torch.nn.Module):
    """The ideal denoiser for one known x_0, reading only the log-SNR column of cond:
    eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar), abar = sigmoid(log-SNR). Records every cond it sees."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.conds: list[torch.Tensor] = []

    def forward(self, x, cond):
        self.conds.append(cond.clone())
        lam = cond[:, 0].double()[:, None, None, None]
        a = torch.sigmoid(lam)
        return ((x.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()).float()


def x0_images(n=2, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


# ----------------------------------------------------------------- conditioning at any log-SNR


@pytest.mark.parametrize("betas", [linear_betas(1000), cosine_betas(1000), laplace_betas(1000, LMAX, LMIN, 1.0)],
                         ids=["linear", "cosine", "laplace"])
def test_cond_at_a_steps_own_log_snr_is_exactly_its_row(betas):
    p = DiffusionProcess(betas)
    t = torch.arange(p.T)
    assert torch.equal(p.cond_at_logsnr(p.log_snr[t]), p.noise_cond(t))


def test_cond_between_steps_interpolates_in_log_snr_and_keeps_the_log_snr_itself():
    p = DiffusionProcess(linear_betas(100))
    lam = 0.25 * p.log_snr[40] + 0.75 * p.log_snr[41]
    cond = p.cond_at_logsnr(lam.reshape(1))[0].double()
    assert cond[0].item() == pytest.approx(lam.item(), abs=1e-6)
    expected_beta = 0.25 * p.betas[40] + 0.75 * p.betas[41]  # 3/4 of the way from step 40 to step 41
    assert cond[3].item() == pytest.approx(expected_beta.item(), rel=1e-6)
    expected_next = 0.25 * p.log_snr[41] + 0.75 * p.log_snr[42]
    assert cond[2].item() == pytest.approx(expected_next.item(), rel=1e-5)


def test_cond_beyond_the_range_clamps_to_the_end_rows():
    p = DiffusionProcess(linear_betas(100))
    cond = p.cond_at_logsnr(torch.tensor([50.0, -50.0]))
    assert cond[0, 0] == 50.0 and cond[1, 0] == -50.0
    assert torch.equal(cond[0, 1:], p.noise_cond(torch.tensor([0]))[0, 1:])
    assert torch.equal(cond[1, 1:], p.noise_cond(torch.tensor([99]))[0, 1:])


# ----------------------------------------------------------------- the sampling grid


def test_common_grid_is_uniform_in_log_snr_between_the_shared_endpoints_for_every_arm():
    for betas in (linear_betas(1000), cosine_betas(1000), laplace_betas(1000, LMAX, LMIN, 1.0)):
        grid = sampling_grid("common", DiffusionProcess(betas), LMAX, LMIN)
        torch.testing.assert_close(grid.betas, uniform_logsnr_betas(1000, LMAX, LMIN), rtol=0, atol=0)
    own = DiffusionProcess(cosine_betas(1000))
    assert sampling_grid("own", own, LMAX, LMIN) is own
    with pytest.raises(ValueError, match="eval.sampling_grid"):
        sampling_grid("karras", own, LMAX, LMIN)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_model_trained_on_one_schedule_samples_on_another_grid(sampler):
    """The network sees exactly the grid's log-SNR values (DDIM's S steps, or all T of DDPM), with
    the conditioning its training schedule gives them, and an oracle lands on x_0."""
    train = DiffusionProcess(laplace_betas(200, LMAX, LMIN, 1.0))
    grid = sampling_grid("common", train, LMAX, LMIN)
    x0 = x0_images()
    model = LogSNROracle(x0)
    g = torch.Generator().manual_seed(0)
    if sampler == "ddim":
        out = ddim_sample(model, train, tuple(x0.shape), g, steps=10, grid=grid)
        steps = ddim_timesteps(grid.T, 10)
    else:
        out = ddpm_sample(model, train, tuple(x0.shape), g, grid=grid)
        steps = list(range(grid.T - 1, -1, -1))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    seen = torch.stack([c[0] for c in model.conds])
    torch.testing.assert_close(seen, train.cond_at_logsnr(grid.log_snr[steps]), rtol=0, atol=0)
    assert not torch.equal(seen[:, 0], train.noise_cond(torch.tensor(steps))[:, 0])  # not the training schedule's


def test_sampling_follows_the_config_and_says_what_it_did():
    cfg = load_config(None, ["diffusion.T=100", "diffusion.schedule=cosine", "eval.sampler_steps=7"])
    assert cfg.eval.sampling_grid == "common" and cfg.eval.clip_x0 is True  # the defaults
    train = DiffusionProcess(cosine_betas(100))
    x0 = x0_images()
    model = LogSNROracle(x0)
    out = sample_as_configured(cfg, model, train, 2, torch.Generator().manual_seed(0), image_size=8)
    assert len(model.conds) == 7
    grid = sampling_grid("common", train, cfg.dko.logsnr_max, cfg.dko.logsnr_min)
    torch.testing.assert_close(model.conds[0][:, 0], grid.log_snr[99].float().expand(2), rtol=0, atol=0)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert sampling_record(cfg, 100) == {"sampler": "ddim", "nfe": 7, "sampling_grid": "common", "clip_x0": True}
    assert sampling_record(cfg, 100, sampler="ddpm", grid="own")["nfe"] == 100


# ----------------------------------------------------------------- the x0 clipping rule


class Biased(torch.nn.Module):
    """Predicts eps far off, so x0_hat leaves [-1, 1] at the noisiest steps."""

    def forward(self, x, cond):
        return x * 0.0 + 3.0


def test_clipping_rule_keeps_x0_hat_in_range_and_eps_consistent_with_it():
    p = DiffusionProcess(cosine_betas(100))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = 99
    raw_eps, raw_x0 = Denoiser(Biased(), p, clip_x0=False).at_step(x, t)
    eps, x0 = Denoiser(Biased(), p, clip_x0=True).at_step(x, t)
    assert raw_x0.abs().max() > 1 and torch.equal(raw_eps, torch.full_like(x, 3.0))
    assert x0.min() >= -1 and x0.max() <= 1
    torch.testing.assert_close(x0, raw_x0.clamp(-1, 1), rtol=0, atol=0)
    a = p.abar[t].item()
    torch.testing.assert_close(eps, (x - math.sqrt(a) * x0) / math.sqrt(1 - a), rtol=1e-6, atol=1e-6)


def test_ddim_clips_as_ddpm_does_and_the_rule_is_a_config_switch():
    p = DiffusionProcess(cosine_betas(100))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    clipped = ddim_sample(Biased(), p, (2, 3, 4, 4), g(), steps=5, clip_x0=True)
    unclipped = ddim_sample(Biased(), p, (2, 3, 4, 4), g(), steps=5, clip_x0=False)
    assert clipped.abs().max() <= 1.0 + 1e-6
    assert unclipped.abs().max() > 1.5
    cfg = load_config(None, ["eval.clip_x0=false"])
    assert cfg.eval.clip_x0 is False
