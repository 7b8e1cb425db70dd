"""PPO with the DKO as policy, against the real broker and a fake rank 0 that rewards decisions.

The fake rank 0 is a thread that posts a window's decision slots, takes the window's decisions from the
broker and posts a deterministic reward per decision, so the tests can check that PPO saw exactly the
rewards the "workers" posted, that its categorical is the DKO's distribution, and that the policy's
state is plain tensors.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import ray
import torch

from akod_ray.config import Config, DiffusionConfig, DKOConfig, RLConfig, TrainConfig
from akod_ray.diffusion.dko import DKO, DKOContext, DKOPolicy, NoiseBins, observations
from akod_ray.rl.broker import BrokerClient, BrokerClosedError, get_or_create_broker
from akod_ray.rl.env import make_env_config
from akod_ray.rl.ppo import (
    broker_error,
    build_ppo,
    explore_without_learning,
    load_rl_state_dict,
    policy_state,
    rl_state_dict,
)
from ray_helpers import FakeRank0

pytestmark = pytest.mark.timeout(300)

RUN = "ppo-test"
CFG = Config(
    diffusion=DiffusionConfig(T=100, schedule="akod"),
    dko=DKOConfig(bins=8, hidden=(16, 16), prior="loglinear"),
    rl=RLConfig(segment_steps=10, decision_every=5, decision_images=4, train_batch=3, minibatch_size=12,
                num_epochs=2, broker_timeout_s=30.0),
    train=TrainConfig(steps=1000, batch_size=8, ckpt_every=10),
)


def rewards(decisions, slots, step) -> list[float]:
    return [-abs(d - 2) / 4 for d in decisions]


@pytest.fixture(scope="module")
def setup():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    handle = get_or_create_broker(RUN)
    rank0 = FakeRank0(handle, rewards)
    rank0.start()
    algo = build_ppo(CFG, make_env_config(CFG, RUN))
    yield {"algo": algo, "rank0": rank0, "handle": handle}
    algo.stop()
    BrokerClient(handle, 5.0).close()
    rank0.join(timeout=10)
    ray.shutdown()


def module_probs(algo, obs: torch.Tensor) -> torch.Tensor:
    from ray.rllib.core.columns import Columns

    out = algo.get_module().forward_inference({Columns.OBS: obs})
    return torch.softmax(out[Columns.ACTION_DIST_INPUTS], -1)


def test_policy_network_is_the_dko_and_starts_at_the_prior(setup):
    """Runs first: RLlib's categorical is the DKO's distribution; the untrained DKO is the prior's bin masses."""
    module = setup["algo"].get_module()
    assert isinstance(module.pi, DKO)
    assert [m.out_features for m in module.pi.body if hasattr(m, "out_features")] == list(CFG.dko.hidden)
    obs = observations(torch.tensor([-2.0, -1.0, -3.0]), DKOContext(progress=0.3, probe_loss=0.4))
    mass = NoiseBins(CFG.diffusion.T, CFG.dko.bins).mass.float()
    torch.testing.assert_close(module_probs(setup["algo"], obs), mass.expand(3, -1), rtol=1e-6, atol=1e-7)


def test_two_iterations_see_exactly_the_posted_rewards(setup):
    algo, rank0 = setup["algo"], setup["rank0"]
    for _ in range(2):
        before = len(rank0.posted)
        result = algo.train()
        runners = result["env_runners"]
        new = rank0.posted[before:]
        assert len(new) == CFG.rl.train_batch == runners["num_episodes"]
        # every decision's reward reached the episode, centred on its window's mean: the returns are 0
        assert any(np.std(r) > 0 for r in new)
        assert runners["episode_return_mean"] == pytest.approx(0.0, abs=1e-9)
        assert runners["episode_len_mean"] == 8  # two decision steps of four images
        learner = result["learners"]["default_policy"]
        assert learner["prior_kl"] >= 0.0
    for req in rank0.requests:  # every request carries the DKO state its decisions were drawn from
        assert len(req["decisions"]) == 8 and len(req["slots"]) == 8 and "context" in req


def test_policy_state_is_plain_tensors_and_the_workers_policy_is_rllibs(setup):
    """What every request and Train checkpoint holds: the DKO's weights, the whole RLModule, the context;
    weights_only. The workers' DKOPolicy built from it gives RLlib's probabilities."""
    algo = setup["algo"]
    ctx = DKOContext(progress=0.5, probe_loss=0.1)
    buf = io.BytesIO()
    torch.save(policy_state(algo, ctx, iteration=7), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"weights", "module", "context", "iteration"} and state["iteration"] == 7
    features = torch.tensor([-2.5, -1.2])
    policy = DKOPolicy(state, NoiseBins(CFG.diffusion.T, CFG.dko.bins), CFG.dko.floor, CFG.dko.hidden, 7)
    torch.testing.assert_close(policy.probs(features), module_probs(algo, observations(features, ctx)),
                               rtol=1e-5, atol=1e-6)


def test_weights_as_plain_tensors(setup):
    algo = setup["algo"]
    obs = observations(torch.tensor([-2.0, -1.5]), DKOContext())
    probs = module_probs(algo, obs)
    buf = io.BytesIO()
    torch.save(rl_state_dict(algo), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_ppo(CFG, make_env_config(CFG, RUN))
    try:
        assert not torch.allclose(module_probs(fresh, obs), probs)  # PPO moved the policy
        load_rl_state_dict(fresh, state)
        torch.testing.assert_close(module_probs(fresh, obs), probs, rtol=0, atol=0)
    finally:
        fresh.stop()


def test_the_frozen_control_explores_without_updating(setup):
    algo, rank0 = setup["algo"], setup["rank0"]
    before = rl_state_dict(algo)
    n = len(rank0.posted)
    out = explore_without_learning(algo, 2)
    assert out["env_runners"]["num_episodes"] >= 2 and len(rank0.posted) >= n + 2
    after = rl_state_dict(algo)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_closed_broker_stops_training_with_a_recognizable_error(setup):
    """Runs last: the driver closes the broker when the Train run ends; algo.train() must stop."""
    BrokerClient(setup["handle"], 5.0).close("Train run finished")
    with pytest.raises(Exception) as err:
        setup["algo"].train()
    found = broker_error(err.value)
    assert isinstance(found, BrokerClosedError) and "Train run finished" in str(found)
