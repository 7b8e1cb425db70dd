"""Exponential moving average of the model's weights (kept in float32 beside the model)."""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in model.parameters()]
        self._source: tuple[nn.Module, list[torch.Tensor]] | None = None

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's parameters as float32 tensors, listed once per model: an optimizer updates
        the same Parameter objects in place at every step (and a captured CUDA graph reads them)."""
        if self._source is None or self._source[0] is not model:
            params = list(model.parameters())
            if any(p.dtype != torch.float32 for p in params):  # a cast copy goes stale: cast every time
                return [p.detach().float() for p in params]
            self._source = (model, params)
        return self._source[1]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * param: one fused multi-tensor kernel, no host sync."""
        torch._foreach_lerp_(self.shadow, self._params(model), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        self.decay = float(state["decay"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
