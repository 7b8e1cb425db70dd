"""The Dynamic Kernel Optimizer (DKO), version 3: a distribution over noise levels, image by image.

The paper sets beta_t = f(t, sigma_local(x_t)) with f an MLP trained by PPO. Under uniform t a
schedule *is* a training distribution over log-SNR (DESIGN 1.1); version 3 reads the paper that
way and lets the DKO set it per image, from the local variance of that image's signal:

    pi(j | x_0) = (1 - floor) softmax(log m + f(obs(x_0)))_j + floor m_j,   j = 0 .. J - 1

* **Bins** (:class:`NoiseBins`): the T steps of the *prior* schedule (``dko.prior``: loglinear, edm or
  laplace, an anchor of :mod:`akod_ray.diffusion.schedules`) cut into J contiguous runs of steps;
  m_j is run j's share of the steps, i.e. the prior's probability of bin j under uniform t.
* **The draw**: an image's bin j ~ pi(. | x_0), then its step t uniformly within the bin. With a zero
  output f = 0 that is uniform t on the prior's table, *exactly the prior arm's training*; any
  output reweights the prior's bins and keeps its shape within a bin. What the trunk trains on is
  the policy's own distribution: exploring *is* training, there is no separate action noise that
  could shift it (version 2's zero-mean logit noise did: BENCHMARKS.md, version 3).
* **floor**: every bin keeps at least ``dko.floor`` of its prior mass, so every noise level keeps
  being trained and the exported schedule stays valid (:func:`quantile_schedule`).
* **The observation** of one image (``OBS_DIM`` numbers):

  ==================  ===================================================================
  log sigma_local     0.5 log var_k(x_0) averaged over the image: the local variance of the
                      image's own signal under the k x k Gaussian filter (``dko.kernel_size``)
  progress            the trunk's optimizer step / total steps, in [0, 1]
  log M               log of the reward probe's weighted loss (the metric the credit improves)
  ==================  ===================================================================

  progress and M form the :class:`DKOContext` (fixed within a decision window, plain data that
  lives in every checkpoint beside the DKO's weights).
* **The schedule** a run exports (``schedule.json``, diffusers' ``trained_betas``, the checkpoint's
  ``betas`` for sampling on its own grid): the marginal of pi over a pool of training images, as a
  distribution over the prior's steps, turned into T log-SNR quantiles (:func:`learned_schedule`).

This module is plain PyTorch: the env, the RLModule, the loop's sampler and the drivers use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from akod_ray.diffusion.schedules import (anchor_betas, anchor_logsnr, betas_from_logsnr,  # noqa: F401 (re-exported)
                                         uniform_logsnr_betas, validate_betas)

# ----------------------------------------------------------------- local variance


def gaussian_kernel(kernel_size: int) -> torch.Tensor:
    """Normalized 2-D Gaussian G_k of size k x k (float64), sigma = 0.3 ((k - 1) / 2 - 1) + 0.8 (OpenCV's rule)."""
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"dko.kernel_size must be odd and >= 3, got {kernel_size}")
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g1 = torch.exp(-(r**2) / (2 * sigma**2))
    g2 = torch.outer(g1, g1)
    return g2 / g2.sum()


