"""DecisionEnv: gymnasium API, observations from the workers' slots, one reward per decision, the null controls.

Most tests inject a fake broker client (no Ray); the last two use the real broker actor.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from akod_ray.config import Config, DiffusionConfig, DKOConfig, RLConfig, TrainConfig
from akod_ray.diffusion.dko import OBS_DIM
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClosedError
from akod_ray.rl.env import DecisionEnv, decision_rewards_callback, make_env_config

SLOTS = [-1.5, -2.0, -1.0, -2.5]


def make_cfg(timeout_s: float = 600.0, null_reward: str = "none") -> Config:
    return Config(diffusion=DiffusionConfig(T=1000, schedule="akod"), dko=DKOConfig(bins=16, hidden=(8,)),
                  rl=RLConfig(broker_timeout_s=timeout_s, null_reward=null_reward), train=TrainConfig(steps=1000))


def credit_of(decisions: list[int]) -> list[float]:
    """A deterministic reward per decision: the bin's distance from bin 5."""
    return [-abs(d - 5) / 10 for d in decisions]


class FakeBrokerClient:
    """The env-side BrokerClient methods; the workers answer at once."""

    def __init__(self, slots=SLOTS):
        self.submitted: list[dict] = []
        self.state = {"kind": "state", "step": 0, "slots": list(slots), "context": {"progress": 0.0, "probe_loss": 0.8}}
        self.closed = False

    def wait_state(self, timeout_s=None, after_step=None):
        if self.closed or (after_step is not None and self.state["step"] <= after_step):
            raise BrokerClosedError("cannot wait: closed")
        return dict(self.state)

    def policy_state(self):
        return {"weights": None, "iteration": 3}

    def submit(self, request: dict) -> int:
        if self.closed:
            raise BrokerClosedError("cannot submit: closed")
        self.submitted.append(request)
        return len(self.submitted) - 1

    def wait_result(self, request_id: int) -> dict:
        req = self.submitted[request_id]
        step = self.state["step"] + 10
        self.state = {"kind": "trunk", "step": step, "slots": list(SLOTS[:3]),
                      "context": {"progress": step / 1000, "probe_loss": 0.7}}
        return {"step": step, "rewards": credit_of(req["decisions"]), **self.state}


def make_env(client=None, **kw) -> tuple[DecisionEnv, FakeBrokerClient]:
    client = client or FakeBrokerClient()
    cfg = make_env_config(make_cfg(**kw), "test", broker_client_factory=lambda _cfg: client)
    return DecisionEnv(cfg), client


def run_episode(env: DecisionEnv, actions) -> tuple[list[np.ndarray], dict]:
    obs, _ = env.reset()
    seen = [obs]
    for i, a in enumerate(actions):
        obs, r, term, trunc, info = env.step(a)
        assert r == 0.0  # the rewards come per decision, written by the callback
        assert term == (i == len(actions) - 1) and not trunc
        seen.append(obs)
    return seen, info


def test_the_env_passes_gymnasiums_checker():
    env, _ = make_env()
    check_env(env, skip_render_check=True)


def test_observations_are_the_slots_in_the_windows_context():
    env, _ = make_env()
    obs, info = env.reset()
    assert env.observation_space.shape == (OBS_DIM,) and env.action_space.n == 16
    assert obs.tolist() == pytest.approx([SLOTS[0], 0.0, math.log(0.8)], rel=1e-6)
    seen, _ = run_episode(env, [1, 2, 3, 4])
    assert [o[0] for o in seen[:4]] == pytest.approx(SLOTS, rel=1e-6)


def test_the_window_is_submitted_with_its_decisions_slots_context_and_policy_and_every_decision_gets_its_reward():
    env, client = make_env()
    _, info = run_episode(env, [5, 0, 9, 5])
    req = client.submitted[0]
    assert req["decisions"] == [5, 0, 9, 5] and req["slots"] == SLOTS
    assert req["context"] == {"progress": 0.0, "probe_loss": 0.8} and req["dko"] == {"weights": None, "iteration": 3}
    measured = credit_of([5, 0, 9, 5])
    assert info["measured"] == measured
    assert info["rewards"] == pytest.approx([r - np.mean(measured) for r in measured])  # centred on the window
    # the next episode sees the next window's slots and context (the result's state)
    obs, _ = env.reset()
    assert obs.tolist() == pytest.approx([SLOTS[0], 0.01, math.log(0.7)], rel=1e-6)
    run_episode(env, [1, 1, 1])  # three slots this time
    assert len(client.submitted[1]["decisions"]) == 3


