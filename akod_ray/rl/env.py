"""DecisionEnv: one episode is one decision window of the trunk (DESIGN 1.3, 1.4).

The env runs in the trial's process (RLlib with ``num_env_runners=0``) and talks to the training
workers through the run's broker (:mod:`akod_ray.rl.broker`). At every reset it reads the latest
state the workers posted: the trunk's context (progress, the probe's metric M) and the *slots* of the
next window, the log sigma_local of its decision images (:mod:`akod_ray.rl.worker_source`). Each step
shows the policy one slot and takes its action, the image's noise-level bin; after the last slot it
submits the window's decisions, with the DKO state they were drawn from and the context they were
observed in, and waits for the workers to train the window. Their result holds one reward per
decision, which :func:`decision_rewards_callback` (an RLlib ``on_episode_end`` callback) writes into
the episode before it reaches the learner. Every decision is its own one-step bandit (gamma = 0): its
return is its own reward.

``env_config`` (built by :func:`make_env_config`; plain data, so RLlib can copy and checkpoint it):

=====================  =======================================================================
T, bins                diffusion steps and the DKO's bins (the action space is Discrete(bins))
broker_name,           the broker actor to talk to (looked up lazily, at the first reset)
broker_namespace
timeout_s              the longest the workers may stay silent while the env waits
max_wait_s             optional cap on one wait, heartbeats or not (None: no cap)
null_reward            rl.null_reward: none | shuffle | constant (a control, akod_ray/rl/reward.py)
seed                   seeds the null control's shuffles
broker_client_factory  optional callable(env_config) -> client with the BrokerClient methods
                       submit, wait_result, wait_state, policy_state (tests, the local driver)
=====================  =======================================================================
"""

from __future__ import annotations

import math
from typing import Callable

import gymnasium as gym
import numpy as np

from akod_ray.diffusion.dko import OBS_BOUND, OBS_DIM, DKOContext, observations
from akod_ray.rl.broker import BrokerClient, BrokerClosedError, broker_name
from akod_ray.rl.reward import centred, null_control

import torch


def make_env_config(cfg, run_id: str, *, namespace: str | None = None, max_wait_s: float | None = None,
                    broker_client_factory: Callable | None = None) -> dict:
    """env_config for :class:`DecisionEnv` from a :class:`~akod_ray.config.Config`."""
    out = {
        "T": cfg.diffusion.T,
        "bins": cfg.dko.bins,
        "broker_name": broker_name(run_id),
        "broker_namespace": namespace,
        "timeout_s": cfg.rl.broker_timeout_s,
        "max_wait_s": max_wait_s,
        "null_reward": cfg.rl.null_reward,
        "seed": cfg.train.seed,
    }
    if broker_client_factory is not None:
        out["broker_client_factory"] = broker_client_factory
    return out


def _default_client(env_config: dict) -> BrokerClient:
    return BrokerClient.connect(env_config["broker_name"], timeout_s=env_config["timeout_s"],
                                namespace=env_config.get("broker_namespace"),
                                max_wait_s=env_config.get("max_wait_s"))


class DecisionEnv(gym.Env):
    """One decision window per episode; one step per decision image.

    Observation: Box(-30, 30, (OBS_DIM,), float32): :func:`akod_ray.diffusion.dko.observations` of the
    slot (the image's log sigma_local) in the window's context (progress, log M), fixed within an episode.

    Action: Discrete(bins): the image's noise-level bin (the policy's categorical is the DKO's
    distribution over the prior's bins, floor included: akod_ray/rl/rl_module.py).

    Reward: 0 at every step until the window is trained; then the episode's rewards become the
    workers' per-decision rewards after the ``null_reward`` control, centred on the window's mean
    (:func:`akod_ray.rl.reward.centred`: ``rewards`` in the last step's info, written in by
    :func:`decision_rewards_callback`). ``terminated=True`` at the last slot. The info of the last step
    also holds ``request_id``, ``step`` and the measured rewards under ``measured``.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        self.env_config = config
        self.bins = int(config["bins"])
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Discrete(self.bins)
        self._client = None
        self.episode = 0
        self._slots: list[float] = []
        self._context = DKOContext()
        self._actions: list[int] = []
        self._obs: np.ndarray | None = None
        self._started = False

    @property
    def client(self):
        if self._client is None:
            factory = self.env_config.get("broker_client_factory") or _default_client
            self._client = factory(self.env_config)
        return self._client

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        state = self.client.wait_state()
        if not state.get("slots"):  # the last window was trained: wait for the run to end (BrokerClosedError)
            state = self.client.wait_state(after_step=state.get("step"))
        self._slots = [float(v) for v in state.get("slots") or []]
        if not self._slots:
            raise ValueError(f"the workers posted no decision slots at step {state.get('step')}")
        self._context = DKOContext.from_dict(state.get("context"))
        self._obs = observations(torch.tensor(self._slots), self._context).numpy()
        self._actions = []
        self._started = True
        return self._obs[0], {"slot": 0, "step": state.get("step")}

    def step(self, action):
        if not self._started:
            raise RuntimeError("DecisionEnv.step called before reset (or after the episode ended)")
        a = int(np.asarray(action).reshape(-1)[0])
        if not 0 <= a < self.bins:
            raise ValueError(f"DecisionEnv action must be a bin in [0, {self.bins}), got {action!r}")
        self._actions.append(a)
        k = len(self._actions)
        if k < len(self._slots):
            return self._obs[k], 0.0, False, False, {"slot": k}

        self._started = False
        request = {"decisions": list(self._actions), "slots": list(self._slots), "context": self._context.to_dict(),
                   "dko": self.client.policy_state(), "episode": self.episode, "kind": "window"}
        try:
            rid = self.client.submit(request)
            result = self.client.wait_result(rid)
        except BrokerClosedError:
            # the run ended while this window waited (a time budget): end the episode without rewards; the next
            # reset raises and algo.train() stops, without RLlib logging a failed env step
            return self._obs[-1], 0.0, False, True, {"closed": True}
        measured = [float(r) for r in result.get("rewards", [])]
        if len(measured) != len(self._actions) or not all(math.isfinite(r) for r in measured):
            raise ValueError(f"the workers posted {len(measured)} rewards (finite: "
                             f"{all(math.isfinite(r) for r in measured)}) for the {len(self._actions)} decisions of "
                             f"window request {rid}")
        rewards = centred(null_control(measured, self.env_config.get("null_reward", "none"),
                                       seed=int(self.env_config.get("seed", 0)) * 1_000_003 + self.episode))
        self.episode += 1
        info = {"request_id": rid, "step": result.get("step"), "rewards": rewards, "measured": measured}
        return self._obs[-1], 0.0, True, False, info


def decision_rewards_callback(*, episode, **kwargs) -> None:
    """RLlib ``on_episode_end`` callback: the episode's rewards become the per-decision rewards of its window
    (one per step), before the episode is numpy'd and sent to the learner."""
    rewards = episode.get_infos(-1).get("rewards")
    if rewards is not None and len(rewards) == len(episode):
        episode.set_rewards(new_data=[float(r) for r in rewards])
