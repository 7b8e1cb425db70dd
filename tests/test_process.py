"""The DDPM process: q(x_t | x_0) moments, the posterior, conversions, log-SNR, conditioning, losses."""

from __future__ import annotations

import math

import pytest
import torch

from akod_ray.diffusion.process import COND_DIM, DiffusionProcess
from akod_ray.diffusion.schedules import cosine_betas, linear_betas

T = 1000


@pytest.fixture(scope="module", params=["linear", "cosine"])
def process(request):
    return DiffusionProcess({"linear": linear_betas, "cosine": cosine_betas}[request.param](T))


def abar_direct(betas: torch.Tensor, i: int) -> float:
    return math.prod(1.0 - b for b in betas[: i + 1].tolist())


# ----------------------------------------------------------------- q(x_t | x_0)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments_match_closed_form(t):
    """x_t ~ N(sqrt(abar_t) x_0, (1 - abar_t) I): empirical mean and variance over N draws per pixel."""
    p = DiffusionProcess(linear_betas(T))
    n = 100_000
    x0 = torch.tensor([-0.8, 0.0, 0.3, 1.0], dtype=torch.float64).reshape(1, 1, 1, 4).expand(n, 1, 1, 4)
    g = torch.Generator().manual_seed(t)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = p.q_sample(x0, torch.full((n,), t), noise)
    abar = abar_direct(p.betas, t)
    mean, var = xt.mean(dim=0).flatten(), xt.var(dim=0).flatten()
    # Standard errors: sqrt(var / n) for the mean, var sqrt(2 / (n - 1)) for the variance; 5 of them.
    tol_mean = 5 * math.sqrt((1 - abar) / n)
    tol_var = 5 * (1 - abar) * math.sqrt(2 / (n - 1))
    for j, x in enumerate([-0.8, 0.0, 0.3, 1.0]):
        assert abs(mean[j].item() - math.sqrt(abar) * x) < tol_mean
        assert abs(var[j].item() - (1 - abar)) < tol_var


