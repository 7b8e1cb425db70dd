"""ScheduleEnv: one episode builds one noise schedule knot by knot (DESIGN 1.3, 1.4).

The env runs in the trial's process (RLlib with ``num_env_runners=0``). It is a gymnasium
wrapper around the DKO's own :class:`~akod_ray.diffusion.dko.DKOObserver` (what the DKO
observes and how actions become a valid schedule live there): at every reset it draws a
fresh probe (images and noise, seeded by the episode) and reads the latest training state
from the broker; at the last knot it submits the finished schedule to the run's broker and
waits for the reward that the workers post after training with it.

``env_config`` (built by :func:`make_env_config`; plain data, so RLlib can copy and
checkpoint it):

=====================  =======================================================================
probe                  the probe pool: real images [N, 3, H, W] in [-1, 1]: numpy array, torch
                       tensor, a Ray ObjectRef to one, or a zero-argument callable returning one
probe_size             images per episode's probe (drawn from the pool)
T                      diffusion steps
num_knots              K (DKOConfig.num_knots); an episode has K - 1 steps
kernel_size            Gaussian filter size k of sigma_local
logsnr_max/min,        the knot builder's endpoints and minimum segment share
min_segment_share
knot_spacing           where the knots stand (dko.knot_spacing)
prior_actions          the actions that build the prior schedule (dko.prior); the DKO corrects them
total_steps            optimizer steps of the whole run (the progress feature's denominator)
broker_name,           the broker actor to submit to (looked up lazily, at the first reset)
broker_namespace
timeout_s              the longest the workers may stay silent while the env waits for a reward
max_wait_s             optional cap on one wait, heartbeats or not (None: no cap)
probe_seed             base seed of the episodes' probe draws
broker_client_factory  optional callable(env_config) -> client with the BrokerClient methods
                       submit, wait_result, latest_result (tests and the local driver inject one)
=====================  =======================================================================
"""

from __future__ import annotations

import math
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import ray
import torch

from akod_ray.diffusion.dko import (ACTION_BOUND, OBS_BOUND, OBS_DIM, DKOContext, DKOObserver, clip_action,
                                    prior_actions)
from akod_ray.rl.broker import BrokerClient, broker_name

EPISODE_SEED_STRIDE = 1_000_003


