"""PPO over the DecisionEnv with the DKO as policy (RLlib new API stack), its prior, and checkpoints.

Everything RLlib-specific about the AKOD arm lives here. The algorithm runs in the Tune trial's
process: one local env runner (``num_env_runners=0``) and one local learner (``num_learners=0``),
so PPO takes no CPU from the Ray Train workers. One PPO iteration (``algo.train()``) collects
``rl.train_batch`` decision windows (episodes: one step per decision image), then updates the DKO.

Every decision is a one-step bandit (gamma = 0): its advantage is its reward minus the value
function's baseline for its observation. The learner (:class:`DKOPPOLearner`) adds to PPO's loss
``rl.kl_coeff`` x KL(pi(. | obs) || m), the divergence of the policy from the prior's bin masses: the
learned distribution moves away from the prior only as far as its rewards pay for, and rewards that
carry no information leave it at the prior (PPO's own KL term only ties a policy to its last version).

The RL state is kept as plain tensors, never as an RLlib checkpoint (those hold pickles, and a
run folder on a shared filesystem must not be able to run code on resume):
:func:`rl_state_dict` / :func:`load_rl_state_dict` move the RLModule's weights as a flat
``{name: torch.Tensor}`` dict (:func:`policy_state` adds the DKO context); Adam's moments and
RLlib's counters start afresh on resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from akod_ray.config import Config
from akod_ray.diffusion.dko import DKOContext, NoiseBins
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClosedError
from akod_ray.rl.env import DecisionEnv, decision_rewards_callback
from akod_ray.rl.rl_module import DKORLModule

VF_HIDDEN = (64, 64)
PRIOR_KL_KEY = "prior_kl"


class DKOPPOLearner(PPOTorchLearner):
    """PPO's loss plus ``prior_kl_coeff`` x KL(pi || m), m the prior's bin masses (``learner_config_dict``:
    ``prior_kl_coeff``, ``prior_mass``)."""

    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out: dict[str, Any]):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        coeff = float(config.learner_config_dict.get("prior_kl_coeff", 0.0))
        logits = fwd_out[Columns.ACTION_DIST_INPUTS]  # log pi, normalized
        log_m = torch.log(torch.as_tensor(config.learner_config_dict["prior_mass"], dtype=logits.dtype,
                                          device=logits.device))
        kl = (logits.exp() * (logits - log_m)).sum(-1)
        mask = batch.get(Columns.LOSS_MASK)
        mean_kl = kl[mask].mean() if mask is not None else kl.mean()
        self.metrics.log_value((module_id, PRIOR_KL_KEY), mean_kl.detach(), window=1)
        return loss + coeff * mean_kl


def ppo_config(cfg: Config, env_config: dict) -> PPOConfig:
    """The PPOConfig of the AKOD arm (see :func:`build_ppo`)."""
    rl = cfg.rl
    batch = rl.train_batch * rl.decision_images * -(-rl.segment_steps // rl.decision_every)  # decisions an iteration
    mass = NoiseBins(cfg.diffusion.T, cfg.dko.bins).mass.tolist()
    return (
        PPOConfig()
        .environment(DecisionEnv, env_config=env_config)
        .env_runners(
            num_env_runners=0,  # the env lives in this process; it mostly waits for the workers
            num_envs_per_env_runner=1,
            rollout_fragment_length=batch,
            batch_mode="complete_episodes",  # a window's rewards come at its end: never cut an episode
        )
        .learners(num_learners=0, num_gpus_per_learner=0, learner_class=DKOPPOLearner,
                  learner_config_dict={"prior_kl_coeff": rl.kl_coeff, "prior_mass": mass})
        .training(
            lr=rl.lr,
            train_batch_size_per_learner=batch,
            minibatch_size=min(rl.minibatch_size, batch),
            num_epochs=rl.num_epochs,
            gamma=0.0,  # every decision is its own bandit: its return is its own reward
            lambda_=1.0,
            entropy_coeff=0.0,  # the pull towards the prior (kl_coeff) keeps the spread, not an entropy bonus
        )
        .rl_module(rl_module_spec=RLModuleSpec(
            module_class=DKORLModule,
            model_config={"hidden": list(cfg.dko.hidden), "vf_hidden": list(VF_HIDDEN), "T": cfg.diffusion.T,
                          "floor": cfg.dko.floor},
        ))
        .callbacks(on_episode_end=decision_rewards_callback)
        .debugging(seed=cfg.train.seed, log_level="WARN")
    )


def build_ppo(cfg: Config, env_config: dict) -> Algorithm:
    """Build the PPO algorithm whose policy network is the DKO (``akod_ray.diffusion.dko.DKO``).

    ``env_config`` comes from :func:`akod_ray.rl.env.make_env_config`. Building touches no broker; the
    first ``algo.train()`` does."""
    return ppo_config(cfg, env_config).build_algo()


def explore_without_learning(algo: Algorithm, episodes: int) -> dict:
    """``rl.frozen``: sample ``episodes`` windows exactly as :func:`build_ppo`'s ``algo.train()`` would, without
    updating anything (the frozen-policy control). Returns an iteration-like summary."""
    eps = algo.env_runner.sample(num_episodes=episodes, explore=True)
    returns = [float(np.sum(e.get_rewards())) for e in eps]
    return {"env_runners": {"episode_return_mean": float(np.mean(returns)) if returns else None,
                            "num_episodes": len(eps), "num_env_steps_sampled": int(sum(len(e) for e in eps))},
            "learners": {}}


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


# ----------------------------------------------------------------- checkpoints


def policy_state(algo_or_module, context: DKOContext, iteration: int = 0) -> dict:
    """The DKO state that goes into every request and Train checkpoint: plain tensors and data (weights_only).

    ``weights``: the DKO MLP (:class:`~akod_ray.diffusion.dko.DKO` state_dict, enough for
    :class:`~akod_ray.diffusion.dko.DKOPolicy`); ``module``: the whole RLModule (DKO and value function) to
    resume PPO from; ``context``: the latest context; ``iteration``: PPO iterations behind it.
    """
    if isinstance(algo_or_module, Algorithm):
        full = rl_state_dict(algo_or_module)  # the learner's copy: DKO and value function
    else:
        full = {k: v.detach().cpu().clone() for k, v in algo_or_module.state_dict().items()}
    return {"weights": {k[len("pi."):]: v for k, v in full.items() if k.startswith("pi.")}, "module": full,
            "context": context.to_dict(), "iteration": int(iteration)}


def rl_state_dict(algo: Algorithm) -> dict[str, torch.Tensor]:
    """The learner's DKO and value weights as ``{name: tensor}`` (torch.load(weights_only=True) safe)."""
    weights = algo.learner_group.get_weights(module_ids=[DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID]
    return {k: torch.as_tensor(np.asarray(v)).clone() for k, v in weights.items()}


def load_rl_state_dict(algo: Algorithm, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`rl_state_dict` weights into the learner and the env runner (Adam state is kept)."""
    algo.learner_group.set_weights({DEFAULT_MODULE_ID: {k: v.detach().cpu().numpy() for k, v in state.items()}})
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)
