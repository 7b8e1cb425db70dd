"""Per-decision credit: the first-order effect of one image's share of an update on the reward probe.

The reward probe's metric M (``rl.reward_metric``) is the epsilon-MSE of the denoiser on held-out
images at noise levels drawn from the metric's weighting over log-SNR (:func:`probe_pairs`): the
probe's points lie where the metric puts its mass. An image i trained at a step contributes
g_i / B to the batch's gradient (g_i = grad L_i, B the global batch); AdamW turns it into the weight
change -lr P g_i / B, P = diag(1 / (sqrt(v_hat) + eps)) its current preconditioner (momentum spreads
the change over later steps without changing its sum, to first order). M then changes by
grad M . delta theta, so the image's credit, the relative fall of M it causes, is

    c_i = lr (P grad M) . g_i / (B M)                                              (1)

The dot product is the directional derivative of the image's own loss along u = P grad M, taken by
a central finite difference in float32 with the network in eval mode, on the very x_t the step trains
on (:func:`directional_derivatives`):

    d_i = [L_i(theta + h u_hat) - L_i(theta - h u_hat)] / (2 h) |u|,  u_hat = u / |u|,  h = fd_rel |theta|

One backward pass on the probe per decision window (:func:`probe_direction`) and two forward passes of
the decision images per decision step: the cost of a credit per image. The credits of a step sum to
the step's predicted relative fall of M.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import EDM_LOGSNR_MEAN, EDM_LOGSNR_STD
from akod_ray.models.unet import level_cond
from akod_ray.training.step import autocast

FD_REL = 1e-3  # the finite difference's step: this share of the weights' norm

# The reward probe's metrics: weightings of the epsilon-MSE over log-SNR (chosen by bench/reward_referee.py)
REWARD_METRICS = ("eps_uniform", "x0", "eps_edm", "eps_laplace", "eps_sigmoid")


def metric_weights(metric: str, logsnr) -> np.ndarray:
    """The metric's weight of the epsilon-MSE at each log-SNR, normalized to sum to 1 over the points given:

    ===========  ======================================================================================
    eps_uniform  1: the plain mean
    x0           e^{-lambda}: the x0-MSE, (1 - abar) / abar times the epsilon-MSE
    eps_edm      the density of N(2.4, 2.4^2) (EDM's noise levels)
    eps_laplace  the density of Laplace(0, 1)
    eps_sigmoid  sigmoid(2 - lambda) (Kingma & Gao 2023's sigmoid weighting)
    ===========  ======================================================================================
    """
    lam = np.asarray(logsnr, dtype=np.float64)
    if metric == "eps_uniform":
        w = np.ones_like(lam)
    elif metric == "x0":
        w = np.exp(-lam)
    elif metric == "eps_edm":
        w = np.exp(-0.5 * ((lam - EDM_LOGSNR_MEAN) / EDM_LOGSNR_STD) ** 2)
    elif metric == "eps_laplace":
        w = np.exp(-np.abs(lam))
    elif metric == "eps_sigmoid":
        w = 1.0 / (1.0 + np.exp(lam - 2.0))
    else:
        raise ValueError(f"rl.reward_metric must be one of {REWARD_METRICS}, got {metric!r}")
    return w / w.sum()


def metric_value(metric: str, profile, logsnr) -> float:
    """M = sum_j c_j l_j of a loss profile at the grid ``logsnr``."""
    return float(np.dot(metric_weights(metric, logsnr), np.asarray(profile, dtype=np.float64)))


def metric_levels(metric: str, logsnr_max: float, logsnr_min: float, n: int, generator: torch.Generator,
                  grid: int = 4096) -> torch.Tensor:
    """n log-SNR values drawn from the metric's weighting over [logsnr_min, logsnr_max] (inverse CDF on a grid)."""
    lam = np.linspace(logsnr_max, logsnr_min, grid)
    w = metric_weights(metric, lam)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.abs(np.diff(lam)))])
    u = torch.rand(n, generator=generator, dtype=torch.float64).numpy() * cdf[-1]
    return torch.from_numpy(np.interp(u, cdf, lam))


def metric_quantiles(metric: str, logsnr_max: float, logsnr_min: float, n: int, grid: int = 4096) -> torch.Tensor:
    """The n midpoint quantiles (j + 0.5) / n of the metric's weighting: a fixed probe grid where its mass is."""
    lam = np.linspace(logsnr_max, logsnr_min, grid)
    w = metric_weights(metric, lam)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.abs(np.diff(lam)))])
    q = (np.arange(n) + 0.5) / n * cdf[-1]
    return torch.from_numpy(np.interp(q, cdf, lam))


