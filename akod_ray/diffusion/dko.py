"""Dynamic Kernel Optimizer (DKO) building blocks: sigma_local, the knot schedule builder, the MLP.

The paper sets beta_t = f(t, sigma_local(x_t)) with f an MLP trained by PPO. Here the
schedule is built knot by knot (DESIGN 1.3): at knot k the DKO sees the local variance of
the probe batch noised to t_k with the schedule built so far, and chooses which share of
the remaining log-SNR range the next segment uses. Every action sequence gives a valid,
strictly monotone schedule with fixed endpoints: validity by construction, not clamping.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from akod_ray.diffusion.schedules import validate_betas

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


# ----------------------------------------------------------------- knot schedule builder


def knot_positions(T: int, num_knots: int) -> torch.Tensor:
    """0-based step of each of the K + 1 knots: evenly from 0 to T - 1 (float64)."""
    return torch.linspace(0, T - 1, num_knots + 1, dtype=torch.float64)


class KnotScheduleBuilder:
    """Builds log-SNR at K + 1 knots from K - 1 actions, causally (knot k+1 depends on actions <= k).

    lambda_0 = logsnr_max, lambda_K = logsnr_min. Each segment drops by a fixed share
    ``min_share * R / K`` of the range R plus a stick-breaking share of the free range
    ``(1 - min_share) R``: with m segments still to build, action a_k takes the fraction
    sigmoid(a_k - log(m - 1)) of what is left, the last segment takes the rest. So every
    segment drops by at least min_share R / K > 0, and a = 0 takes the uniform share 1 / m:
    all-zero actions give log-SNR linear in t (the reference schedule), the DKO's start.
    """

    def __init__(self, num_knots: int, logsnr_max: float, logsnr_min: float, min_share: float):
        if not logsnr_max > logsnr_min:
            raise ValueError("dko.logsnr_max must exceed dko.logsnr_min")
        self.K = num_knots
        self.lmax, self.lmin = float(logsnr_max), float(logsnr_min)
        R = self.lmax - self.lmin
        self.base_drop = min_share * R / num_knots
        self.free = (1.0 - min_share) * R
        self.reset()

    @property
    def num_actions(self) -> int:
        return self.K - 1

    def reset(self) -> None:
        self.knots = [self.lmax]
        self.free_left = self.free

    @property
    def done(self) -> bool:
        return len(self.knots) == self.K + 1

    def step(self, action: float) -> float:
        """Apply one action; returns the log-SNR at the new knot (the endpoint after the last action)."""
        if self.done:
            raise RuntimeError("schedule already complete")
        a = float(action)
        if not math.isfinite(a):
            raise ValueError(f"DKO action must be a finite number, got {action!r}")
        left = self.K - (len(self.knots) - 1)  # segments still to build, this one included (>= 2)
        z = a - math.log(left - 1)  # logit of the uniform share 1 / left, shifted by the action
        fraction = 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))
        use = fraction * self.free_left
        self.free_left -= use
        self.knots.append(self.knots[-1] - self.base_drop - use)
        if len(self.knots) == self.K:  # the last segment takes what is left and lands on lambda_min
            self.knots.append(self.lmin)
        return self.knots[-1]

    def knot_logsnr(self) -> torch.Tensor:
        if not self.done:
            raise RuntimeError(f"schedule incomplete: {len(self.knots) - 1} of {self.K} segments")
        return torch.tensor(self.knots, dtype=torch.float64)


def logsnr_knots(actions, num_knots: int, logsnr_max: float, logsnr_min: float, min_share: float) -> torch.Tensor:
    """log-SNR at the K + 1 knots for a full action sequence of length K - 1."""
    actions = [float(a) for a in torch.as_tensor(actions, dtype=torch.float64).flatten()]
    if len(actions) != num_knots - 1:
        raise ValueError(f"need {num_knots - 1} DKO actions for {num_knots} knots, got {len(actions)}")
    b = KnotScheduleBuilder(num_knots, logsnr_max, logsnr_min, min_share)
    for a in actions:
        b.step(a)
    return b.knot_logsnr()


def logsnr_at_steps(knot_logsnr: torch.Tensor, T: int) -> torch.Tensor:
    """Piecewise-linear interpolation of the knots' log-SNR to all T steps (float64)."""
    K = knot_logsnr.shape[0] - 1
    pos = knot_positions(T, K)
    t = torch.arange(T, dtype=torch.float64)
    seg = torch.clamp(torch.searchsorted(pos, t, right=True) - 1, 0, K - 1)
    w = (t - pos[seg]) / (pos[seg + 1] - pos[seg])
    return knot_logsnr[seg] * (1 - w) + knot_logsnr[seg + 1] * w


def betas_from_logsnr(log_snr: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 - abar_t / abar_{t-1} with abar_t = sigmoid(lambda_t), computed in log space (float64)."""
    log_abar = F.logsigmoid(log_snr.to(torch.float64))
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar[:-1]])
    return -torch.expm1(log_abar - prev)


def schedule_from_knots(knot_logsnr: torch.Tensor, T: int) -> torch.Tensor:
    """Betas [T] from knot log-SNRs, validated."""
    return validate_betas(betas_from_logsnr(logsnr_at_steps(knot_logsnr, T)), T, name="DKO schedule")


def schedule_from_actions(actions, T: int, num_knots: int, logsnr_max: float, logsnr_min: float,
                          min_share: float) -> torch.Tensor:
    return schedule_from_knots(logsnr_knots(actions, num_knots, logsnr_max, logsnr_min, min_share), T)


def uniform_logsnr_betas(T: int, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    """The schedule whose log-SNR falls linearly in t between the DKO's endpoints (the reference protocol's)."""
    return validate_betas(betas_from_logsnr(torch.linspace(logsnr_max, logsnr_min, T, dtype=torch.float64)), T)


# ----------------------------------------------------------------- the DKO MLP

OBS_DIM = 5


def dko_observation(t_frac: float, log_sigma_local: float, log_snr: float, progress: float,
                    ref_loss: float) -> list[float]:
    """The DKO's input: (t_k / T, log sigma_local(x_{t_k}), log-SNR so far / 10, progress, log recent ref loss)."""
    return [t_frac, log_sigma_local, log_snr / 10.0, progress, math.log(max(ref_loss, 1e-8))]


class DKO(nn.Module):
    """f(t, sigma_local): the MLP that maps the DKO observation to the next knot's action.

    Outputs 2 numbers per observation: the mean of the action distribution (the action
    itself when deterministic) and its log standard deviation, the layout of RLlib's
    diagonal Gaussian over a 1-D action.
    """

    def __init__(self, hidden: tuple[int, ...] = (64, 64), obs_dim: int = OBS_DIM):
        super().__init__()
        layers: list[nn.Module] = []
        d = obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, 2)
        nn.init.zeros_(self.head.weight)  # start from the uniform-share schedule, a calm exploration
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[1] = -0.5

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs))
