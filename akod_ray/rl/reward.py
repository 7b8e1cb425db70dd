"""The AKOD reward, decided in one place (DESIGN 1.4).

The reward probe (``rl.reward_images`` held-out images at ``rl.reward_grid`` log-SNR points
lambda_j, uniform between the DKO's endpoints, with fixed noise) gives the denoiser's
epsilon-MSE profile l_j. A metric weighs the profile into one number, M = sum_j c_j l_j:

===========  ======================================================================================
eps_uniform  c_j = 1 / J: the plain mean (the reference loss's form)
x0           c_j = e^{-lambda_j} / J: the x0-MSE, (1 - abar) / abar times the epsilon-MSE
eps_edm      c_j proportional to the density of N(2.4, 2.4^2) at lambda_j (EDM's noise levels)
eps_laplace  c_j proportional to the density of Laplace(0, 1) at lambda_j
eps_sigmoid  c_j proportional to sigmoid(2 - lambda_j) (Kingma & Gao 2023's sigmoid weighting)
===========  ======================================================================================

Which metric predicts the referee (fid_c10) best is measured, not assumed: bench/reward_referee.py
ranks checkpoints of several arms and budgets by each and by fid_c10 (BENCHMARKS.md).

A result posted by the workers for one proposed schedule holds ``before_profile`` (the probe's
profile where the segment or branch started), ``after_profile`` (after training with the
proposal), ``profile_logsnr`` and, with ``rl.reward=paper``, ``paper_loss``:

=============  ===============================================================================
improvement    (M_before - M_after) / M_before: the relative fall of the metric over the segment.
               The level falls with training whatever the schedule; dividing by where the segment
               started removes most of that drift (measured in BENCHMARKS.md, "AKOD reward").
reference      -M_after: the level (cannot be gamed, but mostly training drift).
paper          -paper_loss: the paper's literal reward, the loss under the proposed schedule
               itself; a schedule that makes its own task easy scores well without making the
               model better (tests/test_akod_ray.py shows it).
=============  ===============================================================================

Credit per knot (``rl.credit=knot``, improvement only): knot k's action sets where segment k
ends, so it is credited with c_j (l_j^before - l_j^after) / M_before summed over the grid points
whose lambda_j lies in segment k's log-SNR range (lambda_{k+1}, lambda_k]; the last action sets
both remaining segments and takes both shares. The K - 1 knot rewards sum to the episode's
reward. Every reward is multiplied by ``rl.reward_scale``.
"""

from __future__ import annotations

import math

import numpy as np

from akod_ray.diffusion.schedules import EDM_LOGSNR_MEAN, EDM_LOGSNR_STD

REWARD_METRICS = ("eps_uniform", "x0", "eps_edm", "eps_laplace", "eps_sigmoid")


def metric_weights(metric: str, logsnr) -> np.ndarray:
    """c_j of ``metric`` at the grid's log-SNR values (see the module docstring)."""
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
    return w / lam.size if metric in ("eps_uniform", "x0") else w / w.sum()


def metric_value(metric: str, profile, logsnr) -> float:
    """M = sum_j c_j l_j."""
    return float(np.dot(metric_weights(metric, logsnr), np.asarray(profile, dtype=np.float64)))


def knot_credit(metric: str, before, after, logsnr, knot_logsnr) -> list[float]:
    """The K - 1 knot shares of the relative improvement (unscaled; they sum to the episode's)."""
    c = metric_weights(metric, logsnr)
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    gain = c * (before - after) / float(np.dot(c, before))
    lam, knots = np.asarray(logsnr, dtype=np.float64), np.asarray(knot_logsnr, dtype=np.float64)
    K = knots.size - 1
    # segment of each grid point: k with knots[k+1] < lam <= knots[k]; beyond the ends: the end segments
    seg = np.clip(np.searchsorted(-knots, -lam, side="right") - 1, 0, K - 1)
    per_segment = np.bincount(seg, weights=gain, minlength=K)
    return [*per_segment[:K - 2].tolist(), float(per_segment[K - 2] + per_segment[K - 1])]


def reward_from(result: dict, kind: str, metric: str = "eps_uniform", scale: float = 1.0) -> float:
    """The episode's reward from a posted result (see the module docstring)."""
    if kind == "improvement":
        before = metric_value(metric, result["before_profile"], result["profile_logsnr"])
        after = metric_value(metric, result["after_profile"], result["profile_logsnr"])
        return scale * (before - after) / before if before > 0 and math.isfinite(before) else math.nan
    if kind == "reference":
        return -scale * metric_value(metric, result["after_profile"], result["profile_logsnr"])
    if kind == "paper":
        return -scale * float(result["paper_loss"])
    raise ValueError(f"rl.reward must be improvement, reference or paper, got {kind!r}")


def knot_rewards(result: dict, metric: str, knot_logsnr, scale: float = 1.0) -> list[float]:
    """Credit per knot (improvement only): scaled, summing to :func:`reward_from`."""
    return [scale * r for r in knot_credit(metric, result["before_profile"], result["after_profile"],
                                           result["profile_logsnr"], knot_logsnr)]
