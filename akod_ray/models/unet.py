"""The AKOD U-Net: four downsampling and four upsampling blocks, MSFI in the bottleneck,
and the beta_t / log-SNR modulated noise-prediction layer.

Input: x_t [B, 3, H, W] and cond [B, 4] = (log-SNR_t, log-SNR_{t-1}, log-SNR_{t+1}, beta_t)
from ``DiffusionProcess.noise_cond``. With ``msfi`` and ``beta_modulation`` off it reads only
log-SNR_t and is a plain DDPM U-Net: the baseline arms use the same code.

What the MSFI and the modulation read besides log-SNR_t (``model.noise_cond``):

level     (the default) the network computes the other three columns from log-SNR_t alone
          (:func:`level_cond`): the neighbouring levels log-SNR_t +- ``model.level_offset`` and the
          beta of a step between them. The AKOD U-Net is then one function of (x_t, noise level),
          whatever schedule it trained with or grid it samples on.
schedule  the columns as given: the training schedule's steps t - 1 and t + 1 and its beta_t
          (versions 1 and 2). A network trained so is tied to its schedule: sampled on another grid
          it reads values interpolated from that schedule (BENCHMARKS.md, version 2 of the experiment).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from akod_ray.config import ModelConfig
from akod_ray.models.layers import AttentionBlock, Conv2d, Downsample, LogSNREmbedding, ResBlock, Upsample, group_norm, zero_module
from akod_ray.models.msfi import MSFI


def level_cond(log_snr: torch.Tensor, offset: float) -> torch.Tensor:
    """[B, 4] float32 from the noise level alone: (lambda, lambda + offset, lambda - offset, beta), with
    beta = 1 - sigmoid(lambda) / sigmoid(lambda + offset), the beta_t of a step from log-SNR lambda + offset
    down to lambda (abar = sigmoid(log-SNR))."""
    lam = log_snr.float()
    beta = -torch.expm1(F.logsigmoid(lam) - F.logsigmoid(lam + offset))
    return torch.stack([lam, lam + offset, lam - offset, beta], dim=1)


class Bottleneck(nn.Module):
    """ResBlock - attention - ResBlock at the lowest resolution."""

    def __init__(self, in_ch: int, ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.res1 = ResBlock(in_ch, ch, emb_dim, dropout)
        self.attn = AttentionBlock(ch)
        self.res2 = ResBlock(ch, ch, emb_dim, dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(h, emb)), emb)


class BetaModulation(nn.Module):
    """FiLM of the noise-prediction features by (beta_t, log-SNR_t): h (1 + scale) + shift."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), zero_module(nn.Linear(hidden, 2 * channels)))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([torch.log(cond[:, 3].clamp(min=1e-12)), cond[:, 0] / 10.0], dim=1)
        scale, shift = self.mlp(feats.float()).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + scale) + shift


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int = 32, in_channels: int = 3):
        super().__init__()
        if image_size % 16 != 0:
            raise ValueError(f"image size must be a multiple of 16 (four downsamplings), got {image_size}")
        self.cfg = cfg
        ch0 = cfg.channels[0]
        emb_dim = 4 * ch0
        self.embed = LogSNREmbedding(ch0, emb_dim)
        self.conv_in = Conv2d(in_channels, ch0, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chs, ch, res = [], ch0, image_size
        for level, width in enumerate(cfg.channels):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, emb_dim, cfg.dropout))
                attns.append(AttentionBlock(width) if res in cfg.attention_resolutions else nn.Identity())
                ch = width
                skip_chs.append(ch)
            self.down_blocks.append(blocks)
            self.down_attn.append(attns)
            self.downsample.append(Downsample(ch))
            res //= 2

        self.mid = Bottleneck(ch, cfg.bottleneck_channels, emb_dim, cfg.dropout)
        self.msfi = MSFI(cfg.bottleneck_channels, cfg.msfi_ffn_mult) if cfg.msfi else None
        ch = cfg.bottleneck_channels

        self.upsample = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for level, width in reversed(list(enumerate(cfg.channels))):
            self.upsample.append(Upsample(ch))
            res *= 2
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch + skip_chs.pop(), width, emb_dim, cfg.dropout))
                attns.append(AttentionBlock(width) if res in cfg.attention_resolutions else nn.Identity())
                ch = width
            self.up_blocks.append(blocks)
            self.up_attn.append(attns)

        self.out_norm = group_norm(ch)
        self.modulation = BetaModulation(ch) if cfg.beta_modulation else None
        self.conv_out = zero_module(Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.cfg.noise_cond == "level" and (self.msfi is not None or self.modulation is not None):
            cond = level_cond(cond[:, 0], self.cfg.level_offset)
        emb = self.embed(cond[:, 0])
        h = self.conv_in(x)
        skips = []
        for blocks, attns, down in zip(self.down_blocks, self.down_attn, self.downsample):
            for block, attn in zip(blocks, attns):
                h = attn(block(h, emb))
                skips.append(h)
            h = down(h)

        if self.msfi is None:
            h = self.mid(h, emb)
        else:
            # F(t), F(t-1), F(t+1): the bottleneck at three noise levels, batched into one call.
            b = h.shape[0]
            emb3 = torch.cat([emb, self.embed(cond[:, 1]), self.embed(cond[:, 2])])
            F_t, F_prev, F_next = self.mid(h.repeat(3, 1, 1, 1), emb3).split(b)
            h = self.msfi(F_t, F_prev, F_next)

        for up, blocks, attns in zip(self.upsample, self.up_blocks, self.up_attn):
            h = up(h)
            for block, attn in zip(blocks, attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))

        h = F.silu(self.out_norm(h))
        if self.modulation is not None:
            h = self.modulation(h, cond)
        return self.conv_out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
