"""PPO learns: on a task with a known optimum, served through the real broker actor and the real
DecisionEnv, the DKO learns to put each image where its reward is (issue 11, version 3).

The fake rank 0 rewards a decision by how close its bin is to a target that depends on the image's
feature (its log sigma_local, the slot): images with a high local variance want bin 1, the others bin 6.
The DKO starts at the prior (every bin equally likely); after PPO its probability of the right bin for
each kind of image must have risen far above the prior's, and its expected reward with it, while the
pull towards the prior (rl.kl_coeff) keeps every bin above its floor.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from akod_ray.config import Config, DiffusionConfig, DKOConfig, RLConfig, TrainConfig
from akod_ray.diffusion.dko import DKOContext, NoiseBins, observations
from akod_ray.rl.broker import BrokerClient, get_or_create_broker
from akod_ray.rl.env import make_env_config
from akod_ray.rl.ppo import build_ppo
from ray_helpers import FakeRank0

RUN = "ppo-learns"
CFG = Config(
    diffusion=DiffusionConfig(T=100, schedule="akod"),
    dko=DKOConfig(bins=8, hidden=(16, 16), prior="loglinear"),
    rl=RLConfig(segment_steps=10, decision_every=5, decision_images=4, train_batch=8, minibatch_size=32,
                num_epochs=6, lr=3e-3, broker_timeout_s=30.0),
    train=TrainConfig(steps=1000, batch_size=8, ckpt_every=10, seed=0),
)


def target(slot: float) -> int:
    return 1 if slot > -2.0 else 6


def rewards(decisions, slots, step) -> list[float]:
    return [-abs(d - target(s)) / 7 for d, s in zip(decisions, slots)]


def probs_of(algo, slots) -> np.ndarray:
    from ray.rllib.core.columns import Columns

    obs = observations(torch.tensor(slots), DKOContext(progress=0.5, probe_loss=0.5))
    out = algo.get_module().forward_inference({Columns.OBS: obs})
    return torch.softmax(out[Columns.ACTION_DIST_INPUTS], -1).detach().numpy()


@pytest.mark.timeout(240)
def test_ppo_learns_where_each_image_is_rewarded():
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    handle = get_or_create_broker(RUN)
    rank0 = FakeRank0(handle, rewards)
    rank0.start()
    algo = build_ppo(CFG, make_env_config(CFG, RUN))
    try:
        t0 = time.monotonic()
        start = probs_of(algo, [-1.5, -2.5])
        for _ in range(15):
            algo.train()
        elapsed = time.monotonic() - t0
        learned = probs_of(algo, [-1.5, -2.5])
    finally:
        algo.stop()
        BrokerClient(handle, 5.0).close()
        rank0.join(timeout=10)
        ray.shutdown()
    mass = NoiseBins(CFG.diffusion.T, CFG.dko.bins).mass.numpy()
    # the measured rewards (PPO sees them about each window's mean), per iteration of 8 windows
    returns = [float(np.mean(sum(rank0.posted[8 * i:8 * i + 8], []))) for i in range(15)]
    print(f"mean reward per iteration {np.round(returns, 2).tolist()} in {elapsed:.1f} s; P(target): start "
          f"{start[0, 1]:.3f}, {start[1, 6]:.3f}; learned {learned[0, 1]:.3f}, {learned[1, 6]:.3f}")
    assert start[0, 1] == pytest.approx(mass[1], rel=1e-5) and start[1, 6] == pytest.approx(mass[6], rel=1e-5)
    assert learned[0, 1] > 3 * mass[1] and learned[1, 6] > 3 * mass[6]  # each kind of image, its own bin
    first, last = float(np.mean(returns[:3])), float(np.mean(returns[-3:]))
    assert last > first + 0.3 * abs(first), (first, last)
    assert (learned >= CFG.dko.floor * mass - 1e-6).all()  # the floor holds
