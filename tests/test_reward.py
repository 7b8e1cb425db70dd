"""The AKOD reward: metric weightings of the probe's profile, the improvement, and credit per knot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from akod_ray.rl.reward import REWARD_METRICS, knot_credit, knot_rewards, metric_value, metric_weights, reward_from

LAM = np.linspace(9.21, -10.13, 16)


def test_metric_weights_closed_forms():
    assert metric_weights("eps_uniform", LAM) == pytest.approx(np.full(16, 1 / 16))
    assert metric_weights("x0", LAM) == pytest.approx(np.exp(-LAM) / 16)  # (1 - abar) / abar = e^-lambda
    edm = metric_weights("eps_edm", LAM)
    assert edm.sum() == pytest.approx(1.0) and LAM[edm.argmax()] == pytest.approx(LAM[np.abs(LAM - 2.4).argmin()])
    lap = metric_weights("eps_laplace", LAM)
    assert lap.sum() == pytest.approx(1.0) and lap[0] / lap[7] == pytest.approx(math.exp(-(abs(LAM[0]) - abs(LAM[7]))))
    sig = metric_weights("eps_sigmoid", LAM)
    assert sig.sum() == pytest.approx(1.0) and np.all(np.diff(sig) > 0)  # more weight to noisier levels
    with pytest.raises(ValueError, match="rl.reward_metric"):
        metric_weights("fid", LAM)


def test_x0_metric_is_the_x0_mse():
    profile = np.linspace(0.3, 0.01, 16)
    assert metric_value("x0", profile, LAM) == pytest.approx(np.mean(profile * np.exp(-LAM)))


@pytest.mark.parametrize("metric", REWARD_METRICS)
def test_improvement_reward_is_the_relative_fall_of_the_metric_scaled(metric):
    before = np.linspace(0.5, 0.02, 16)
    after = before * np.linspace(0.97, 1.0, 16)
    result = {"before_profile": before, "after_profile": after, "profile_logsnr": LAM}
    b, a = metric_value(metric, before, LAM), metric_value(metric, after, LAM)
    assert reward_from(result, "improvement", metric, 100.0) == pytest.approx(100 * (b - a) / b, rel=1e-12)
    assert reward_from(result, "reference", metric, 2.0) == pytest.approx(-2 * a)
    assert reward_from({"paper_loss": 0.3}, "paper", metric, 10.0) == pytest.approx(-3.0)


def test_knot_credit_splits_the_improvement_by_the_segment_each_level_falls_in():
    before = np.full(16, 0.1)
    after = before.copy()
    after[[0, 1]] -= 0.01  # lambda 9.21, 7.92: segment 0 (down to knot 1 = 7.0)
    after[5] -= 0.02  # lambda 2.76: segment 1 (7.0 > lambda >= 0.0)
    after[15] -= 0.04  # lambda -10.13 = lambda_min: the last segment
    knots = [9.21, 7.0, 0.0, -5.0, -10.13]  # K = 4 segments, 3 actions
    credit = knot_credit("eps_uniform", before, after, LAM, knots)
    assert len(credit) == 3
    assert credit[0] == pytest.approx(0.02 / 16 / 0.1)
    assert credit[1] == pytest.approx(0.02 / 16 / 0.1)
    assert credit[2] == pytest.approx(0.04 / 16 / 0.1)  # the last action sets segments 2 and 3: both shares
    result = {"before_profile": before, "after_profile": after, "profile_logsnr": LAM}
    assert sum(knot_rewards(result, "eps_uniform", knots, 100.0)) == pytest.approx(
        reward_from(result, "improvement", "eps_uniform", 100.0), rel=1e-12)
    # a level exactly on a knot belongs to the segment above it (lambda_{k+1} < lambda <= lambda_k)
    on_knot = knot_credit("eps_uniform", [1.0, 1.0], [0.5, 1.0], [7.0, -9.0], knots)
    assert on_knot[1] == pytest.approx(0.25) and on_knot[0] == 0.0


def test_credit_per_knot_rewrites_an_episodes_rewards_before_the_learner_sees_them():
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from akod_ray.rl.env import credit_per_knot

    episode = SingleAgentEpisode()
    episode.add_env_reset(observation=np.zeros(6, np.float32), infos={})
    credit = [0.5, -0.25, 1.0]
    for k in range(3):
        last = k == 2
        episode.add_env_step(observation=np.zeros(6, np.float32), action=np.zeros(1, np.float32),
                             reward=sum(credit) if last else 0.0, terminated=last,
                             infos={"knot_rewards": credit} if last else {})
    credit_per_knot(episode=episode)
    assert list(episode.get_rewards()) == credit and episode.get_return() == pytest.approx(1.25)
    # an episode without knot rewards keeps its reward at the last step
    plain = SingleAgentEpisode()
    plain.add_env_reset(observation=np.zeros(6, np.float32), infos={})
    plain.add_env_step(observation=np.zeros(6, np.float32), action=np.zeros(1, np.float32), reward=2.0,
                       terminated=True, infos={})
    credit_per_knot(episode=plain)
    assert list(plain.get_rewards()) == [2.0]


def test_ppo_installs_the_credit_callback_only_with_knot_credit():
    from akod_ray.config import load_config
    from akod_ray.rl.env import credit_per_knot
    from akod_ray.rl.ppo import ppo_config

    base = ["diffusion.schedule=akod", "rl.segment_steps=10", "train.ckpt_every=100"]
    knot = ppo_config(load_config(None, base + ["rl.credit=knot"]), {})
    episode = ppo_config(load_config(None, base + ["rl.credit=episode"]), {})
    assert knot.callbacks_on_episode_end is credit_per_knot
    assert episode.callbacks_on_episode_end in (None, []) or not callable(episode.callbacks_on_episode_end)
