"""The per-decision credit (akod_ray/training/credit.py) against exact gradients and closed forms."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import laplace_betas
from akod_ray.models.unet import UNet
from akod_ray.training import credit

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def model(tiny_model_config, perturb_zero_init):
    torch.manual_seed(0)
    return perturb_zero_init(UNet(tiny_model_config), std=0.2)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise


def exact_directional(model, tables, x0, t, noise, u):
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    out = []
    for i in range(x0.shape[0]):
        loss = DiffusionProcess.table_loss(model, tables, x0[i:i + 1], t[i:i + 1], noise[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        out.append(sum(float((g.double() * v.double()).sum()) for g, v in zip(grads, u)))
    return torch.tensor(out, dtype=torch.float64)


def test_the_finite_difference_is_each_images_gradient_dotted_with_the_direction(model):
    tables = DiffusionProcess(laplace_betas(1000, 9.21, -10.13, 0.75)).step_tables()
    x0, t, noise = batch()
    g = torch.Generator().manual_seed(5)
    u = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    d, base = credit.directional_derivatives(model, tables, x0, t, noise, u)
    want = exact_directional(model, tables, x0, t, noise, u)
    torch.testing.assert_close(d, want, rtol=2e-2, atol=2e-3 * float(want.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(base, DiffusionProcess.table_loss(model.eval(), tables, x0, t, noise).double())
    # the weights are exactly as before
    before = copy.deepcopy(model.state_dict())
    credit.directional_derivatives(model, tables, x0, t, noise, u)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_credit_predicts_what_a_small_step_on_that_image_does_to_the_probe(model):
    """With P = 1 (no optimizer state yet) the first-order change of M after a step of size lr on image i's
    loss is -lr (grad M . g_i) = -lr d_i: checked against the actual change."""
    tables = DiffusionProcess(laplace_betas(1000, 9.21, -10.13, 0.75)).step_tables()
    val = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    pairs = credit.probe_pairs(val, 24, "eps_laplace", 9.21, -10.13, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    u, m = credit.probe_direction(model, opt, pairs)
    x0, t, noise = batch(2, seed=1)
    d, _ = credit.directional_derivatives(model, tables, x0, t, noise, u)
    lr = 2e-4
    for i in range(2):
        stepped = copy.deepcopy(model).eval()
        loss = DiffusionProcess.table_loss(stepped, tables, x0[i:i + 1], t[i:i + 1], noise[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, list(stepped.parameters()))
        with torch.no_grad():
            for p, gr in zip(stepped.parameters(), grads):
                p -= lr * gr
            after = credit.level_loss(stepped, *pairs).mean().item()
        assert (after - m) == pytest.approx(-lr * float(d[i]), rel=0.15)


def test_the_direction_is_adams_preconditioned_probe_gradient(model):
    val = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    pairs = credit.probe_pairs(val, 8, "eps_laplace", 9.21, -10.13, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    u0, m0 = credit.probe_direction(model, opt, pairs)
    model.eval()
    raw = torch.autograd.grad(credit.level_loss(model, *pairs).mean(), list(model.parameters()))
    for a, b in zip(u0, raw):
        torch.testing.assert_close(a, b)  # before any step: P = 1
    for p, gr in zip(model.parameters(), raw):  # one AdamW step with these gradients: v_hat = g^2
        p.grad = gr.clone()
    opt.step()
    u1, _ = credit.probe_direction(model, opt, pairs)
    model.eval()
    g1 = torch.autograd.grad(credit.level_loss(model, *pairs).mean(), list(model.parameters()))
    for a, b, g0 in zip(u1, g1, raw):
        torch.testing.assert_close(a, b / (g0.abs() + 1e-8), rtol=1e-4, atol=1e-6)
    assert m0 == pytest.approx(credit.level_loss(copy.deepcopy(model), *pairs).mean().item(), rel=0.5)


def test_probe_levels_follow_the_metrics_weighting():
    g = torch.Generator().manual_seed(0)
    lam = credit.metric_levels("eps_laplace", 9.21, -10.13, 40_000, g).numpy()
    assert lam.max() <= 9.21 and lam.min() >= -10.13
    assert abs(lam.mean()) < 0.03 and np.abs(lam).mean() == pytest.approx(1.0, abs=0.03)  # Laplace(0, 1)
    uniform = credit.metric_levels("eps_uniform", 9.21, -10.13, 40_000, g).numpy()
    assert uniform.mean() == pytest.approx((9.21 - 10.13) / 2, abs=0.1)
    q = credit.metric_quantiles("eps_laplace", 9.21, -10.13, 8).numpy()
    assert np.all(np.diff(q) < 0) and q[:4] == pytest.approx(-q[:3:-1], abs=0.02)  # from clean to noisy, symmetric
    assert q[0] == pytest.approx(math.log(8), abs=0.02)  # the 15/16 quantile of Laplace(0, 1)
    assert q[3] == pytest.approx(math.log(8 / 7), abs=0.02)  # the 9/16 quantile


def test_the_level_probe_profile_is_the_epsilon_mse_at_its_levels(model):
    val = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    levels = torch.tensor([2.0, 0.0, -2.0], dtype=torch.float64)
    probe = credit.LevelProbe(val, levels, seed=1, batch=4)
    profile = probe.profile(model)
    assert probe.grid_logsnr == [2.0, 0.0, -2.0] and len(profile) == 3
    with torch.no_grad():
        for j in range(3):
            want = credit.level_loss(model.eval(), val, levels[j].expand(3), probe.noise[j]).mean().item()
            assert profile[j] == pytest.approx(want, rel=1e-5)