def local_variance_map(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """var_k(x) = G_k * (x^2) - (G_k * x)^2, depthwise, 'valid' (no padding) so borders are not biased."""
    c = x.shape[1]
    g = gaussian_kernel(kernel_size).to(device=x.device, dtype=x.dtype)
    w = g.expand(c, 1, kernel_size, kernel_size).contiguous()
    mean = F.conv2d(x, w, groups=c)
    mean_sq = F.conv2d(x * x, w, groups=c)
    return (mean_sq - mean * mean).clamp(min=0.0)  # >= 0 exactly; clamp only removes rounding


def local_variance(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-image sigma_local^2: the local variance map averaged over channels and pixels, shape [B].

    For unit white noise E[var_k] = 1 - sum(G_k^2) (the closed form the tests check).
    """
    return local_variance_map(x, kernel_size).mean(dim=(1, 2, 3))


MIN_LOCAL_VARIANCE = 1e-8  # a flat image: log sigma_local = -9.2 instead of -inf


def log_sigma_local(x0: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The DKO's image feature: 0.5 log sigma_local^2(x_0), float32 [B] (a horizontal flip leaves it unchanged)."""
    var = local_variance(x0.float(), kernel_size).clamp(min=MIN_LOCAL_VARIANCE)
    return 0.5 * torch.log(var)


# ----------------------------------------------------------------- bins of the prior's steps


class NoiseBins:
    """J contiguous runs of the T steps of the prior schedule: bin j holds steps [edges[j], edges[j + 1]).

    ``mass[j]`` = the run's share of the T steps: the prior's probability of bin j under uniform t.
    """

    def __init__(self, T: int, J: int):
        if not 2 <= J <= T:
            raise ValueError(f"dko.bins must be in [2, diffusion.T={T}], got {J}")
        self.T, self.J = int(T), int(J)
        self.edges = (torch.arange(J + 1, dtype=torch.long) * T) // J  # [J + 1], edges[0] = 0, edges[J] = T
        self.size = self.edges[1:] - self.edges[:-1]
        self.mass = self.size.double() / T
        self._device_tables: dict = {}

    def of_step(self, t: torch.Tensor) -> torch.Tensor:
        """The bin of each 0-based step."""
        return torch.searchsorted(self.edges.to(t.device), t, right=True) - 1

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = (self.edges[:-1].to(device), self.size.to(device))
        return self._device_tables[key]

    def draw_steps(self, bins: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A step uniformly within each bin: t = lo_j + floor(u size_j), u ~ U[0, 1) from ``generator``."""
        lo, size = self._tables(bins.device)
        u = torch.rand(bins.shape, generator=generator, device=bins.device, dtype=torch.float64)
        return lo[bins] + torch.minimum((u * size[bins]).long(), size[bins] - 1)

    def step_distribution(self, probs) -> torch.Tensor:
        """Bin probabilities [J] -> the probability of each step [T] (uniform within a bin), float64."""
        p = torch.as_tensor(probs, dtype=torch.float64).reshape(-1)
        if p.numel() != self.J:
            raise ValueError(f"need {self.J} bin probabilities, got {p.numel()}")
        return torch.repeat_interleave(p / self.size.double(), self.size)


def bin_probs(correction: torch.Tensor, mass: torch.Tensor, floor: float) -> torch.Tensor:
    """pi = (1 - floor) softmax(log m + a) + floor m, over the last dim (a zero correction gives m exactly)."""
    m = mass.to(correction.device, correction.dtype)
    return (1.0 - floor) * torch.softmax(torch.log(m) + correction, dim=-1) + floor * m


def bin_logits(correction: torch.Tensor, mass: torch.Tensor, floor: float) -> torch.Tensor:
    """log pi: the logits of the categorical the RLModule hands to RLlib (normalized)."""
    return torch.log(bin_probs(correction, mass, floor))


# ----------------------------------------------------------------- the observation

OBS_DIM = 3
OBS_BOUND = 30.0  # every feature is far inside (log sigma_local >= -9.2, log M >= -18.5)
INITIAL_PROBE_LOSS = 1.0  # the weighted epsilon-MSE of an untrained denoiser (it predicts 0), before any measurement


@dataclass
class DKOContext:
    """What an image's observation holds besides the image: plain data (checkpointed as is)."""

    progress: float = 0.0  # trunk step / total steps
    probe_loss: float = INITIAL_PROBE_LOSS  # the reward probe's weighted loss M, latest measurement

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DKOContext":
        d = dict(d or {})
        return cls(progress=float(d.get("progress", 0.0)), probe_loss=float(d.get("probe_loss", INITIAL_PROBE_LOSS)))


def observations(features: torch.Tensor, ctx: DKOContext) -> torch.Tensor:
    """float32 [B, OBS_DIM]: (log sigma_local of each image, progress, log M)."""
    f = features.float().reshape(-1, 1)
    state = torch.tensor([ctx.progress, math.log(max(ctx.probe_loss, 1e-8))], dtype=torch.float32, device=f.device)
    return torch.cat([f, state.expand(f.shape[0], 2)], dim=1).clamp(-OBS_BOUND, OBS_BOUND)


# ----------------------------------------------------------------- the DKO MLP


class DKO(nn.Module):
    """f(sigma_local, training state): the MLP from an image's observation to a correction of the prior's
    log-probabilities of the J bins. The output layer starts at zero: the initial policy is the prior."""

    def __init__(self, bins: int, hidden: tuple[int, ...] = (64, 64), obs_dim: int = OBS_DIM):
        super().__init__()
        layers: list[nn.Module] = []
        d = obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, bins)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs))


def dko_from_state(weights: dict | None, bins: int, hidden: tuple[int, ...]) -> DKO:
    """A DKO (eval mode) with stored weights (plain tensors), or the initial one (the prior) for None."""
    net = DKO(bins, hidden)
    if weights:
        net.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in weights.items()})
    return net.eval()


