"""Online adaptation without RL (akod_ray/training/adaptation.py): the importance sampler keeps the objective
and moves the proposal; EDM2's learned uncertainty normalizes the F-type loss per noise level."""

from __future__ import annotations

import math

import pytest
import torch

from akod_ray.diffusion.process import TABLE_COND, DiffusionProcess
from akod_ray.diffusion.schedules import laplace_betas
from akod_ray.training.adaptation import HISTORY_MIN, SIGMA_DATA, EDM2Weighting, ImportanceSampler

T, J = 1000, 16


def feed(sampler: ImportanceSampler, loss_of_bin, steps: int, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.zeros(batch, 3, 2, 2)]
    for _ in range(steps):
        drawn = sampler.draw(None, x, g, 0)
        j = sampler.bins.of_step(drawn.t[0])
        sampler.observe([loss_of_bin(j)])
    return drawn


def test_before_every_bin_has_history_the_proposal_is_uniform_t():
    s = ImportanceSampler(T, J, 0.1, 0.1, "cpu")
    torch.testing.assert_close(s.proposal(), s.mass)
    drawn = s.draw(None, [torch.zeros(8, 3, 2, 2)], torch.Generator().manual_seed(0), 0)
    torch.testing.assert_close(drawn.weights[0], torch.ones(8))  # m / q = 1


def test_the_proposal_follows_the_rms_loss_and_the_weights_keep_the_objective():
    """With bin j's loss fixed at L_j: q_j = (1 - f) m_j L_j / sum m L + f m_j, and E_q[(m / q) L] = E_m[L]."""
    s = ImportanceSampler(T, J, 0.1, 0.5, "cpu")
    losses = torch.linspace(0.1, 1.6, J, dtype=torch.float64)
    feed(s, lambda j: losses[j].float(), steps=60)
    assert (s.count >= HISTORY_MIN).all()
    m = s.mass
    want = 0.9 * m * losses / (m * losses).sum() + 0.1 * m
    torch.testing.assert_close(s.proposal(), want, rtol=1e-5, atol=1e-7)
    q = s.proposal()
    assert float((q * (m / q) * losses).sum()) == pytest.approx(float((m * losses).sum()), rel=1e-12)


def test_the_importance_sampler_resumes_from_its_state():
    s = ImportanceSampler(T, J, 0.1, 0.3, "cpu")
    feed(s, lambda j: (j.float() + 1) / J, steps=30)
    t = ImportanceSampler(T, J, 0.1, 0.3, "cpu")
    t.load_state_dict(s.state_dict())
    torch.testing.assert_close(t.proposal(), s.proposal())


def test_edm2_weighting_starts_at_the_f_type_loss_and_learns_each_levels_log_loss():
    """u = 0 at first: the objective is the mean of (1 + e^-lambda / sigma_data^2) eps-MSE. Trained alone on fixed
    per-level F-losses, u(lambda) goes to log F(lambda) (the minimum of F e^-u + u)."""
    w = EDM2Weighting(lr=0.05)
    process = DiffusionProcess(laplace_betas(T, 9.21, -10.13, 0.75))
    tables = process.step_tables()
    t = torch.tensor([100, 500, 900])
    eps_mse = torch.tensor([0.3, 0.1, 0.002])
    lam = tables[t][:, TABLE_COND][:, 0]
    f = eps_mse * (1 + torch.exp(-lam) / SIGMA_DATA**2)
    assert w(eps_mse, tables[t]).item() == pytest.approx(f.mean().item(), rel=1e-5)
    for _ in range(800):
        w(eps_mse, tables[t]).backward()
        w.step()
    torch.testing.assert_close(w.log_variance(lam), torch.log(f), rtol=0, atol=0.05)
    v = EDM2Weighting(lr=0.05)
    v.load_checkpoint_state(w.checkpoint_state())
    torch.testing.assert_close(v.log_variance(lam), w.log_variance(lam))
    assert math.isfinite(w(eps_mse, tables[t]).item())
