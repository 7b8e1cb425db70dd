"""ScheduleEnv: one episode builds one noise schedule knot by knot (DESIGN 1.3, 1.4).

The env runs in the Tune trial's process (RLlib with ``num_env_runners=0``). It observes a
probe batch of real training images noised with the schedule built so far, turns the DKO's
actions into knots with :class:`~akod_ray.diffusion.dko.KnotScheduleBuilder`, and at the
last knot submits the finished schedule to the run's :class:`~akod_ray.rl.broker.ScheduleBroker`
and waits for the reward that the Ray Train workers post after training a segment with it.

``env_config`` (built by :func:`make_env_config`; plain data, so RLlib can copy and
checkpoint it):

=====================  =======================================================================
probe                  real images [P, 3, H, W] in [-1, 1]: numpy array, torch tensor, a Ray
                       ObjectRef to one, or a zero-argument callable that returns one
T                      diffusion steps
num_knots              K (DKOConfig.num_knots); an episode has K - 1 steps
kernel_size            Gaussian filter size k of sigma_local
logsnr_max/min,        the knot builder's endpoints and minimum segment share
min_segment_share
total_steps            optimizer steps of the whole run (the progress feature's denominator)
broker_name,           the broker actor to submit to (looked up lazily, at the first reset)
broker_namespace
timeout_s              the longest the workers may stay silent while the env waits for a reward
max_wait_s             optional cap on one wait, heartbeats or not (None: no cap)
probe_seed             seed of the fixed noise that makes observations deterministic
broker_client_factory  optional callable(env_config) -> client with the BrokerClient methods
                       submit, wait_result, latest_result (tests inject a fake here)
=====================  =======================================================================
"""

from __future__ import annotations

import math
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import ray
import torch

from akod_ray.diffusion.dko import (
    OBS_DIM,
    KnotScheduleBuilder,
    dko_observation,
    knot_positions,
    local_variance,
    schedule_from_knots,
)
from akod_ray.rl.broker import BrokerClient, broker_name

ACTION_BOUND = 10.0  # |logit| of the stick-breaking share; sigmoid(10) = 1 - 4.5e-5, finer control is moot
OBS_BOUND = 30.0  # every feature is far inside (log sigma_local >= -7, log ref loss >= -18.5)
INITIAL_REF_LOSS = 1.0  # epsilon-MSE of an untrained denoiser, before the workers posted anything


def make_env_config(cfg, probe: Any, run_id: str, *, namespace: str | None = None, probe_seed: int = 0,
                    max_wait_s: float | None = None, broker_client_factory: Callable | None = None) -> dict:
    """env_config for :class:`ScheduleEnv` from a :class:`~akod_ray.config.Config`."""
    out = {
        "probe": probe,
        "T": cfg.diffusion.T,
        "num_knots": cfg.dko.num_knots,
        "kernel_size": cfg.dko.kernel_size,
        "logsnr_max": cfg.dko.logsnr_max,
        "logsnr_min": cfg.dko.logsnr_min,
        "min_segment_share": cfg.dko.min_segment_share,
        "total_steps": cfg.train.steps,
        "broker_name": broker_name(run_id),
        "broker_namespace": namespace,
        "timeout_s": cfg.rl.broker_timeout_s,
        "max_wait_s": max_wait_s,
        "probe_seed": probe_seed,
    }
    if broker_client_factory is not None:
        out["broker_client_factory"] = broker_client_factory
    return out


