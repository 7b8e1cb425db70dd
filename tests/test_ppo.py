"""PPO with the DKO as policy, against the real broker and a fake rank 0 that rewards schedules.

The fake rank 0 is a thread that takes schedules from the broker and posts a deterministic
reward (minus the distance of the schedule's log-SNR curve to a straight line), so the
test can check that PPO saw exactly the rewards the "workers" posted.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import ray
import torch

from akod_ray.config import Config, DiffusionConfig, DKOConfig, RLConfig, TrainConfig
from akod_ray.diffusion.dko import DKO, prior_actions, schedule_from_actions, uniform_logsnr_betas
from akod_ray.diffusion.schedules import validate_betas
from akod_ray.rl.broker import BrokerClient, BrokerClosedError, get_or_create_broker
from ray_helpers import FakeRank0
from akod_ray.rl.env import make_env_config
from akod_ray.rl.ppo import (
    broker_error,
    build_ppo,
    deterministic_schedule,
    load_policy_module,
    load_rl_state_dict,
    rl_state_dict,
)

pytestmark = pytest.mark.timeout(300)

RUN = "ppo-test"
CFG = Config(
    diffusion=DiffusionConfig(T=100, schedule="akod"),
    dko=DKOConfig(num_knots=4, hidden=(16, 16), probe_size=4),
    rl=RLConfig(train_batch=3, minibatch_size=6, num_epochs=2, broker_timeout_s=30.0),
    train=TrainConfig(steps=1000),
)


def schedule_reward(betas: list[float]) -> float:
    """Minus the distance of the log-SNR curve to a concave target (not the zero-action straight line)."""
    b = torch.tensor(betas, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    log_snr = torch.log(abar) - torch.log1p(-abar)
    u = torch.linspace(0, 1, len(betas), dtype=torch.float64)
    target = CFG.dko.logsnr_max + (CFG.dko.logsnr_min - CFG.dko.logsnr_max) * u.sqrt()
    return -float(((log_snr - target) ** 2).mean()) / 100


def fake_result(betas, step: int) -> dict:
    r = schedule_reward(betas)
    return {"reward": r, "ref_loss": 0.1 - r, "step": step}


@pytest.fixture(scope="module")
def setup():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    handle = get_or_create_broker(RUN)
    rank0 = FakeRank0(handle, fake_result)
    rank0.start()
    probe = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    env_config = make_env_config(CFG, probe, RUN)
    algo = build_ppo(CFG, env_config)
    yield {"algo": algo, "env_config": env_config, "rank0": rank0, "handle": handle}
    algo.stop()
    BrokerClient(handle, 5.0).close()
    rank0.join(timeout=10)
    ray.shutdown()


def test_policy_network_is_the_dko(setup):
    """Runs first: the untrained DKO's deterministic output is 0, i.e. the prior's schedule (dko.prior: the
    laplace anchor's knots by default)."""
    module = setup["algo"].get_module()
    assert isinstance(module.pi, DKO)
    assert [m.out_features for m in module.pi.body if hasattr(m, "out_features")] == list(CFG.dko.hidden)
    d, T = CFG.dko, CFG.diffusion.T
    prior = prior_actions(d.prior, T, d.num_knots, d.logsnr_max, d.logsnr_min, d.min_segment_share,
                          CFG.diffusion.laplace_scale, d.knot_spacing)
    expected = schedule_from_actions([0.0] * (d.num_knots - 1), T, d.num_knots, d.logsnr_max, d.logsnr_min,
                                     d.min_segment_share, d.knot_spacing, prior)
    torch.testing.assert_close(deterministic_schedule(setup["algo"], setup["env_config"]), expected,
                               rtol=1e-9, atol=1e-12)
    assert d.prior == "laplace" and not torch.allclose(
        expected, uniform_logsnr_betas(T, d.logsnr_max, d.logsnr_min), rtol=1e-3, atol=0)


def test_two_iterations_see_exactly_the_posted_rewards(setup):
    algo, rank0 = setup["algo"], setup["rank0"]
    for i in range(2):
        before = len(rank0.posted)
        result = algo.train()
        runners = result["env_runners"]
        new = rank0.posted[before:]
        assert len(new) == CFG.rl.train_batch == runners["num_episodes"]
        assert runners["episode_return_mean"] == pytest.approx(np.mean(new), rel=1e-9, abs=1e-12)
        assert runners["episode_return_min"] == pytest.approx(min(new), rel=1e-9, abs=1e-12)
        assert runners["episode_return_max"] == pytest.approx(max(new), rel=1e-9, abs=1e-12)
        assert runners["episode_len_mean"] == CFG.dko.num_knots - 1
    betas = deterministic_schedule(algo, setup["env_config"])
    validate_betas(betas, CFG.diffusion.T)


def test_policy_state_is_plain_tensors_and_rebuilds_the_schedule_at_its_context(setup):
    """What every Train checkpoint holds: the DKO's weights, the whole RLModule, the context; weights_only."""
    from akod_ray.diffusion.dko import DKOContext, learned_schedule
    from akod_ray.rl.env import make_observer
    from akod_ray.rl.ppo import policy_state

    algo, env_config = setup["algo"], setup["env_config"]
    ctx = DKOContext(progress=0.5, ref_loss=0.1, probe_seed=3)
    buf = io.BytesIO()
    torch.save(policy_state(algo, ctx), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"weights", "module", "context"} and state["context"]["probe_seed"] == 3
    betas = deterministic_schedule(algo, env_config, ctx)
    torch.testing.assert_close(learned_schedule(state, make_observer(env_config), CFG.dko.hidden), betas, rtol=0, atol=0)
    assert not torch.equal(betas, deterministic_schedule(algo, env_config))  # the context matters


def test_weights_as_plain_tensors(setup):
    algo, env_config = setup["algo"], setup["env_config"]
    betas = deterministic_schedule(algo, env_config)
    buf = io.BytesIO()
    torch.save(rl_state_dict(algo), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    module = load_policy_module(CFG, env_config, state)  # no Algorithm needed to export the schedule
    torch.testing.assert_close(deterministic_schedule(module, env_config), betas, rtol=0, atol=0)

    fresh = build_ppo(CFG, env_config)
    try:
        assert not torch.equal(deterministic_schedule(fresh, env_config), betas)
        load_rl_state_dict(fresh, state)
        torch.testing.assert_close(deterministic_schedule(fresh, env_config), betas, rtol=0, atol=0)
    finally:
        fresh.stop()


def test_closed_broker_stops_training_with_a_recognizable_error(setup):
    """Runs last: the driver closes the broker when the Train run ends; algo.train() must stop."""
    BrokerClient(setup["handle"], 5.0).close("Train run finished")
    with pytest.raises(Exception) as err:
        setup["algo"].train()
    found = broker_error(err.value)
    assert isinstance(found, BrokerClosedError) and "Train run finished" in str(found)
