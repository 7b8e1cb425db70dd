"""The pure training step and the validation losses; no Ray, no I/O.

``train_step`` connects the process, the network and the optimizer: it knows nothing of
where batches come from or where metrics go.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.errors import TrainingDivergedError


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # The fused/foreach kernels are the fast paths; fused AdamW needs floating params on CUDA/CPU.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to base_lr over warmup_steps, then constant (Ho et al. 2020)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


@dataclass(frozen=True)
class StepOptions:
    min_snr_gamma: float | None = None
    bf16: bool = False
    grad_clip: float = 1.0


def train_step(
    model: nn.Module,
    process: DiffusionProcess,
    micro_batches: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    opts: StepOptions,
    generator: torch.Generator | None = None,
    rng_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step over one or more micro-batches of x_0 in [-1, 1].

    t and noise come from ``generator``; dropout draws from the global generator, seeded with
    ``rng_seed`` first when it is given. Returns detached tensors (no host sync here): ``loss``
    (mean over micro-batches) and ``grad_norm``. Under DDP, gradients are all-reduced only on the
    last micro-batch.
    """
    model.train()
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    n = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0].device)
    for i, x0 in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == n - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            t = process.sample_t(x0.shape[0], x0.device, generator)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            with autocast(x0.device, opts.bf16):
                loss = process.training_loss(model, x0, t, noise, opts.min_snr_gamma).mean()
            (loss / n).backward()
        total += loss.detach()
    if opts.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
    else:  # no clipping, but the metric stays the true norm
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total / n, "grad_norm": grad_norm.detach()}


def check_finite(loss: float, step: int) -> None:
    """Stop on a NaN or inf loss with an error naming the step."""
    if not math.isfinite(loss):
        raise Divergence(step, "loss", loss).error()


@dataclass(frozen=True)
class Divergence:
    """The first step whose loss or gradient norm was NaN or inf (``what``: "loss" or "gradient norm")."""

    step: int
    what: str
    value: float
    worker: int | None = None  # the worker that saw it first, when there are several

    def error(self) -> TrainingDivergedError:
        where = f" on worker {self.worker}" if self.worker is not None else ""
        return TrainingDivergedError(f"training diverged: {self.what} is {self.value} at step {self.step}{where}")


class ReferenceProtocol:
    """The default AKOD reward and the comparable validation metric of every arm (DESIGN 1.4).

    The epsilon-MSE of the denoiser on a fixed held-out batch at a fixed grid of noise
    levels, with fixed noise: the reference process's log-SNR falls linearly in t between
    the DKO endpoints, and the grid takes ``grid`` evenly spaced steps of it. The proposed
    schedule cannot change any of this, so it cannot make the metric easier.
    """

    def __init__(self, process: DiffusionProcess, x0: torch.Tensor, grid: int, seed: int = 1234,
                 batch: int | None = None):
        self.process = process
        self.x0 = x0
        self.batch = batch or x0.shape[0]  # (grid point, image) pairs per forward pass (train.val_batch); the value is the same up to float rounding
        self.t_grid = torch.linspace(0, process.T - 1, grid).round().long()
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((grid, *x0.shape), generator=g).to(x0.device, x0.dtype)
        self.tables = process.step_tables().to(x0.device)  # read on the device: no host copy per forward pass

    @property
    def grid_logsnr(self) -> list[float]:
        """log-SNR of each grid point under the reference process (decreasing)."""
        return self.process.log_snr[self.t_grid].tolist()

    @torch.no_grad()
    def profile(self, model: nn.Module, bf16: bool = False) -> list[float]:
        """The loss profile: epsilon-MSE at each grid point (mean over this batch of images).

        The (grid point, image) pairs go through the network ``batch`` at a time, whatever the
        grid, so a small probe (few images, many levels) still runs in full batches. Sums stay on
        the device (in float64, as a Python float would hold them) and come to the host once, at
        the end: one synchronization, not one per forward pass."""
        model.eval()
        device, n, grid = self.x0.device, self.x0.shape[0], len(self.t_grid)
        t_grid = self.t_grid.to(device)
        totals = torch.zeros(grid, dtype=torch.float64, device=device)
        for start in range(0, grid * n, self.batch):
            pair = torch.arange(start, min(start + self.batch, grid * n), device=device)  # grid-major
            j, i = pair // n, pair % n
            with autocast(device, bf16):
                loss = DiffusionProcess.table_loss(model, self.tables, self.x0[i], t_grid[j], self.noise[j, i])
            totals.index_add_(0, j, loss.double())
        return [total / n for total in totals.tolist()]

    def loss(self, model: nn.Module, bf16: bool = False) -> float:
        """The reference loss: the mean of :meth:`profile` over the grid."""
        p = self.profile(model, bf16)
        return sum(p) / len(p)


@torch.no_grad()
def schedule_loss(model: nn.Module, process: DiffusionProcess, x0: torch.Tensor, seed: int = 4321,
                  draws: int = 4, bf16: bool = False) -> float:
    """The paper's reward term: L(x, eps_theta(x_t, t), beta_t) under ``process`` (the proposed
    schedule), t uniform over its steps, with seeded t and noise."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        t = torch.randint(0, process.T, (x0.shape[0],), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        with autocast(x0.device, bf16):
            total += process.training_loss(model, x0, t, noise).mean().item()
    return total / draws
