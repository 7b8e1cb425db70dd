"""PPO learns: on a task with a known optimum, served through the real broker actor and the real
ScheduleEnv, the mean return of the last PPO iterations beats the first ones' (issue 11).

The fake rank 0 scores each schedule by how close its log-SNR curve is to a target that is not
the DKO's starting point (uniform in log-SNR): a concave curve that spends its first knots at
high log-SNR. The optimum (reward 0) is reachable by the knot builder; the start is far from it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from akod_ray.config import Config, DiffusionConfig, DKOConfig, RLConfig, TrainConfig
from akod_ray.rl.broker import BrokerClient, get_or_create_broker
from akod_ray.rl.env import make_env_config
from akod_ray.rl.ppo import build_ppo, deterministic_schedule
from ray_helpers import FakeRank0

RUN = "ppo-learns"
CFG = Config(
    diffusion=DiffusionConfig(T=100, schedule="akod"),
    # the start uniform in log-SNR with evenly spaced knots, where the optimum below is reachable exactly
    dko=DKOConfig(num_knots=4, hidden=(16, 16), probe_size=4, probe_pool=16, prior="loglinear", knot_spacing="uniform"),
    rl=RLConfig(train_batch=12, minibatch_size=24, num_epochs=8, lr=3e-3, broker_timeout_s=30.0),
    train=TrainConfig(steps=1000, seed=0),
)


def reward_of(betas) -> float:
    b = torch.as_tensor(betas, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    log_snr = torch.log(abar) - torch.log1p(-abar)
    u = torch.linspace(0, 1, len(b), dtype=torch.float64)
    target = CFG.dko.logsnr_max + (CFG.dko.logsnr_min - CFG.dko.logsnr_max) * u**2  # slow start, fast end
    return -float(((log_snr - target) ** 2).mean()) / 10


@pytest.mark.timeout(180)
def test_ppo_return_rises_on_a_task_with_a_known_optimum():
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    handle = get_or_create_broker(RUN)
    rank0 = FakeRank0(handle, lambda betas, step: {"reward": reward_of(betas), "ref_loss": 0.1, "step": step})
    rank0.start()
    probe = np.random.default_rng(0).uniform(-1, 1, (16, 3, 16, 16)).astype(np.float32)
    env_config = make_env_config(CFG, probe, RUN)
    algo = build_ppo(CFG, env_config)
    try:
        t0 = time.monotonic()
        start = reward_of(deterministic_schedule(algo, env_config))
        returns = [algo.train()["env_runners"]["episode_return_mean"] for _ in range(15)]
        elapsed = time.monotonic() - t0
        learned = reward_of(deterministic_schedule(algo, env_config))
    finally:
        algo.stop()
        BrokerClient(handle, 5.0).close()
        rank0.join(timeout=10)
        ray.shutdown()
    first, last = float(np.mean(returns[:3])), float(np.mean(returns[-3:]))
    print(f"PPO returns {returns}; deterministic schedule's reward {start:.4f} -> {learned:.4f} in {elapsed:.1f} s")
    assert last > first + 0.5 * abs(first), (first, last)  # the stochastic policy's return halves its gap to 0
    assert learned > start + 0.5 * abs(start), (start, learned)  # and so does the deterministic schedule
