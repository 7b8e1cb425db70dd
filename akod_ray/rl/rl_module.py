"""The PPO RLModule whose policy network is the DKO MLP (DESIGN 1.3).

``pi`` is :class:`akod_ray.diffusion.dko.DKO`: it maps an image's observation to a correction of the
prior's log-probabilities of the J noise-level bins; the module hands RLlib the logits of the DKO's
categorical, log pi = log((1 - floor) softmax(log m + f) + floor m) (:func:`~akod_ray.diffusion.dko.bin_logits`),
so what RLlib samples and what the workers sample for the other images are one distribution. The
value function is a separate small MLP (no shared layers), so the policy's weights are exactly the
DKO's and export without translation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from akod_ray.diffusion.dko import DKO, NoiseBins, bin_logits


def _mlp(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.Tanh()]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class DKORLModule(TorchRLModule, ValueFunctionAPI):
    """model_config: ``hidden`` (DKO widths), ``vf_hidden`` (value MLP widths), ``T`` and ``floor`` (the
    bins' prior masses and the floor of :func:`~akod_ray.diffusion.dko.bin_probs`)."""

    def setup(self) -> None:
        obs_dim = int(self.observation_space.shape[0])
        bins = int(self.action_space.n)
        hidden = tuple(self.model_config.get("hidden", (64, 64)))
        self.pi = DKO(bins, hidden=hidden, obs_dim=obs_dim)
        self.register_buffer("mass", NoiseBins(int(self.model_config["T"]), bins).mass.float(), persistent=False)
        self.floor = float(self.model_config["floor"])
        self.vf = _mlp(obs_dim, tuple(self.model_config.get("vf_hidden", (64, 64))), 1)
        # V starts at 0, not at a random offset: an untrained critic's noise would otherwise be most of the
        # first advantages
        nn.init.zeros_(self.vf[-1].weight)
        nn.init.zeros_(self.vf[-1].bias)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: bin_logits(self.pi(batch[Columns.OBS]), self.mass, self.floor)}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        return self.vf(batch[Columns.OBS]).squeeze(-1)