def make_env_config(cfg, probe: Any, run_id: str, *, namespace: str | None = None, probe_seed: int = 0,
                    max_wait_s: float | None = None, broker_client_factory: Callable | None = None) -> dict:
    """env_config for :class:`ScheduleEnv` from a :class:`~akod_ray.config.Config`."""
    d = cfg.dko
    out = {
        "probe": probe,
        "probe_size": d.probe_size,
        "T": cfg.diffusion.T,
        "num_knots": d.num_knots,
        "kernel_size": d.kernel_size,
        "logsnr_max": d.logsnr_max,
        "logsnr_min": d.logsnr_min,
        "min_segment_share": d.min_segment_share,
        "knot_spacing": d.knot_spacing,
        "prior_actions": prior_actions(d.prior, cfg.diffusion.T, d.num_knots, d.logsnr_max, d.logsnr_min,
                                       d.min_segment_share, cfg.diffusion.laplace_scale, d.knot_spacing),
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
    return torch.as_tensor(np.asarray(probe) if not isinstance(probe, torch.Tensor) else probe)


def make_observer(env_config: dict) -> DKOObserver:
    """The DKO observer of an env_config (loads the probe pool)."""
    c = env_config
    try:
        return DKOObserver(_load_probe(c["probe"]), int(c.get("probe_size", 64)), int(c["kernel_size"]), int(c["T"]),
                           int(c["num_knots"]), c["logsnr_max"], c["logsnr_min"], c["min_segment_share"],
                           c.get("knot_spacing", "uniform"), c.get("prior_actions"))
    except ValueError as e:
        raise ValueError(f"env_config['probe']: {e}") from None


def _default_client(env_config: dict) -> BrokerClient:
    return BrokerClient.connect(env_config["broker_name"], timeout_s=env_config["timeout_s"],
                                namespace=env_config.get("broker_namespace"),
                                max_wait_s=env_config.get("max_wait_s"))


class ScheduleEnv(gym.Env):
    """Build one noise schedule per episode; the reward is the workers' verdict on it.

    Episode: K - 1 steps (K = ``num_knots``). Step k (0-based) stands at knot k, whose
    log-SNR lambda_k is fixed by the actions before it (lambda_0 = logsnr_max); its action
    sets lambda_{k+1}. After the last action the builder lands on lambda_K = logsnr_min,
    the betas for all T steps come from :meth:`~akod_ray.diffusion.dko.DKOObserver.schedule`
    (valid by construction), and the schedule goes to the broker.

    Observation: Box(-30, 30, (OBS_DIM,), float32), :meth:`DKOObserver.observation` at the
    episode's :class:`~akod_ray.diffusion.dko.DKOContext`: the knot, sigma_local of a fresh
    probe noised to it, its log-SNR, and the training state (progress, reference loss and
    loss profile of the latest posted result, read from the broker at every reset; fixed
    within an episode). The probe seed of episode e is ``probe_seed * 1_000_003 + e``.

    Action: Box(-10, 10, (1,), float32), the DKO output: the correction to the prior's logit of
    the share of the remaining free log-SNR range that segment k uses (values outside are
    clipped, NaN is an error).

    Reward: 0 for every step but the last; the last step returns the ``reward`` the
    workers posted for this schedule (``rl.reward``, decided in one place:
    :func:`akod_ray.rl.reward.reward_from`), and ``terminated=True``. Its info holds
    ``request_id``, ``reward``, ``ref_loss``, ``paper_loss``, ``step`` and, with
    ``rl.credit=knot``, ``knot_rewards`` (one per step, summing to the reward), which
    :func:`credit_per_knot` (an RLlib ``on_episode_end`` callback) writes into the episode
    before it reaches the learner. Undiscounted (gamma = 1): the return of an episode is the
    posted reward either way.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        self.env_config = config
        self.T = int(config["T"])
        self.K = int(config["num_knots"])
        if self.K < 2:
            raise ValueError(f"num_knots must be >= 2, got {self.K}")
        self.total_steps = max(int(config.get("total_steps", 1)), 1)
        self._observer: DKOObserver | None = None
        self._client = None
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Box(-ACTION_BOUND, ACTION_BOUND, (1,), np.float32)
        self.context = DKOContext(probe_seed=self._episode_seed(0))
        self.episode = 0
        self._builder = None
        self._actions: list[float] = []
        self._started = False

    def _episode_seed(self, episode: int) -> int:
        return int(self.env_config.get("probe_seed", 0)) * EPISODE_SEED_STRIDE + episode

    @property
    def observer(self) -> DKOObserver:
        if self._observer is None:
            self._observer = make_observer(self.env_config)
        return self._observer

    @property
    def client(self):
        if self._client is None:
            factory = self.env_config.get("broker_client_factory") or _default_client
            self._client = factory(self.env_config)
        return self._client

    def observation(self, k: int, lam: float) -> np.ndarray:
        return self.observer.observation(k, lam, self.context)

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.context = self.context.updated(self.client.latest_result(), self.total_steps)
        self.context.probe_seed = self._episode_seed(self.episode)
        self._builder = self.observer.builder()
        self._actions = []
        self._started = True
        return self.observation(0, self._builder.knots[0]), {"knot": 0}

    def step(self, action):
        if not self._started:
            raise RuntimeError("ScheduleEnv.step called before reset (or after the episode ended)")
        try:
            a = clip_action(action)
        except ValueError:
            raise ValueError(f"ScheduleEnv action must be one finite number, got {action!r}") from None
        self._actions.append(a)
        self._builder.step(a)
        k = len(self._builder.knots) - 1
        if not self._builder.done:
            return self.observation(k, self._builder.knots[k]), 0.0, False, False, {"knot": k}

        self._started = False
        knots = self._builder.knot_logsnr()
        betas = self.observer.schedule(knots)
        request = {
            "betas": betas.tolist(),
            "knot_logsnr": knots.tolist(),
            "actions": list(self._actions),
            "episode": self.episode,
            "T": self.T,
            "context": self.context.to_dict(),
        }
        rid = self.client.submit(request)
        result = self.client.wait_result(rid)
        reward = float(result.get("reward", float("nan")))
        if not math.isfinite(reward):
            raise ValueError(f"the workers posted a non-finite reward {result.get('reward')!r} for schedule request {rid}")
        self.episode += 1
        info = {"request_id": rid, "reward": reward, "knot": self.K - 1,
                **{key: float(result[key]) for key in ("ref_loss", "paper_loss", "step") if key in result}}
        if result.get("knot_rewards"):
            info["knot_rewards"] = [float(r) for r in result["knot_rewards"]]
        return self.observation(self.K - 1, float(knots[self.K - 1])), reward, True, False, info


def credit_per_knot(*, episode, **kwargs) -> None:
    """RLlib ``on_episode_end`` callback (``rl.credit=knot``): the episode's rewards become the knot
    rewards the workers posted (one per action, the same sum), before the episode is numpy'd and sent
    to the learner. Episodes without them keep the reward at their last step."""
    credit = episode.get_infos(-1).get("knot_rewards")
    if credit is not None and len(credit) == len(episode):
        episode.set_rewards(new_data=[float(r) for r in credit])
