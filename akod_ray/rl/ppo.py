"""PPO over the ScheduleEnv with the DKO as policy (RLlib new API stack), export and checkpoints.

Everything RLlib-specific about the AKOD arm lives here. The algorithm runs in the Tune
trial's process: one local env runner (``num_env_runners=0``) and one local learner
(``num_learners=0``), so PPO takes no CPU from the Ray Train workers. One PPO iteration
(``algo.train()``) collects ``rl.train_batch`` schedules, i.e. as many segments of K
training steps by the workers, then updates the DKO.

Two ways to keep the RL state (use both; they answer different questions):

- :func:`save_algorithm` / :func:`restore_algorithm`: the whole algorithm (DKO and value
  weights, Adam state, counters) in an RLlib checkpoint folder, written atomically. This
  resumes PPO exactly after the trial driver restarts.
- :func:`rl_state_dict` / :func:`load_rl_state_dict`: the RLModule's weights only, as a
  flat ``{name: torch.Tensor}`` dict that ``torch.save`` writes and
  ``torch.load(weights_only=True)`` reads, small enough for every Train checkpoint and all
  that :func:`deterministic_schedule` needs.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from akod_ray.config import Config
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClosedError
from akod_ray.rl.env import ScheduleEnv
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


def deterministic_schedule(algo_or_module, env: ScheduleEnv | dict, progress: float | None = None,
                           ref_loss: float | None = None) -> torch.Tensor:
    """The learned schedule: the deterministic DKO run knot by knot on the probe statistics.

    ``env`` is a ScheduleEnv or its env_config (no broker is contacted). ``progress`` and
    ``ref_loss`` default to what the env saw last (0 and 1.0 for a fresh env). Returns
    float64 betas [T], valid by construction.
    """
    module = policy_module(algo_or_module)
    if isinstance(env, dict):
        env = ScheduleEnv(env)
    betas, _, _ = env.preview(lambda obs: deterministic_action(module, obs), progress, ref_loss)
    return betas


# ----------------------------------------------------------------- checkpoints


def save_algorithm(algo: Algorithm, path: str | Path) -> Path:
    """Write the whole algorithm to the folder ``path`` atomically (temp folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    algo.save_to_path(str(tmp.resolve()))
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def restore_algorithm(cfg: Config, env_config: dict, path: str | Path) -> Algorithm:
    """Rebuild PPO with a fresh ``env_config`` (this run's broker and probe) and load ``path`` into it.

    The env_config saved inside the checkpoint is not used, so a checkpoint written by an
    earlier trial driver works with the broker of the current one.
    """
    path = Path(path)
    if not (path / "learner_group").is_dir():
        from akod_ray.errors import CheckpointError

        raise CheckpointError(f"RL checkpoint {str(path)!r} is missing or incomplete (no learner_group folder)")
    algo = build_ppo(cfg, env_config)
    algo.restore_from_path(str(path.resolve()))
    return algo


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