class DKOPolicy:
    """pi(. | x_0) of one DKO state: what the trunk samples from and what RLlib's categorical holds.

    ``state``: {"weights": DKO state_dict, "context": DKOContext dict} or None (the initial DKO: the prior).
    """

    def __init__(self, state: dict | None, bins: NoiseBins, floor: float, hidden: tuple[int, ...], kernel_size: int):
        state = state or {}
        self.net = dko_from_state(state.get("weights"), bins.J, hidden)
        self.context = DKOContext.from_dict(state.get("context"))
        self.bins, self.floor, self.kernel_size = bins, float(floor), int(kernel_size)

    @torch.no_grad()
    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """[B, J] bin probabilities of images with these log sigma_local features (float32, on their device)."""
        obs = observations(features.cpu(), self.context)
        return bin_probs(self.net(obs), self.bins.mass.float(), self.floor).to(features.device)

    @torch.no_grad()
    def probs_of_images(self, x0: torch.Tensor) -> torch.Tensor:
        return self.probs(log_sigma_local(x0, self.kernel_size))


# ----------------------------------------------------------------- distributions and the exported schedule


def quantile_schedule(step_probs, prior_logsnr) -> torch.Tensor:
    """The schedule whose uniform t trains on ``step_probs`` (a distribution over the prior's T steps):
    log-SNR at step s is the prior's log-SNR at the quantile s / (T - 1) of that distribution (the CDF
    piecewise linear in the prior's step index), so the endpoints stay the prior's. Valid betas [T].

    Strictly decreasing as long as every step has positive probability (the policy's floor)."""
    p = torch.as_tensor(step_probs, dtype=torch.float64).reshape(-1)
    lam = torch.as_tensor(prior_logsnr, dtype=torch.float64).reshape(-1)
    T = lam.numel()
    if p.numel() != T or not torch.isfinite(p).all() or (p <= 0).any():
        raise ValueError(f"need {T} positive step probabilities, got {p.numel()} (min {float(p.min()):.3g})")
    # the CDF at the step boundaries: step t occupies [t, t + 1) of a continuous index u in [0, T]
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(p / p.sum(), 0)])
    q = torch.linspace(0.0, 1.0, T, dtype=torch.float64)
    u = torch.from_numpy(np.interp(q.numpy(), cdf.numpy(), np.arange(T + 1, dtype=np.float64)))
    # u in [0, T] -> the prior's step index in [0, T - 1], log-SNR interpolated between its steps
    x = u * (T - 1) / T
    out = torch.from_numpy(np.interp(x.numpy(), np.arange(T, dtype=np.float64), lam.numpy()))
    return validate_betas(betas_from_logsnr(out), T, name="DKO schedule")


def floor_problem(prior_logsnr, bins: NoiseBins, floor: float) -> str | None:
    """Why a policy at this floor could export an invalid schedule, or None. The worst case for bin j is j at its
    floor with every other bin scaled up: the export then stretches bin j's steps the most (the last bin of a
    concentrated prior holds the steepest steps, so a schedule that keeps it at floor m_J crosses beta = 0.999
    when floor < ~1 / 6 for laplace(0.75))."""
    for j in range(bins.J):
        probs = bins.mass.clone() * (1 - floor * bins.mass[j]) / (1 - bins.mass[j])
        probs[j] = floor * bins.mass[j]
        try:
            quantile_schedule(bins.step_distribution(probs), prior_logsnr)
        except ValueError as e:
            return f"with bin {j} of {bins.J} at its floor the exported schedule is invalid ({e})"
    return None


def w1_logsnr(p_steps, q_steps, prior_logsnr) -> float:
    """Wasserstein-1 distance, in log-SNR, between two distributions over the prior's T steps (each step
    a point mass at its log-SNR): the integral of |F_p - F_q| over log-SNR."""
    p = torch.as_tensor(p_steps, dtype=torch.float64).reshape(-1)
    q = torch.as_tensor(q_steps, dtype=torch.float64).reshape(-1)
    lam = torch.as_tensor(prior_logsnr, dtype=torch.float64).reshape(-1)
    gap = torch.cumsum(p / p.sum() - q / q.sum(), 0)[:-1].abs()
    return float((gap * (lam[:-1] - lam[1:]).abs()).sum())


def marginal_probs(state: dict | None, features: torch.Tensor, bins: NoiseBins, floor: float,
                   hidden: tuple[int, ...], kernel_size: int) -> torch.Tensor:
    """The DKO's bin probabilities averaged over images with these features (float64 [J])."""
    return DKOPolicy(state, bins, floor, hidden, kernel_size).probs(features).double().mean(0)


def learned_schedule(state: dict | None, features: torch.Tensor, bins: NoiseBins, floor: float,
                     hidden: tuple[int, ...], kernel_size: int, prior_logsnr) -> torch.Tensor:
    """The schedule of a stored DKO: the quantiles of its marginal over a pool of images (betas [T])."""
    probs = marginal_probs(state, features, bins, floor, hidden, kernel_size)
    return quantile_schedule(bins.step_distribution(probs), prior_logsnr)
