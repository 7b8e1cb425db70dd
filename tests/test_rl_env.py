"""ScheduleEnv: gymnasium API, deterministic observations, the reward the workers post.

Most tests inject a fake broker client (no Ray); the last two use the real broker actor.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from akod_ray.config import Config, DiffusionConfig, DKOConfig, RLConfig, TrainConfig
from akod_ray.diffusion.dko import OBS_DIM, gaussian_kernel, schedule_from_actions
from akod_ray.diffusion.schedules import validate_betas
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.env import ACTION_BOUND, ScheduleEnv, make_env_config

T, K, P = 50, 4, 4


def make_cfg(timeout_s: float = 600.0) -> Config:
    return Config(
        diffusion=DiffusionConfig(T=T, schedule="akod"),
        dko=DKOConfig(num_knots=K, kernel_size=5, hidden=(8,), probe_size=P),
        rl=RLConfig(broker_timeout_s=timeout_s),
        train=TrainConfig(steps=1000),
    )


def probe_images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (P, 3, 16, 16)).astype(np.float32)


def schedule_reward(betas: list[float]) -> float:
    """A deterministic function of the schedule: minus the squared distance of its log-SNR to a line."""
    b = torch.tensor(betas, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    log_snr = torch.log(abar) - torch.log1p(-abar)
    target = torch.linspace(9.21, -10.13, len(betas), dtype=torch.float64)
    return -float(((log_snr - target) ** 2).mean()) / 100


class FakeBrokerClient:
    """The env-side BrokerClient methods, answering at once with a deterministic result."""

    def __init__(self, env_config=None):
        self.submitted: list[dict] = []
        self.posted: dict[int, dict] = {}
        self.latest: dict | None = None

    def submit(self, schedule: dict) -> int:
        self.submitted.append(schedule)
        return len(self.submitted) - 1

    def wait_result(self, request_id: int) -> dict:
        r = schedule_reward(self.submitted[request_id]["betas"])
        result = {"reward": r, "ref_loss": 0.1 - r, "paper_loss": 0.5, "step": 100 * (request_id + 1)}
        self.posted[request_id] = result
        self.latest = result
        return result

    def latest_result(self):
        return self.latest


def make_env(probe=None, client=None, **kw) -> tuple[ScheduleEnv, FakeBrokerClient]:
    client = client or FakeBrokerClient()
    cfg = make_env_config(make_cfg(), probe_images() if probe is None else probe, "test",
                          broker_client_factory=lambda _cfg: client, **kw)
    return ScheduleEnv(cfg), client


def run_episode(env: ScheduleEnv, actions) -> tuple[list[np.ndarray], list[float], dict]:
    obs, _ = env.reset()
    seen, rewards = [obs], []
    for i, a in enumerate(actions):
        obs, r, term, trunc, info = env.step(np.array([a], dtype=np.float32))
        seen.append(obs)
        rewards.append(r)
        assert term == (i == len(actions) - 1) and not trunc
    return seen, rewards, info


def test_passes_gymnasium_check_env():
    env, _ = make_env()
    check_env(env, skip_render_check=True)


def test_spaces_and_episode_shape():
    env, client = make_env()
    assert env.observation_space.shape == (OBS_DIM,) and env.observation_space.dtype == np.float32
    assert env.action_space.shape == (1,) and env.action_space.high[0] == ACTION_BOUND
    seen, rewards, info = run_episode(env, [0.0] * (K - 1))
    assert all(o in env.observation_space for o in seen)
    assert rewards[:-1] == [0.0] * (K - 2)
    assert len(client.submitted) == 1
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(1, np.float32))


def test_observation_is_a_deterministic_function_of_the_actions_within_an_episode():
    actions = [1.5, -0.7, 0.3]
    a, _ = make_env()
    b, _ = make_env()
    obs_a, _, _ = run_episode(a, actions)
    obs_b, _, _ = run_episode(b, actions)
    for x, y in zip(obs_a, obs_b):
        np.testing.assert_array_equal(x, y)
    c, _ = make_env()
    obs_c, _, _ = run_episode(c, [-1.5, -0.7, 0.3])  # a different first action moves knot 1
    np.testing.assert_array_equal(obs_c[0][:3], obs_a[0][:3])
    assert obs_c[1][1] != obs_a[1][1] and obs_c[1][2] != obs_a[1][2]


def test_every_episode_draws_a_fresh_probe():
    """Issue 11: a fixed probe would make sigma_local a function of log-SNR; each episode draws its own."""
    env, client = make_env(probe=np.random.default_rng(0).uniform(-1, 1, (32, 3, 16, 16)).astype(np.float32))
    first, _, _ = run_episode(env, [0.0] * (K - 1))
    second, _, _ = run_episode(env, [0.0] * (K - 1))
    assert first[0][2] == second[0][2] and first[0][1] != second[0][1]  # same knot and log-SNR, other images
    seeds = [s["context"]["probe_seed"] for s in client.submitted]
    assert seeds == [0, 1]  # submitted with the request, so the workers can echo it


def test_sigma_local_feature_closed_form_on_a_constant_probe():
    """x_0 = 0: x_t = sqrt(1 - abar) eps, so log sigma_local(lambda) = 0.5 log sigmoid(-lambda) + const exactly."""
    env, _ = make_env(probe=np.zeros((P, 3, 16, 16), np.float32))
    lams = [9.21, 2.0, -3.0, -10.0]
    vals = [env.observer.log_sigma_local(lam, 0) for lam in lams]
    const = [v - 0.5 * math.log(1 / (1 + math.exp(lam))) for v, lam in zip(vals, lams)]
    assert max(const) - min(const) < 1e-12
    # ...and the constant is 0.5 log E var_k(unit noise) = 0.5 log(1 - sum G_k^2), up to sampling noise.
    expected = 0.5 * math.log(1 - float((gaussian_kernel(5) ** 2).sum()))
    assert abs(const[0] - expected) < 0.02


def test_final_reward_is_the_posted_reward_and_the_schedule_is_the_builders():
    env, client = make_env()
    actions = [0.5, -2.0, 1.0]
    _, rewards, info = run_episode(env, actions)
    posted = client.posted[info["request_id"]]
    assert rewards[-1] == posted["reward"] == info["reward"]
    assert info["ref_loss"] == posted["ref_loss"] and info["step"] == posted["step"]
    sub = client.submitted[0]
    betas = torch.tensor(sub["betas"], dtype=torch.float64)
    validate_betas(betas, T)
    obs = env.observer  # the config's knot spacing and prior (dko.knot_spacing, dko.prior)
    expected = schedule_from_actions(actions, T, K, 9.21, -10.13, 0.1, obs.spacing, obs.prior_actions)
    torch.testing.assert_close(betas, expected, rtol=0, atol=0)
    assert sub["actions"] == actions and sub["episode"] == 0 and len(sub["knot_logsnr"]) == K + 1


def test_progress_and_loss_features_come_from_the_latest_result():
    env, client = make_env()
    obs0, _ = env.reset()
    assert obs0[3] == 0.0 and obs0[4] == 0.0  # progress 0, log(initial ref loss 1.0)
    run_episode(env, [0.0] * (K - 1))
    obs1, _ = env.reset()
    latest = client.latest
    assert obs1[3] == pytest.approx(latest["step"] / 1000)
    assert obs1[4] == pytest.approx(math.log(latest["ref_loss"]), rel=1e-6)
    # A new env (e.g. after a driver restart) reads the same values from the broker.
    env2, _ = make_env(client=client)
    np.testing.assert_array_equal(env2.reset()[0][3:5], obs1[3:5])


def test_actions_are_clipped_and_nan_is_refused():
    env, client = make_env()
    run_episode(env, [1e6, -1e6, 0.0])
    assert client.submitted[0]["actions"] == [ACTION_BOUND, -ACTION_BOUND, 0.0]
    env.reset()
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan], np.float32))


def test_non_finite_reward_is_an_error():
    class NaNClient(FakeBrokerClient):
        def wait_result(self, request_id):
            return {"reward": float("nan"), "ref_loss": 1.0, "step": 1}

    env, _ = make_env(client=NaNClient())
    with pytest.raises(ValueError, match="non-finite reward"):
        run_episode(env, [0.0] * (K - 1))


def test_probe_from_tensor_or_callable_gives_the_same_observations():
    arr = probe_images(3)
    a, _ = make_env(probe=arr)
    b, _ = make_env(probe=torch.from_numpy(arr))
    c, _ = make_env(probe=lambda: arr)
    np.testing.assert_array_equal(a.reset()[0], b.reset()[0])
    np.testing.assert_array_equal(a.reset()[0], c.reset()[0])
    bad, _ = make_env(probe=np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="probe"):
        bad.reset()


def test_loss_profile_of_the_latest_result_enters_the_observation():
    class ProfileClient(FakeBrokerClient):
        def latest_result(self):
            return {"step": 10, "ref_loss": 0.2, "loss_profile": [0.05, 0.2, 0.6], "profile_logsnr": [9.0, 0.0, -9.0]}

    env, _ = make_env(client=ProfileClient())
    obs, _ = env.reset()  # knot 0 sits at log-SNR 9.21, past the profile's first point: clamped to 0.05
    assert obs[5] == pytest.approx(math.log(0.05 / 0.2), rel=1e-6)


# ----------------------------------------------------------------- with the real broker actor


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(120)
def test_env_with_real_broker_gets_the_workers_reward(ray_local):
    from akod_ray.rl.broker import BrokerClient, get_or_create_broker

    handle = get_or_create_broker("env-real")
    posted = {}

    def rank0():
        c = BrokerClient(handle, timeout_s=30)
        req = c.next_request(30.0, resume=True)
        assert req is not None
        rid, sched = req
        posted[rid] = {"reward": schedule_reward(sched["betas"]), "ref_loss": 0.25, "step": 500}
        c.post_result(rid, posted[rid])

    th = threading.Thread(target=rank0)
    th.start()
    probe_ref = ray_local.put(probe_images())  # the probe may travel as an object-store ref
    env = ScheduleEnv(make_env_config(make_cfg(timeout_s=30.0), probe_ref, "env-real"))
    _, rewards, info = run_episode(env, [0.0, 0.5, -0.5])
    th.join(timeout=30)
    assert rewards[-1] == posted[info["request_id"]]["reward"]
    assert env.reset()[0][3] == pytest.approx(0.5)  # progress 500 / 1000 from the broker's latest result


@pytest.mark.timeout(120)
def test_env_fails_within_the_timeout_when_no_worker_answers(ray_local):
    from akod_ray.rl.broker import get_or_create_broker

    handle = get_or_create_broker("env-timeout")  # noqa: F841 - the owner's handle keeps the actor alive
    env = ScheduleEnv(make_env_config(make_cfg(timeout_s=2.0), probe_images(), "env-timeout"))
    env.reset()
    env.step(np.zeros(1, np.float32))
    env.step(np.zeros(1, np.float32))
    t0 = time.monotonic()
    with pytest.raises(BrokerTimeoutError) as err:
        env.step(np.zeros(1, np.float32))
    elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed < 2.0 + 3.0
    msg = str(err.value)
    assert "no result for schedule request 0 from the Ray Train workers within 2 s" in msg
    assert "gone or stuck" in msg and "never took the request" in msg