def test_the_callback_writes_one_reward_per_decision_into_the_episode():
    class Episode:
        def __init__(self, n, infos):
            self.n, self.infos, self.rewards = n, infos, None

        def __len__(self):
            return self.n

        def get_infos(self, i):
            return self.infos

        def set_rewards(self, new_data):
            self.rewards = new_data

    ep = Episode(3, {"rewards": [0.1, -0.2, 0.3]})
    decision_rewards_callback(episode=ep)
    assert ep.rewards == [0.1, -0.2, 0.3]
    ep = Episode(3, {"closed": True})  # a window the run ended under: no rewards to write
    decision_rewards_callback(episode=ep)
    assert ep.rewards is None


def test_the_null_controls_keep_the_measured_rewards_and_hand_ppo_none_of_their_information():
    decisions = [0, 5, 9, 3]
    measured = credit_of(decisions)
    centred = [r - np.mean(measured) for r in measured]
    env, _ = make_env(null_reward="shuffle")
    _, info = run_episode(env, decisions)
    assert info["measured"] == measured
    assert sorted(info["rewards"]) == pytest.approx(sorted(centred)) and info["rewards"] != pytest.approx(centred)
    env, _ = make_env(null_reward="constant")
    _, info = run_episode(env, decisions)
    assert info["rewards"] == pytest.approx([0.0] * 4)


def test_a_run_that_ends_while_a_window_waits_ends_the_episode_quietly_and_the_next_reset_raises():
    class Closing(FakeBrokerClient):
        def wait_result(self, request_id):
            self.closed = True
            raise BrokerClosedError("cannot wait for the result: the schedule broker is closed (the run ended)")

    env, _ = make_env(client=Closing())
    env.reset()
    for a in (1, 2, 3):
        env.step(a)
    _, r, term, trunc, info = env.step(4)
    assert (r, term, trunc, info) == (0.0, False, True, {"closed": True})
    with pytest.raises(BrokerClosedError):
        env.reset()


def test_a_last_window_without_slots_waits_for_the_run_to_end():
    env, client = make_env(client=FakeBrokerClient(slots=[]))
    with pytest.raises(BrokerClosedError):
        env.reset()  # no further state will come: it waited for a later one, and the broker says the run ended


@pytest.mark.parametrize("action", [-1, 16, 100])
def test_an_action_outside_the_bins_is_an_error(action):
    env, _ = make_env()
    env.reset()
    with pytest.raises(ValueError, match="must be a bin in"):
        env.step(action)


def test_step_before_reset_is_an_error():
    env, _ = make_env()
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)


def test_a_result_with_the_wrong_number_of_rewards_is_an_error():
    class Short(FakeBrokerClient):
        def wait_result(self, request_id):
            return {"rewards": [0.1], "step": 10}

    env, _ = make_env(client=Short())
    env.reset()
    for a in (1, 2, 3):
        env.step(a)
    with pytest.raises(ValueError, match="posted 1 rewards .* for the 4 decisions"):
        env.step(4)


# ----------------------------------------------------------------- with the real broker actor


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(120)
def test_env_with_real_broker_gets_the_workers_rewards(ray_local):
    from akod_ray.rl.broker import BrokerClient, get_or_create_broker

    handle = get_or_create_broker("env-real")
    posted = {}

    def rank0():
        c = BrokerClient(handle, timeout_s=30)
        c.post_state({"kind": "state", "step": 0, "slots": SLOTS[:2], "context": {"progress": 0.0, "probe_loss": 0.9}})
        req = c.next_request(30.0, resume=True)
        assert req is not None
        rid, request = req
        posted[rid] = {"kind": "trunk", "step": 500, "rewards": credit_of(request["decisions"]), "slots": SLOTS,
                       "context": {"progress": 0.5, "probe_loss": 0.6}}
        c.post_result(rid, posted[rid])

    th = threading.Thread(target=rank0)
    th.start()
    env = DecisionEnv(make_env_config(make_cfg(timeout_s=30.0), "env-real"))
    _, info = run_episode(env, [2, 7])
    th.join(timeout=30)
    assert info["measured"] == posted[info["request_id"]]["rewards"] == credit_of([2, 7])
    assert info["rewards"] == pytest.approx([-0.05, 0.05])  # -0.3 and -0.2 about their mean
    assert env.reset()[0][1] == pytest.approx(0.5)  # progress from the result's context


@pytest.mark.timeout(120)
def test_env_fails_within_the_timeout_when_no_worker_answers(ray_local):
    from akod_ray.rl.broker import BrokerClient, get_or_create_broker

    handle = get_or_create_broker("env-timeout")
    BrokerClient(handle, timeout_s=30).post_state({"kind": "state", "step": 0, "slots": SLOTS[:2], "context": {}})
    env = DecisionEnv(make_env_config(make_cfg(timeout_s=2.0), "env-timeout"))
    env.reset()
    env.step(0)
    t0 = time.monotonic()
    with pytest.raises(BrokerTimeoutError) as err:
        env.step(1)
    elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed < 2.0 + 3.0
    msg = str(err.value)
    assert "no result for schedule request 0 from the Ray Train workers within 2 s" in msg
    assert "gone or stuck" in msg and "never took the request" in msg
