"""U-Net building blocks: noise-level embedding, residual blocks, attention, resampling."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# Feature maps of at most this many pixels take the matmul weight gradient below (4x4 and 2x2).
SMALL_MAP_PIXELS = 16


class _SmallMapConv(torch.autograd.Function):
    """conv2d whose weight gradient is one matmul over the unfolded input (im2col).

    oneDNN computes a bf16 convolution's weight gradient slowly when the feature map is tiny
    (the 4x4 and 2x2 levels of the U-Net, where most of the parameters are): the matmul of
    the output gradient [B*H'*W', C_out] with the unfolded input [B*H'*W', C_in*k*k] takes 2-7x
    less time there (bench/BENCHMARKS.md). The forward pass and the input gradient stay
    oneDNN's convolution; the result is the same up to bf16 rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [True, False, False])[0]
        g = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])  # [B*H'*W', C_out] (a view when channels_last)
        if ctx.needs_input_grad[1]:
            k = weight.shape[-1]
            xp = F.pad(x, (padding,) * 4) if padding else x
            cols = xp.permute(0, 2, 3, 1).unfold(1, k, stride).unfold(2, k, stride)  # [B, H', W', C_in, k, k]
            grad_w = (g.t() @ cols.reshape(g.shape[0], -1)).reshape(weight.shape)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0, dtype=torch.float32).to(grad.dtype)
        return grad_x, grad_w, grad_b, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state dict) with a faster weight gradient for bf16 on tiny
    feature maps; see :class:`_SmallMapConv`. Everything else is nn.Conv2d's own path."""

    def _small_map_path(self, x: torch.Tensor) -> bool:
        k = self.kernel_size[0]
        return (x.dim() == 4 and x.shape[-1] * x.shape[-2] <= SMALL_MAP_PIXELS and torch.is_grad_enabled()
                and self.weight.requires_grad and x.device.type == "cpu" and self.groups == 1
                and self.kernel_size == (k, k) and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and self.padding == (k // 2, k // 2) and self.stride[0] == self.stride[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._small_map_path(x):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):  # what autocast does to conv2d: everything to its dtype
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
            return F.conv2d(x, weight, bias, self.stride, self.padding)  # fp32: oneDNN's weight gradient is fine
        with torch.autocast("cpu", enabled=False):
            return _SmallMapConv.apply(x, weight, bias, self.stride[0], self.padding[0])


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class LogSNREmbedding(nn.Module):
    """Sinusoidal features of log-SNR (not of the step index), so that a schedule that changes
    during training keeps its meaning to the network; then a 2-layer MLP."""

    def __init__(self, dim: int, out_dim: int, max_period: float = 10_000.0, scale: float = 50.0):
        super().__init__()
        half = dim // 2
        # log-SNR spans about [-20, 20]; scaling by `scale` spreads it over the sinusoids' periods.
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(2 * half, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, log_snr: torch.Tensor) -> torch.Tensor:
        args = (log_snr.float() * self.scale)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as scale and shift of the second norm (improved-diffusion)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels (fused scaled-dot-product kernel)."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = group_norm(channels)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