def test_q_sample_is_exactly_the_reparameterization(process):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 998, 999])
    xt = process.q_sample(x0, t, noise)
    for b, ti in enumerate(t.tolist()):
        a = abar_direct(process.betas, ti)
        torch.testing.assert_close(xt[b], math.sqrt(a) * x0[b] + math.sqrt(1 - a) * noise[b], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- posterior q(x_{t-1} | x_t, x_0)


@pytest.mark.parametrize("t", [0, 1, 2, 400, 999])
def test_posterior_mean_and_variance_match_ho_eq7(process, t):
    betas = process.betas.tolist()
    abar_t, abar_prev = abar_direct(process.betas, t), (abar_direct(process.betas, t - 1) if t > 0 else 1.0)
    beta_t = betas[t]
    var_direct = beta_t * (1 - abar_prev) / (1 - abar_t)
    c1 = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
    c2 = math.sqrt(1 - beta_t) * (1 - abar_prev) / (1 - abar_t)
    x0 = torch.tensor([[[[0.5, -0.25]]]], dtype=torch.float64)
    xt = torch.tensor([[[[-1.5, 2.0]]]], dtype=torch.float64)
    mean, var = process.q_posterior(x0, xt, torch.tensor([t]))
    assert var.shape == (1, 1, 1, 1)
    assert var.item() == pytest.approx(var_direct, rel=1e-9, abs=1e-300)
    torch.testing.assert_close(mean, c1 * x0 + c2 * xt, rtol=1e-9, atol=1e-12)


def test_posterior_at_the_first_step_returns_x0():
    """At t = 0 (the paper's t = 1) abar_prev = 1: the posterior is a point mass at x_0."""
    p = DiffusionProcess(linear_betas(T))
    x0, xt = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mean, var = p.q_posterior(x0, xt, torch.tensor([0, 0]))
    assert (var == 0).all()
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- conversions, log-SNR


def test_eps_and_x0_conversions_are_inverses(process):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 250, 700, 998])
    xt = process.q_sample(x0, t, eps)
    torch.testing.assert_close(process.predict_eps_from_x0(xt, t, x0), eps, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(process.predict_x0_from_eps(xt, t, eps), x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(
        process.predict_x0_from_eps(xt, t, process.predict_eps_from_x0(xt, t, x0)), x0, rtol=1e-9, atol=1e-9)


def test_extract_follows_the_input_dtype_and_broadcasts():
    p = DiffusionProcess(linear_betas(T))
    x = torch.zeros(3, 2, 5, 5, dtype=torch.float32)
    out = p.extract(p.abar, torch.tensor([0, 1, 999]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == p.abar[[0, 1, 999]].float().tolist()


@pytest.mark.parametrize("t", [0, 1, 300, 999])
def test_log_snr_equals_log_of_abar_over_one_minus_abar(process, t):
    a = abar_direct(process.betas, t)
    assert process.log_snr[t].item() == pytest.approx(math.log(a / (1 - a)), rel=1e-9, abs=1e-9)


def test_log_snr_of_linear_schedule_literals():
    p = DiffusionProcess(linear_betas(T))
    assert p.log_snr[0].item() == pytest.approx(9.21024036697596, abs=1e-9)  # log((1 - 1e-4) / 1e-4)
    assert p.log_snr[-1].item() == pytest.approx(-10.117673183301035, abs=1e-7)
    assert (p.log_snr[1:] < p.log_snr[:-1]).all()


# ----------------------------------------------------------------- conditioning


def test_noise_cond_columns(process):
    t = torch.tensor([0, 1, 500, 998, 999])
    c = process.noise_cond(t)
    assert c.shape == (5, COND_DIM) and c.dtype == torch.float32
    ls = process.log_snr.float()
    assert torch.equal(c[:, 0], ls[t])
    assert torch.equal(c[:, 1], ls[torch.tensor([0, 0, 499, 997, 998])])  # t - 1, clamped at the first step
    assert torch.equal(c[:, 2], ls[torch.tensor([1, 2, 501, 999, 999])])  # t + 1, clamped at the last step
    assert torch.equal(c[:, 3], process.betas.float()[t])


def test_sample_t_is_seeded_and_in_range():
    p = DiffusionProcess(linear_betas(T))
    a = p.sample_t(10_000, "cpu", torch.Generator().manual_seed(5))
    b = p.sample_t(10_000, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() <= T - 1 and len(a.unique()) > 900


# ----------------------------------------------------------------- losses


def test_min_snr_weights(process):
    t = torch.tensor([0, 100, 400, 700, 999])
    for gamma in (1.0, 5.0):
        w = process.loss_weights(t, gamma)
        snr = [math.exp(process.log_snr[i].item()) for i in t.tolist()]
        expected = [min(s, gamma) / s for s in snr]
        assert w.dtype == torch.float32
        assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert process.loss_weights(t, None) is None


def test_min_snr_weight_is_one_at_low_snr_and_gamma_over_snr_at_high_snr():
    p = DiffusionProcess(linear_betas(T))
    w = p.loss_weights(torch.tensor([0, 999]), 5.0)
    assert w[1].item() == 1.0  # SNR_T ~ 4e-5 < 5
    assert w[0].item() == pytest.approx(5.0 / math.exp(9.21024036697596), rel=1e-6)


class ConstModel(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, cond):
        assert cond.shape == (x.shape[0], COND_DIM)
        return torch.full_like(x, self.value) if not callable(self.value) else self.value(x)


def test_training_loss_is_per_example_eps_mse():
    p = DiffusionProcess(linear_betas(T))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([5, 500, 900])
    loss = p.training_loss(ConstModel(0.0), x0, t, noise)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, (noise**2).mean(dim=(1, 2, 3)))
    loss_w = p.training_loss(ConstModel(0.0), x0, t, noise, min_snr_gamma=5.0)
    torch.testing.assert_close(loss_w, loss * p.loss_weights(t, 5.0))


def test_training_loss_of_the_true_noise_is_zero():
    p = DiffusionProcess(cosine_betas(T))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 990])
    oracle = ConstModel(lambda x: p.predict_eps_from_x0(x, t, x0))
    assert p.training_loss(oracle, x0, t, noise).abs().max().item() < 1e-12
