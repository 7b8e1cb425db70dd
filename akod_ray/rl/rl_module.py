"""The PPO RLModule whose policy network is the DKO MLP (DESIGN 1.3).

``pi`` is :class:`akod_ray.diffusion.dko.DKO`: it maps the DKO observation to
(mean, log std) of a diagonal Gaussian over the 1-D action, the layout of RLlib's default
``TorchDiagGaussian`` for a Box action space; its mean is the deterministic action. The
value function is a separate small MLP (no shared layers), so the policy's weights are
exactly the DKO's and export without translation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from akod_ray.diffusion.dko import DKO


def _mlp(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.Tanh()]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class DKORLModule(TorchRLModule, ValueFunctionAPI):
    """model_config: ``hidden`` (DKO widths, DKOConfig.hidden) and ``vf_hidden`` (value MLP widths)."""

    def setup(self) -> None:
        obs_dim = int(self.observation_space.shape[0])
        if tuple(self.action_space.shape) != (1,):
            raise ValueError(f"the DKO acts on a 1-D Box action space, got {self.action_space}")
        hidden = tuple(self.model_config.get("hidden", (64, 64)))
        self.pi = DKO(hidden=hidden, obs_dim=obs_dim)
        self.vf = _mlp(obs_dim, tuple(self.model_config.get("vf_hidden", (64, 64))), 1)
        # V starts at 0, not at a random offset: with rewards of O(1) (rl.reward_scale) an untrained
        # critic's noise would otherwise be most of the first advantages
        nn.init.zeros_(self.vf[-1].weight)
        nn.init.zeros_(self.vf[-1].bias)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.pi(batch[Columns.OBS])}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        return self.vf(batch[Columns.OBS]).squeeze(-1)
