"""The AKOD reward, decided in one place (DESIGN 1.4): one reward for every decision.

A decision is one training image's noise-level bin, drawn from the DKO's policy
(:mod:`akod_ray.diffusion.dko`). The workers measure, for each decision image, d_i: the directional
derivative of its training loss along AdamW's preconditioned gradient of the reward probe's metric M
(:mod:`akod_ray.training.credit`), and L_i, its loss. ``rl.reward`` turns them into rewards:

=======  =========================================================================================
credit   r_i = rl.reward_scale x lr d_i / (B M): the relative fall of the probe's metric that this
         image's share of the update causes, to first order (the credits of a step sum to the step's
         predicted relative fall). The metric is fixed (``rl.reward_metric``, the weighting that ranks
         checkpoints like fid_c10 does: bench/reward_referee.py), so the schedule cannot make it easy.
paper    r_i = -L_i: the paper's literal reward, the loss under the chosen noise level itself. Easy
         levels (very noisy ones, where predicting epsilon is trivial) score best without making the
         model better: tests/test_reward.py shows PPO drifting there.
=======  =========================================================================================

PPO sees each decision's reward relative to its window's mean (:func:`centred`): the decisions of a window
share its probe direction, learning rate and stage of training, so the window's mean says nothing about any
one decision; it only adds variance (and, with rewards constant within a window, a push on every decision of
a window alike, which moved the null control's distribution by 0.05 log-SNR in tests/test_akod_local.py).

Controls (``rl.null_reward``) replace the rewards by ones that carry no information about the
decisions before they reach PPO, keeping what the workers measured in the records: ``shuffle``
permutes an episode's rewards among its decisions, ``constant`` gives every decision the episode's
mean. With either, the distribution the trunk trains on must stay at the prior (tests/test_akod_local.py).
"""

from __future__ import annotations

import numpy as np

from akod_ray.training.credit import REWARD_METRICS, metric_value, metric_weights  # noqa: F401 (re-exported)

REWARDS = ("credit", "paper")
NULL_REWARDS = ("none", "shuffle", "constant")


def decision_rewards(kind: str, derivative, losses, lr: float, batch: int, probe_loss: float,
                     scale: float = 1.0) -> list[float]:
    """The rewards of a decision step's images (see the module docstring)."""
    if kind == "credit":
        if not probe_loss > 0:
            raise ValueError(f"the probe's metric must be > 0 to credit decisions, got {probe_loss!r}")
        d = np.asarray(derivative, dtype=np.float64)
        return (scale * lr * d / (batch * probe_loss)).tolist()
    if kind == "paper":
        return (-np.asarray(losses, dtype=np.float64)).tolist()
    raise ValueError(f"rl.reward must be one of {REWARDS}, got {kind!r}")


def centred(rewards) -> list[float]:
    """A window's rewards minus their mean: what PPO learns from (see the module docstring)."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean()).tolist() if r.size else []


def null_control(rewards, kind: str, seed: int) -> list[float]:
    """``rl.null_reward``: the rewards as measured (none), permuted (shuffle) or all their mean (constant)."""
    r = np.asarray(rewards, dtype=np.float64)
    if kind == "none":
        return r.tolist()
    if kind == "shuffle":
        return r[np.random.default_rng(seed).permutation(r.size)].tolist()
    if kind == "constant":
        return np.full(r.size, r.mean() if r.size else 0.0).tolist()
    raise ValueError(f"rl.null_reward must be one of {NULL_REWARDS}, got {kind!r}")
