"""The AKOD reward (version 3): the probe metric's weightings, a reward for every decision, the null controls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from akod_ray.rl.reward import REWARD_METRICS, centred, decision_rewards, metric_value, metric_weights, null_control

LAM = np.linspace(9.21, -10.13, 16)


def test_metric_weights_closed_forms():
    assert metric_weights("eps_uniform", LAM) == pytest.approx(np.full(16, 1 / 16))
    x0 = np.exp(-LAM)  # (1 - abar) / abar = e^-lambda: the x0-MSE
    assert metric_weights("x0", LAM) == pytest.approx(x0 / x0.sum())
    edm = metric_weights("eps_edm", LAM)
    assert edm.sum() == pytest.approx(1.0) and LAM[edm.argmax()] == pytest.approx(LAM[np.abs(LAM - 2.4).argmin()])
    lap = metric_weights("eps_laplace", LAM)
    assert lap.sum() == pytest.approx(1.0) and lap[0] / lap[7] == pytest.approx(math.exp(-(abs(LAM[0]) - abs(LAM[7]))))
    sig = metric_weights("eps_sigmoid", LAM)
    assert sig.sum() == pytest.approx(1.0) and np.all(np.diff(sig) > 0)  # more weight to noisier levels
    with pytest.raises(ValueError, match="rl.reward_metric"):
        metric_weights("fid", LAM)
    profile = np.linspace(0.5, 0.02, 16)
    for m in REWARD_METRICS:
        assert metric_value(m, profile, LAM) == pytest.approx(float(np.dot(metric_weights(m, LAM), profile)))


def test_a_credit_is_the_scaled_first_order_relative_fall_of_the_metric():
    d, losses = [2.0, -1.0, 0.5], [0.3, 0.2, 0.1]
    r = decision_rewards("credit", d, losses, lr=1e-3, batch=32, probe_loss=0.25, scale=1e4)
    assert r == pytest.approx([1e4 * 1e-3 * x / (32 * 0.25) for x in d])
    # the credits of a batch sum to its predicted relative fall: lr (P grad M) . (mean gradient) / M
    assert sum(r) / 1e4 == pytest.approx(1e-3 * np.mean(d) * 3 / 32 / 0.25)
    with pytest.raises(ValueError, match="metric must be > 0"):
        decision_rewards("credit", d, losses, 1e-3, 32, 0.0)


def test_the_papers_reward_is_minus_the_images_own_loss():
    assert decision_rewards("paper", [9.0, 9.0], [0.3, 0.05], 1e-3, 32, 0.2) == pytest.approx([-0.3, -0.05])
    with pytest.raises(ValueError, match="rl.reward must be one of"):
        decision_rewards("improvement", [1.0], [0.1], 1e-3, 32, 0.2)


def test_null_controls():
    r = [0.5, -1.0, 2.0, 0.25, 3.0]
    assert null_control(r, "none", 0) == r
    shuffled = null_control(r, "shuffle", 1)
    assert sorted(shuffled) == sorted(r) and shuffled != r
    assert null_control(r, "shuffle", 1) == shuffled  # seeded
    assert null_control(r, "constant", 0) == pytest.approx([np.mean(r)] * 5)
    assert null_control([], "constant", 0) == []
    with pytest.raises(ValueError, match="rl.null_reward"):
        null_control(r, "zero", 0)


def test_ppo_sees_a_windows_rewards_about_their_mean():
    assert centred([1.0, 2.0, 6.0]) == pytest.approx([-2.0, -1.0, 3.0])
    assert centred([0.4] * 5) == pytest.approx([0.0] * 5) and centred([]) == []
