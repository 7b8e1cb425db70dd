"""PPO over the ScheduleEnv with the DKO as policy (RLlib new API stack), export and checkpoints.

Everything RLlib-specific about the AKOD arm lives here. The algorithm runs in the Tune
trial's process: one local env runner (``num_env_runners=0``) and one local learner
(``num_learners=0``), so PPO takes no CPU from the Ray Train workers. One PPO iteration
(``algo.train()``) collects ``rl.train_batch`` schedules (episodes: trunk segments of K
training steps, or branch rollouts when ``rl.branches > 0``), then updates the DKO.

The RL state is kept as plain tensors, never as an RLlib checkpoint (those hold pickles, and a
run folder on a shared filesystem must not be able to run code on resume):

- :func:`rl_state_dict` / :func:`load_rl_state_dict`: the RLModule's weights only, as a
  flat ``{name: torch.Tensor}`` dict that ``torch.save`` writes and
  ``torch.load(weights_only=True)`` reads, small enough for every Train checkpoint
  (:func:`policy_state` adds the DKO context). The AKOD driver resumes PPO from these;
  Adam's moments and RLlib's counters start afresh on resume.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from akod_ray.config import Config
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClosedError
from akod_ray.diffusion.dko import DKOContext, DKOObserver
from akod_ray.rl.env import ScheduleEnv, credit_per_knot, make_observer
from akod_ray.rl.rl_module import DKORLModule

VF_HIDDEN = (64, 64)


def ppo_config(cfg: Config, env_config: dict) -> PPOConfig:
    """The PPOConfig of the AKOD arm (see :func:`build_ppo`)."""
    steps_per_episode = cfg.dko.num_knots - 1  # one action per knot but the endpoints
    batch = cfg.rl.train_batch * steps_per_episode
    return (
        PPOConfig()
        .environment(
            ScheduleEnv,
            env_config=env_config,
            # The DKO outputs the stick-breaking logit itself: no rescaling into the Box,
            # only clipping to it (RLlib's default would map [-1, 1] onto [-10, 10]).
            normalize_actions=False,
            clip_actions=True,
        )
        .env_runners(
            num_env_runners=0,  # the env lives in this process; it mostly waits for the workers
            num_envs_per_env_runner=1,
            rollout_fragment_length=batch,
        )
        .learners(num_learners=0, num_gpus_per_learner=0)
        .training(
            lr=cfg.rl.lr,
            train_batch_size_per_learner=batch,  # rl.train_batch whole episodes
            minibatch_size=min(cfg.rl.minibatch_size, batch),
            num_epochs=cfg.rl.num_epochs,
            gamma=1.0,  # episodic, the only reward comes at the end
            lambda_=1.0,  # Monte-Carlo advantages: episodes are short and the critic starts untrained
        )
        .rl_module(rl_module_spec=RLModuleSpec(
            module_class=DKORLModule,
            model_config={"hidden": list(cfg.dko.hidden), "vf_hidden": list(VF_HIDDEN)},
        ))
        .callbacks(on_episode_end=credit_per_knot if cfg.rl.credit == "knot" else NotProvided)
        .debugging(seed=cfg.train.seed, log_level="WARN")
    )


def build_ppo(cfg: Config, env_config: dict) -> Algorithm:
    """Build the PPO algorithm whose policy network is the DKO (``akod_ray.diffusion.dko.DKO``).

    ``env_config`` comes from :func:`akod_ray.rl.env.make_env_config`. Building touches
    neither the broker nor the probe; the first ``algo.train()`` does.
    """
    return ppo_config(cfg, env_config).build_algo()


def broker_error(exc: BaseException) -> BaseException | None:
    """The BrokerTimeoutError or BrokerClosedError behind an ``algo.train()`` failure, if any.

    RLlib re-raises an env's exception as ``RuntimeError`` from it; the driver uses this to
    tell "the workers finished or died" (stop PPO) from a bug (re-raise).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (BrokerTimeoutError, BrokerClosedError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# ----------------------------------------------------------------- export


def policy_module(algo_or_module):
    """The DKO RLModule of an Algorithm (its local env runner's copy), or the module itself."""
    if isinstance(algo_or_module, Algorithm):
        return algo_or_module.get_module(DEFAULT_MODULE_ID)
    return algo_or_module


@torch.no_grad()
def deterministic_action(module, obs: np.ndarray) -> float:
    """The mean of the policy's Gaussian at ``obs``: the DKO's deterministic output."""
    batch = {Columns.OBS: torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(1, -1)}
    dist_inputs = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    return float(dist_inputs[0, 0])


def deterministic_schedule(algo_or_module, observer: DKOObserver | dict, context: DKOContext | dict | None = None
                           ) -> torch.Tensor:
    """The learned schedule: the deterministic DKO run knot by knot at ``context``.

    ``observer`` is a DKOObserver or an env_config (no broker is contacted); ``context``
    defaults to the start of training (progress 0, loss 1, no profile). Returns float64
    betas [T], valid by construction.
    """
    module = policy_module(algo_or_module)
    if isinstance(observer, dict):
        observer = make_observer(observer)
    if not isinstance(context, DKOContext):
        context = DKOContext.from_dict(context)
    betas, _, _ = observer.build(lambda obs: deterministic_action(module, obs), context)
    return betas


def policy_state(algo_or_module, context: DKOContext) -> dict:
    """The DKO state that goes into every Train checkpoint: plain tensors and data (weights_only).

    ``weights``: the DKO MLP (:class:`~akod_ray.diffusion.dko.DKO` state_dict, enough for
    :func:`~akod_ray.diffusion.dko.learned_schedule`); ``module``: the whole RLModule (DKO and
    value function) to resume PPO from; ``context``: the observation the schedule was built at.
    """
    if isinstance(algo_or_module, Algorithm):
        full = rl_state_dict(algo_or_module)  # the learner's copy: DKO and value function
    else:
        full = {k: v.detach().cpu().clone() for k, v in algo_or_module.state_dict().items()}
    return {"weights": {k[len("pi."):]: v for k, v in full.items() if k.startswith("pi.")}, "module": full,
            "context": context.to_dict()}


# ----------------------------------------------------------------- checkpoints


def rl_state_dict(algo: Algorithm) -> dict[str, torch.Tensor]:
    """The learner's DKO and value weights as ``{name: tensor}`` (torch.load(weights_only=True) safe)."""
    weights = algo.learner_group.get_weights(module_ids=[DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID]
    return {k: torch.as_tensor(np.asarray(v)).clone() for k, v in weights.items()}


def load_rl_state_dict(algo: Algorithm, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`rl_state_dict` weights into the learner and the env runner (Adam state is kept)."""
    algo.learner_group.set_weights({DEFAULT_MODULE_ID: {k: v.detach().cpu().numpy() for k, v in state.items()}})
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)


def load_policy_module(cfg: Config, env_config: dict, state: dict[str, torch.Tensor]) -> DKORLModule:
    """A standalone DKO RLModule with :func:`rl_state_dict` weights (no Algorithm, no Ray)."""
    env = ScheduleEnv(env_config)
    module = DKORLModule(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config={"hidden": list(cfg.dko.hidden), "vf_hidden": list(VF_HIDDEN)},
    )
    module.load_state_dict(state)
    module.eval()
    return module