def _load_probe(probe: Any) -> torch.Tensor:
    if callable(probe):
        probe = probe()
    if isinstance(probe, ray.ObjectRef):
        probe = ray.get(probe)
    x = torch.as_tensor(np.asarray(probe) if not isinstance(probe, torch.Tensor) else probe)
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(f"env_config['probe'] must be float images [P, C, H, W], got {x.dtype} {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("env_config['probe'] contains NaN or inf")
    return x.detach().to("cpu", torch.float64)


def _default_client(env_config: dict) -> BrokerClient:
    return BrokerClient.connect(env_config["broker_name"], timeout_s=env_config["timeout_s"],
                                namespace=env_config.get("broker_namespace"),
                                max_wait_s=env_config.get("max_wait_s"))


class ScheduleEnv(gym.Env):
    """Build one noise schedule per episode; the reward is the workers' verdict on it.

    Episode: K - 1 steps (K = ``num_knots``). Step k (0-based) stands at knot k, whose
    log-SNR lambda_k is fixed by the actions before it (lambda_0 = logsnr_max); its action
    sets lambda_{k+1}. After the last action the builder lands on lambda_K = logsnr_min,
    the betas for all T steps come from :func:`~akod_ray.diffusion.dko.schedule_from_knots`
    (valid by construction), and the schedule goes to the broker.

    Observation: Box(-30, 30, (OBS_DIM,), float32), :func:`~akod_ray.diffusion.dko.dko_observation` of

    - t_k / T with t_k the 1-based diffusion step of knot k,
    - log sigma_local: the mean over the probe images of 0.5 log var_k(x_{t_k}), with
      x_{t_k} = sqrt(sigmoid(lambda_k)) x_0 + sqrt(sigmoid(-lambda_k)) eps and a fixed,
      seeded eps, so the observation is a deterministic function of the actions so far,
    - lambda_k (the log-SNR so far), scaled by 1/10 in dko_observation,
    - training progress: the workers' latest ``step`` / ``total_steps``, clipped to [0, 1],
    - log of the latest reference loss the workers posted (1.0 before the first result).

    Progress and loss are read from the broker at every reset, so they survive a restart
    of the env; within an episode they stay fixed.

    Action: Box(-10, 10, (1,), float32), the DKO output: the logit of the share of the
    remaining free log-SNR range that segment k uses (values outside are clipped, NaN is
    an error).

    Reward: 0 for every step but the last; the last step returns the ``reward`` the Ray
    Train workers posted for this schedule (by default minus the reference validation
    loss after training K steps with it, DESIGN 1.4), and ``terminated=True``. Its info
    holds ``request_id``, ``reward``, ``ref_loss``, ``paper_loss`` and ``step``.
    Undiscounted (gamma = 1): the return of an episode is the posted reward.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        self.env_config = config
        self.T = int(config["T"])
        self.K = int(config["num_knots"])
        if self.K < 2:
            raise ValueError(f"num_knots must be >= 2, got {self.K}")
        self.kernel_size = int(config["kernel_size"])
        self.total_steps = max(int(config.get("total_steps", 1)), 1)
        self._builder = self._new_builder()
        self._knot_t = knot_positions(self.T, self.K) + 1.0  # 1-based diffusion step of each knot
        self._probe_spec = config["probe"]
        self._x0: torch.Tensor | None = None
        self._eps: torch.Tensor | None = None
        self._client = None
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Box(-ACTION_BOUND, ACTION_BOUND, (1,), np.float32)
        self.progress = 0.0
        self.ref_loss = INITIAL_REF_LOSS
        self.episode = 0
        self._actions: list[float] = []
        self._started = False

    def _new_builder(self) -> KnotScheduleBuilder:
        c = self.env_config
        return KnotScheduleBuilder(self.K, c["logsnr_max"], c["logsnr_min"], c["min_segment_share"])

    # ------------------------------------------------------------------ probe statistics

    def _ensure_probe(self) -> None:
        if self._x0 is None:
            self._x0 = _load_probe(self._probe_spec)
            g = torch.Generator().manual_seed(int(self.env_config.get("probe_seed", 0)))
            self._eps = torch.randn(self._x0.shape, generator=g, dtype=torch.float64)

    def log_sigma_local(self, log_snr: float) -> float:
        """Mean over the probe of log sigma_local(x_t) at log-SNR ``log_snr`` (fixed noise)."""
        self._ensure_probe()
        a = 1.0 / (1.0 + math.exp(-log_snr))  # abar = sigmoid(lambda)
        x_t = math.sqrt(a) * self._x0 + math.sqrt(1.0 - a) * self._eps
        var = local_variance(x_t, self.kernel_size).clamp(min=1e-12)
        return float(0.5 * torch.log(var).mean())

    def observation(self, k: int, lam: float, progress: float | None = None,
                    ref_loss: float | None = None) -> np.ndarray:
        """The observation at knot k with log-SNR ``lam`` (progress and loss default to the env's)."""
        obs = dko_observation(
            float(self._knot_t[k]) / self.T,
            self.log_sigma_local(lam),
            lam,
            self.progress if progress is None else progress,
            self.ref_loss if ref_loss is None else ref_loss,
        )
        return np.clip(np.asarray(obs, dtype=np.float32), -OBS_BOUND, OBS_BOUND)

    # ------------------------------------------------------------------ broker

    @property
    def client(self):
        if self._client is None:
            factory = self.env_config.get("broker_client_factory") or _default_client
            self._client = factory(self.env_config)
        return self._client

    def _update_from_result(self, result: dict | None) -> None:
        if not result:
            return
        if "step" in result:
            self.progress = float(min(max(result["step"] / self.total_steps, 0.0), 1.0))
        if "ref_loss" in result and math.isfinite(float(result["ref_loss"])):
            self.ref_loss = float(result["ref_loss"])

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._update_from_result(self.client.latest_result())
        self._builder.reset()
        self._actions = []
        self._started = True
        return self.observation(0, self._builder.knots[0]), {"knot": 0}

    def _action_value(self, action) -> float:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.size != 1 or not np.isfinite(a[0]):
            raise ValueError(f"ScheduleEnv action must be one finite number, got {action!r}")
        return float(np.clip(a[0], -ACTION_BOUND, ACTION_BOUND))

    def step(self, action):
        if not self._started:
            raise RuntimeError("ScheduleEnv.step called before reset (or after the episode ended)")
        a = self._action_value(action)
        self._actions.append(a)
        self._builder.step(a)
        k = len(self._builder.knots) - 1
        if not self._builder.done:
            return self.observation(k, self._builder.knots[k]), 0.0, False, False, {"knot": k}

        self._started = False
        knots = self._builder.knot_logsnr()
        betas = schedule_from_knots(knots, self.T)
        request = {
            "betas": betas.tolist(),
            "knot_logsnr": knots.tolist(),
            "actions": list(self._actions),
            "episode": self.episode,
            "T": self.T,
        }
        rid = self.client.submit(request)
        result = self.client.wait_result(rid)
        reward = float(result.get("reward", float("nan")))
        if not math.isfinite(reward):
            raise ValueError(f"the workers posted a non-finite reward {result.get('reward')!r} for schedule request {rid}")
        self._update_from_result(result)
        self.episode += 1
        info = {"request_id": rid, "reward": reward, "knot": self.K - 1,
                **{key: float(result[key]) for key in ("ref_loss", "paper_loss", "step") if key in result}}
        return self.observation(self.K - 1, float(knots[self.K - 1])), reward, True, False, info

    # ------------------------------------------------------------------ export

    def preview(self, policy: Callable[[np.ndarray], float], progress: float | None = None,
                ref_loss: float | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Build a schedule with ``policy`` (observation -> action) without the broker.

        Returns (betas [T] float64, knot log-SNR [K+1], actions). Used to export the
        deterministic learned schedule; the env's own episode is left untouched.
        """
        builder = self._new_builder()
        actions = []
        for k in range(builder.num_actions):
            a = self._action_value(policy(self.observation(k, builder.knots[k], progress, ref_loss)))
            actions.append(a)
            builder.step(a)
        knots = builder.knot_logsnr()
        return schedule_from_knots(knots, self.T), knots, actions