def probe_pairs(x0: torch.Tensor, n: int, metric: str, logsnr_max: float, logsnr_min: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n (image, level, noise) pairs: images uniform from ``x0`` (held-out), levels from the metric (seeded)."""
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    idx = torch.randint(0, x0.shape[0], (n,), generator=g)
    lam = metric_levels(metric, logsnr_max, logsnr_min, n, g)
    noise = torch.randn((n, *x0.shape[1:]), generator=g)
    return x0[idx], lam.to(x0.device), noise.to(x0.device, x0.dtype)


def level_loss(model, x0: torch.Tensor, log_snr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-image epsilon-MSE at continuous noise levels (x_t = sqrt(sigmoid(l)) x_0 + sqrt(sigmoid(-l)) eps)."""
    lam = log_snr.to(x0.dtype).reshape(-1, 1, 1, 1)
    x_t = torch.sigmoid(lam).sqrt() * x0 + torch.sigmoid(-lam).sqrt() * noise
    cond = level_cond(log_snr.float(), 0.02).to(x0.device)  # level conditioning; plain U-Nets read column 0 only
    eps = model(x_t, cond)
    return F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))


def preconditioner(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | float:
    """AdamW's P for one parameter: 1 / (sqrt(v_hat) + eps); 1 before its first step."""
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return 1.0
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    step = float(state["step"])
    beta2, eps = group["betas"][1], group["eps"]
    v_hat = state["exp_avg_sq"] / (1.0 - beta2**step)
    return 1.0 / (v_hat.sqrt() + eps)


def probe_direction(model, optimizer, pairs, bf16: bool = False) -> tuple[list[torch.Tensor], float]:
    """u = P grad M on the probe ``pairs`` (model in eval mode, gradients not accumulated into .grad)
    and M itself (the mean probe loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        x0, lam, noise = pairs
        with autocast(x0.device, bf16):
            loss = level_loss(model, x0, lam, noise).mean()
        grads = torch.autograd.grad(loss, params)
    finally:
        model.train(was_training)
    return [g.float() * preconditioner(optimizer, p) for p, g in zip(params, grads)], float(loss.detach())


@torch.no_grad()
def directional_derivatives(model, tables: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                            direction: list[torch.Tensor], weighted: bool = False, fd_rel: float = FD_REL,
                            with_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d_i, L_i): each image's directional derivative of its training loss along ``direction`` (float64 [B],
    central finite difference in float32, eval mode) and, with ``with_loss``, its loss at the current weights
    (float64 [B]; one more forward pass)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm_u = math.sqrt(sum(float((u.double() ** 2).sum()) for u in direction))
    if norm_u == 0.0:
        zero = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        return zero, (zero if with_loss else None)
    norm_theta = math.sqrt(sum(float((p.double() ** 2).sum()) for p in params))
    h = fd_rel * max(norm_theta, 1.0)
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    try:
        out = []
        for sign in (1.0, -1.0, 0.0) if with_loss else (1.0, -1.0):
            for p, s, u in zip(params, saved, direction):
                p.copy_(s + (sign * h / norm_u) * u.to(p.dtype))
            out.append(DiffusionProcess.table_loss(model, tables, x0, t, noise, weighted).double())
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
        model.train(was_training)
    plus, minus = out[:2]
    return (plus - minus) / (2 * h) * norm_u, (out[2] if with_loss else None)


class LevelProbe:
    """A fixed probe at continuous noise levels: ``x0`` held-out images at the log-SNR values ``levels``
    (e.g. :func:`metric_quantiles`: then the plain mean of the profile estimates the metric M), with fixed
    noise (common random numbers across time). ``profile`` is the per-level epsilon-MSE."""

    def __init__(self, x0: torch.Tensor, levels: torch.Tensor, seed: int = 4321, batch: int | None = None):
        self.x0 = x0
        self.levels = torch.as_tensor(levels, dtype=torch.float64)
        self.batch = batch or x0.shape[0]
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((len(self.levels), *x0.shape), generator=g).to(x0.device, x0.dtype)

    @property
    def grid_logsnr(self) -> list[float]:
        return self.levels.tolist()

    @torch.no_grad()
    def profile(self, model, bf16: bool = False) -> list[float]:
        """epsilon-MSE at each level (mean over the images), (level, image) pairs ``batch`` at a time."""
        was_training = model.training
        model.eval()
        n, grid, device = self.x0.shape[0], len(self.levels), self.x0.device
        totals = torch.zeros(grid, dtype=torch.float64, device=device)
        lam = self.levels.to(device)
        try:
            for start in range(0, grid * n, self.batch):
                pair = torch.arange(start, min(start + self.batch, grid * n), device=device)
                j, i = pair // n, pair % n
                with autocast(device, bf16):
                    loss = level_loss(model, self.x0[i], lam[j], self.noise[j, i])
                totals.index_add_(0, j, loss.double())
        finally:
            model.train(was_training)
        return [total / n for total in totals.tolist()]
