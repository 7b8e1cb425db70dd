"""Multi-Scale Feature Integrator (MSFI), in the U-Net bottleneck.

Feature_fusion(t) = FFNet(W1 F(t) + W2 F(t-1) + W3 F(t+1)): F are the bottleneck features at
the noise levels of steps t, t-1 and t+1 of the current schedule, W1..W3 learned 1x1
projections, FFNet a two-layer feed-forward network. The fusion is added to F(t). The
extra evaluations happen at the lowest resolution only, so the cost stays small.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from akod_ray.models.layers import Conv2d, zero_module


class MSFI(nn.Module):
    def __init__(self, channels: int, ffn_mult: int = 2):
        super().__init__()
        self.W1 = Conv2d(channels, channels, 1, bias=False)
        self.W2 = Conv2d(channels, channels, 1, bias=False)
        self.W3 = Conv2d(channels, channels, 1, bias=False)
        self.ffn_in = Conv2d(channels, ffn_mult * channels, 1)
        self.ffn_out = zero_module(Conv2d(ffn_mult * channels, channels, 1))  # starts as the identity

    def forward(self, F_t: torch.Tensor, F_prev: torch.Tensor, F_next: torch.Tensor) -> torch.Tensor:
        mixed = self.W1(F_t) + self.W2(F_prev) + self.W3(F_next)
        return F_t + self.ffn_out(F.silu(self.ffn_in(mixed)))
