"""Online adaptation of the training distribution or weighting without RL: what a learner must beat.

Both arms train on a fixed schedule's table (``diffusion.schedule``, the prior of the comparison) and
adapt online from the training losses alone (``diffusion.adaptation``):

``importance``  a loss-history importance sampler over noise levels (Nichol & Dhariwal 2021, Sec. 3.3;
                Kingma & Gao 2023's adaptive density). The *objective stays fixed* (the schedule's own
                uniform-t loss); only the proposal moves: the T steps are cut into J bins
                (:class:`~akod_ray.diffusion.dko.NoiseBins`), bin j is drawn with
                q_j = (1 - floor) m_j r_j / sum_k m_k r_k + floor m_j, r_j the root mean square of the
                recent losses in bin j (an exponential average, ``adaptation_decay``), m_j the bin's share
                of the steps, the step uniformly within the bin, and every image's loss is weighted by
                m_j / q_j, so the expected gradient is the fixed objective's and its variance smaller.
                Until every bin has ``HISTORY_MIN`` losses, q = m (uniform t).
``edm2``        EDM2's learned uncertainty weighting (Karras et al. 2024, Eq. 21) on the F-type loss of
                EDM: per image L = (1 + e^{-lambda} / sigma_data^2) ||eps - eps_hat||^2 (the EDM loss
                weight lambda(sigma) times the x0 error, written for an epsilon-predicting network), and
                the objective mean(L / e^{u(lambda)} + u(lambda)), u a small network of the noise level
                (Fourier features of c_noise = ln(sigma) / 4, sigma = e^{-lambda / 2}) trained by the same
                gradient (its own Adam, the run's learning rate). On the epsilon-MSE itself the learned
                weights would favour the noisy levels, where that loss is small (issue 21).

Everything runs on the training device without host synchronization.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn

from akod_ray.diffusion.dko import NoiseBins
from akod_ray.diffusion.process import TABLE_COND

HISTORY_MIN = 10  # losses per bin before the importance sampler leaves uniform t (Improved DDPM: 10 per step)
SIGMA_DATA = 0.5  # EDM's standard deviation of the data in [-1, 1]


class Drawn:
    """One step's draws: t and noise per micro-batch, and per-image loss weights (or None)."""

    __slots__ = ("t", "noise", "weights")

    def __init__(self, t: list[torch.Tensor], noise: list[torch.Tensor], weights: list[torch.Tensor] | None = None):
        self.t, self.noise, self.weights = t, noise, weights


class StepSampler(Protocol):
    """Draws each image's step (and loss weight) of a training step, and sees the step's per-image losses."""

    def draw(self, trunk, micro_batches: list[torch.Tensor], generator: torch.Generator, k: int) -> Drawn: ...
    def observe(self, losses: list[torch.Tensor]) -> None: ...
    def pop_overhead_s(self) -> float: ...  # wall seconds spent inside draw on learning (credits) since the last call


def draw_noise(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The noise of one micro-batch, drawn as the training step draws it (after t)."""
    return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)


class ImportanceSampler:
    """The ``importance`` arm's sampler (see the module docstring); resumable through state_dict."""

    def __init__(self, T: int, bins: int, floor: float, decay: float, device):
        self.bins = NoiseBins(T, bins)
        self.floor, self.decay = float(floor), float(decay)
        self.mass = self.bins.mass.to(device)
        self.mean_sq = torch.zeros(bins, dtype=torch.float64, device=device)  # exponential average of loss^2
        self.count = torch.zeros(bins, dtype=torch.float64, device=device)
        self._last_bins: list[torch.Tensor] = []

    def proposal(self) -> torch.Tensor:
        """q [J] (float64, on the device): m while any bin lacks history, else the mixture above."""
        r = self.mass * self.mean_sq.clamp(min=1e-20).sqrt()
        q = (1.0 - self.floor) * r / r.sum() + self.floor * self.mass
        ready = (self.count >= HISTORY_MIN).all()
        return torch.where(ready, q, self.mass)

    def draw(self, trunk, micro_batches, generator, k) -> Drawn:
        q = self.proposal()
        weights = (self.mass / q).float()
        t, noise, w, self._last_bins = [], [], [], []
        for x0 in micro_batches:
            j = torch.multinomial(q, x0.shape[0], replacement=True, generator=generator)
            t.append(self.bins.draw_steps(j, generator))
            noise.append(draw_noise(x0, generator))
            w.append(weights[j])
            self._last_bins.append(j)
        return Drawn(t, noise, w)

    @torch.no_grad()
    def observe(self, losses: list[torch.Tensor]) -> None:
        """Fold the step's unweighted per-image losses into each bin's average of loss^2."""
        for j, loss in zip(self._last_bins, losses):
            n = torch.zeros_like(self.count).index_add_(0, j, torch.ones_like(loss, dtype=torch.float64))
            s = torch.zeros_like(self.mean_sq).index_add_(0, j, loss.double() ** 2)
            keep = (1.0 - self.decay) ** n  # each new loss moves the average by `decay` of the way
            self.mean_sq.copy_(torch.where(n > 0, keep * self.mean_sq + (1 - keep) * s / n.clamp(min=1), self.mean_sq))
            self.count.add_(n)

    def pop_overhead_s(self) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {"mean_sq": self.mean_sq.cpu().clone(), "count": self.count.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mean_sq.copy_(torch.as_tensor(state["mean_sq"], dtype=torch.float64))
        self.count.copy_(torch.as_tensor(state["count"], dtype=torch.float64))


class FourierFeatures(nn.Module):
    """cos(2 pi (f x + phi)) sqrt(2) with fixed random f ~ N(0, 1), phi ~ U[0, 1) (EDM2's MPFourier)."""

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x.float()[:, None] * self.freqs + self.phases) * math.sqrt(2)


class EDM2Weighting(nn.Module):
    """The ``edm2`` arm's objective (see the module docstring): FastStep's ``objective``."""

    def __init__(self, lr: float, channels: int = 128, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.fourier = FourierFeatures(channels)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)  # u = 0: every level weighted as the F-type loss alone
        nn.init.zeros_(self.linear.bias)
        self.optimizer = torch.optim.Adam(self.linear.parameters(), lr=lr)

    def log_variance(self, log_snr: torch.Tensor) -> torch.Tensor:
        """u(lambda): EDM2's logvar at c_noise = ln(sigma) / 4 = -lambda / 8."""
        return self.linear(self.fourier(-log_snr / 8.0)).squeeze(-1)

    def forward(self, per_image: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """mean(F / e^u + u) over one micro-batch: ``per_image`` the epsilon-MSE, ``rows`` the step tables' rows."""
        lam = rows[:, TABLE_COND][:, 0].float()
        f_loss = per_image.float() * (1.0 + torch.exp(-lam) / self.sigma_data**2)
        u = self.log_variance(lam)
        return (f_loss * torch.exp(-u) + u).mean()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_state(self) -> dict:
        return {"module": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
