"""The Dynamic Kernel Optimizer (DKO): its math, its observation and its schedule, in one place.

The paper sets beta_t = f(t, sigma_local(x_t)) with f an MLP trained by PPO. Here the
schedule is built knot by knot (DESIGN 1.3): at knot k the DKO sees the local variance of
a probe of real training images noised to t_k with the schedule built so far, and the
state of training, and chooses which share of the remaining log-SNR range the next segment
uses. Every action sequence gives a valid, strictly monotone schedule with fixed
endpoints: validity by construction, not clamping.

The observation (:class:`DKOObserver`). At knot k, with lambda_k the log-SNR the actions so
far put there, the DKO sees ``OBS_DIM`` numbers:

==================  ====================================================================
t_k / T             where the knot stands in the process
log sigma_local     mean over the episode's probe images of 0.5 log var_k(x_{t_k}), with
                    x_{t_k} = sqrt(sigmoid(lambda_k)) x_0 + sqrt(sigmoid(-lambda_k)) eps.
                    The probe images (drawn from a pool of training images) and eps are
                    drawn afresh for every episode from ``DKOContext.probe_seed``: with a
                    fixed probe and noise this feature would be a fixed function of
                    lambda_k, which the DKO sees anyway, and would carry no information.
lambda_k / 10       the log-SNR so far
progress            the trunk's optimizer step / total steps, in [0, 1]
log L               log of the latest reference loss (the mean of the loss profile)
log L(lambda_k)/L   the denoiser's loss profile at this knot's noise level, relative to
                    its mean: where the denoiser is weak now. The profile is the per-grid-
                    point epsilon-MSE that the reward's reference protocol computes anyway
                    (interpolated in log-SNR between grid points, at no extra cost).
==================  ====================================================================

Progress, loss and profile come from the latest result the workers posted; together with
the probe seed they form the :class:`DKOContext`, plain data that lives in every Train
checkpoint next to the DKO's weights, so :func:`learned_schedule` rebuilds exactly the
schedule a run trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from akod_ray.diffusion.schedules import (anchor_logsnr, betas_from_logsnr,  # noqa: F401 (re-exported)
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


# ----------------------------------------------------------------- knot schedule builder


KNOT_SPACINGS = ("uniform", "cosine")


def knot_positions(T: int, num_knots: int, spacing: str = "uniform") -> torch.Tensor:
    """0-based step of each of the K + 1 knots, from 0 to T - 1 (float64): ``uniform`` evenly; ``cosine``
    at (T - 1) (1 - cos(pi k / K)) / 2, denser at both ends, where concentrated schedules (edm,
    laplace) bend most: with K = 16 the builder reaches them within a mean |delta log-SNR| of 0.06
    against 0.26-0.42 with uniform knots (tests/test_dko.py)."""
    if spacing == "uniform":
        return torch.linspace(0, T - 1, num_knots + 1, dtype=torch.float64)
    if spacing == "cosine":
        k = torch.arange(num_knots + 1, dtype=torch.float64)
        pos = (T - 1) * (1 - torch.cos(math.pi * k / num_knots)) / 2
        pos[0], pos[-1] = 0.0, float(T - 1)
        return pos
    raise ValueError(f"dko.knot_spacing must be one of {KNOT_SPACINGS}, got {spacing!r}")


class KnotScheduleBuilder:
    """Builds log-SNR at K + 1 knots from K - 1 actions, causally (knot k+1 depends on actions <= k).

    lambda_0 = logsnr_max, lambda_K = logsnr_min. Each segment drops by a fixed share
    ``min_share * R / K`` of the range R plus a stick-breaking share of the free range
    ``(1 - min_share) R``: with m segments still to build, action a_k takes the fraction
    sigmoid(a_k - log(m - 1)) of what is left, the last segment takes the rest. So every
    segment drops by at least min_share R / K > 0, and a = 0 takes the uniform share 1 / m:
    all-zero actions give log-SNR linear in t (the reference schedule).

    ``prior_actions`` (K - 1 numbers, default zeros) are added to the actions: the DKO's output
    is then a correction to a prior schedule (``dko.prior``, :func:`prior_actions`), and a zero
    output builds the prior's knots.
    """

    def __init__(self, num_knots: int, logsnr_max: float, logsnr_min: float, min_share: float,
                 prior_actions=None):
        if not logsnr_max > logsnr_min:
            raise ValueError("dko.logsnr_max must exceed dko.logsnr_min")
        self.K = num_knots
        self.lmax, self.lmin = float(logsnr_max), float(logsnr_min)
        R = self.lmax - self.lmin
        self.base_drop = min_share * R / num_knots
        self.free = (1.0 - min_share) * R
        self.prior = [0.0] * (num_knots - 1) if prior_actions is None else [float(a) for a in prior_actions]
        if len(self.prior) != num_knots - 1:
            raise ValueError(f"need {num_knots - 1} prior actions for {num_knots} knots, got {len(self.prior)}")
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
        a += self.prior[len(self.knots) - 1]
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


def logsnr_knots(actions, num_knots: int, logsnr_max: float, logsnr_min: float, min_share: float,
                 prior_actions=None) -> torch.Tensor:
    """log-SNR at the K + 1 knots for a full action sequence of length K - 1."""
    actions = [float(a) for a in torch.as_tensor(actions, dtype=torch.float64).flatten()]
    if len(actions) != num_knots - 1:
        raise ValueError(f"need {num_knots - 1} DKO actions for {num_knots} knots, got {len(actions)}")
    b = KnotScheduleBuilder(num_knots, logsnr_max, logsnr_min, min_share, prior_actions)
    for a in actions:
        b.step(a)
    return b.knot_logsnr()


def actions_for_knots(knot_logsnr, num_knots: int, logsnr_max: float, logsnr_min: float, min_share: float) -> list[float]:
    """The K - 1 actions (no prior) whose schedule has exactly these K + 1 knots: the inverse of
    :class:`KnotScheduleBuilder`. Raises ValueError when a segment drops less than the builder's
    minimum (``min_share`` R / K): such knots are out of the DKO's reach."""
    knots = [float(v) for v in torch.as_tensor(knot_logsnr, dtype=torch.float64).flatten()]
    if len(knots) != num_knots + 1 or knots[0] != logsnr_max or knots[-1] != logsnr_min:
        raise ValueError(f"need {num_knots + 1} knots from logsnr_max to logsnr_min, got {len(knots)}")
    b = KnotScheduleBuilder(num_knots, logsnr_max, logsnr_min, min_share)
    actions = []
    for k in range(num_knots - 1):
        use = (knots[k] - knots[k + 1]) - b.base_drop
        if use <= 0 or use >= b.free_left:
            raise ValueError(f"knot {k + 1}: the segment drops log-SNR by {knots[k] - knots[k + 1]:.4g}, outside the "
                             f"builder's reach ({b.base_drop:.4g} + a share of the {b.free_left:.4g} left; lower "
                             "dko.min_segment_share or use fewer knots)")
        fraction = use / b.free_left
        left = num_knots - k
        actions.append(math.log(fraction / (1.0 - fraction)) + math.log(left - 1))
        b.step(actions[-1])
    return actions


def prior_actions(prior: str, T: int, num_knots: int, logsnr_max: float, logsnr_min: float, min_share: float,
                  laplace_scale: float = 1.0, spacing: str = "uniform") -> list[float]:
    """The actions that build the anchor schedule ``prior`` (loglinear | edm | laplace) at the knots: the
    anchor's log-SNR at each knot position (interpolated between its steps). With uniform spacing the
    loglinear prior is all zeros (the builder's a = 0)."""
    if prior == "loglinear" and spacing == "uniform":
        return [0.0] * (num_knots - 1)
    lam = anchor_logsnr(prior, T, logsnr_max, logsnr_min, laplace_scale).numpy()
    knots = np.interp(knot_positions(T, num_knots, spacing).numpy(), np.arange(T, dtype=np.float64), lam)
    knots[0], knots[-1] = logsnr_max, logsnr_min
    return actions_for_knots(knots, num_knots, logsnr_max, logsnr_min, min_share)


def logsnr_at_steps(knot_logsnr: torch.Tensor, T: int, spacing: str = "uniform") -> torch.Tensor:
    """Piecewise-linear interpolation of the knots' log-SNR to all T steps (float64)."""
    K = knot_logsnr.shape[0] - 1
    pos = knot_positions(T, K, spacing)
    t = torch.arange(T, dtype=torch.float64)
    seg = torch.clamp(torch.searchsorted(pos, t, right=True) - 1, 0, K - 1)
    w = (t - pos[seg]) / (pos[seg + 1] - pos[seg])
    return knot_logsnr[seg] * (1 - w) + knot_logsnr[seg + 1] * w


def schedule_from_knots(knot_logsnr: torch.Tensor, T: int, spacing: str = "uniform") -> torch.Tensor:
    """Betas [T] from knot log-SNRs, validated."""
    return validate_betas(betas_from_logsnr(logsnr_at_steps(knot_logsnr, T, spacing)), T, name="DKO schedule")


def schedule_from_actions(actions, T: int, num_knots: int, logsnr_max: float, logsnr_min: float,
                          min_share: float, spacing: str = "uniform", prior_actions=None) -> torch.Tensor:
    return schedule_from_knots(logsnr_knots(actions, num_knots, logsnr_max, logsnr_min, min_share, prior_actions), T,
                               spacing)


# ----------------------------------------------------------------- the observation

OBS_DIM = 6
OBS_BOUND = 30.0  # every feature is far inside (log sigma_local >= -7, log losses >= -18.5)
INITIAL_REF_LOSS = 1.0  # epsilon-MSE of an untrained denoiser, before the workers posted anything


@dataclass
class DKOContext:
    """What the DKO's observation depends on besides the knot: plain data (checkpointed as is)."""

    progress: float = 0.0  # trunk step / total steps
    ref_loss: float = INITIAL_REF_LOSS  # latest reference loss (mean of the profile)
    loss_profile: list[float] = field(default_factory=list)  # reference loss per grid point ([] before the first)
    profile_logsnr: list[float] = field(default_factory=list)  # log-SNR of each grid point (decreasing)
    probe_seed: int = 0  # draws the episode's probe images and noise

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DKOContext":
        d = dict(d or {})
        return cls(progress=float(d.get("progress", 0.0)), ref_loss=float(d.get("ref_loss", INITIAL_REF_LOSS)),
                   loss_profile=[float(v) for v in d.get("loss_profile", [])],
                   profile_logsnr=[float(v) for v in d.get("profile_logsnr", [])],
                   probe_seed=int(d.get("probe_seed", 0)))

    def updated(self, result: dict | None, total_steps: int) -> "DKOContext":
        """This context with the progress, loss and profile of a posted result (missing keys kept)."""
        out = DKOContext.from_dict(self.to_dict())
        if not result:
            return out
        if "step" in result:
            out.progress = float(min(max(result["step"] / max(total_steps, 1), 0.0), 1.0))
        if "ref_loss" in result and math.isfinite(float(result["ref_loss"])):
            out.ref_loss = float(result["ref_loss"])
        if result.get("loss_profile"):
            out.loss_profile = [float(v) for v in result["loss_profile"]]
            out.profile_logsnr = [float(v) for v in result.get("profile_logsnr", [])]
        return out

    def relative_loss_at(self, lam: float) -> float:
        """log(L(lambda) / L): the profile interpolated linearly in log-SNR, clamped at its ends; 0 without one."""
        if len(self.loss_profile) < 2 or len(self.profile_logsnr) != len(self.loss_profile):
            return 0.0
        xs = np.asarray(self.profile_logsnr[::-1], dtype=np.float64)  # increasing for np.interp
        ys = np.log(np.maximum(np.asarray(self.loss_profile[::-1], dtype=np.float64), 1e-8))
        return float(np.interp(lam, xs, ys) - math.log(max(self.ref_loss, 1e-8)))


class DKOObserver:
    """Builds the DKO's observations and, with a policy, whole schedules (see the module docstring).

    ``pool``: real training images [N, C, H, W] in [-1, 1]; each episode's probe is
    ``probe_size`` of them chosen by ``DKOContext.probe_seed``, with noise from the same seed.
    ``spacing`` places the knots (:func:`knot_positions`); ``prior_actions`` make the DKO's output
    a correction to a prior schedule (:class:`KnotScheduleBuilder`).
    """

    def __init__(self, pool: torch.Tensor, probe_size: int, kernel_size: int, T: int, num_knots: int,
                 logsnr_max: float, logsnr_min: float, min_share: float, spacing: str = "uniform",
                 prior_actions=None):
        pool = torch.as_tensor(pool)
        if pool.ndim != 4 or not torch.is_floating_point(pool):
            raise ValueError(f"the DKO probe pool must be float images [N, C, H, W], got {pool.dtype} {list(pool.shape)}")
        if not torch.isfinite(pool).all():
            raise ValueError("the DKO probe pool contains NaN or inf")
        if min(pool.shape[-2:]) < kernel_size:
            raise ValueError(f"dko.kernel_size={kernel_size} exceeds the images' size {list(pool.shape[-2:])}")
        self.pool = pool.detach().to("cpu", torch.float64)
        self.probe_size = min(int(probe_size), self.pool.shape[0])
        self.kernel_size, self.T, self.K = int(kernel_size), int(T), int(num_knots)
        self.endpoints = (float(logsnr_max), float(logsnr_min), float(min_share))
        self.spacing = spacing
        self.prior_actions = None if prior_actions is None else [float(a) for a in prior_actions]
        self.knot_t = knot_positions(self.T, self.K, spacing) + 1.0  # 1-based diffusion step of each knot
        self._probe_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def builder(self) -> KnotScheduleBuilder:
        return KnotScheduleBuilder(self.K, *self.endpoints, prior_actions=self.prior_actions)

    def schedule(self, knot_logsnr: torch.Tensor) -> torch.Tensor:
        """Betas [T] through the knots (this observer's spacing)."""
        return schedule_from_knots(knot_logsnr, self.T, self.spacing)

    def probe(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe images x_0 and noise eps of the episode with ``seed`` (deterministic)."""
        if self._probe_cache is None or self._probe_cache[0] != seed:
            g = torch.Generator().manual_seed(int(seed) % 2**63)
            idx = torch.randperm(self.pool.shape[0], generator=g)[: self.probe_size]
            x0 = self.pool[idx]
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            self._probe_cache = (seed, x0, eps)
        return self._probe_cache[1], self._probe_cache[2]

    def log_sigma_local(self, lam: float, seed: int) -> float:
        """Mean over the probe of log sigma_local(x_t) at log-SNR ``lam``."""
        x0, eps = self.probe(seed)
        a = 1.0 / (1.0 + math.exp(-lam))  # abar = sigmoid(lambda)
        x_t = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
        var = local_variance(x_t, self.kernel_size).clamp(min=1e-12)
        return float(0.5 * torch.log(var).mean())

    def observation(self, k: int, lam: float, ctx: DKOContext) -> np.ndarray:
        """The DKO's input at knot k whose log-SNR is ``lam``, float32 [OBS_DIM]."""
        obs = [
            float(self.knot_t[k]) / self.T,
            self.log_sigma_local(lam, ctx.probe_seed),
            lam / 10.0,
            ctx.progress,
            math.log(max(ctx.ref_loss, 1e-8)),
            ctx.relative_loss_at(lam),
        ]
        return np.clip(np.asarray(obs, dtype=np.float32), -OBS_BOUND, OBS_BOUND)

    def build(self, policy: Callable[[np.ndarray], float], ctx: DKOContext) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Run ``policy`` (observation -> action) knot by knot: (betas [T], knot log-SNR [K+1], actions)."""
        b = self.builder()
        actions = []
        for k in range(b.num_actions):
            a = clip_action(policy(self.observation(k, b.knots[k], ctx)))
            actions.append(a)
            b.step(a)
        knots = b.knot_logsnr()
        return self.schedule(knots), knots, actions


ACTION_BOUND = 10.0  # |logit| of the stick-breaking share; sigmoid(10) = 1 - 4.5e-5, finer control is moot


def clip_action(action) -> float:
    """One finite action, clipped to [-ACTION_BOUND, ACTION_BOUND]; anything else is a ValueError."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.size != 1 or not np.isfinite(a[0]):
        raise ValueError(f"DKO action must be one finite number, got {action!r}")
    return float(np.clip(a[0], -ACTION_BOUND, ACTION_BOUND))


# ----------------------------------------------------------------- the DKO MLP


class DKO(nn.Module):
    """f(t, sigma_local, training state): the MLP that maps the DKO observation to the next knot's action.

    Outputs 2 numbers per observation: the mean of the action distribution (the action
    itself when deterministic) and its log standard deviation, the layout of RLlib's
    diagonal Gaussian over a 1-D action. The mean head starts at zero, so the initial
    deterministic schedule is uniform in log-SNR (the ``loglinear`` arm).
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

    @torch.no_grad()
    def deterministic_action(self, obs: np.ndarray) -> float:
        return float(self(torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(1, -1))[0, 0])


def learned_schedule(dko_state: dict, observer: DKOObserver, hidden: tuple[int, ...]) -> torch.Tensor:
    """The schedule of a stored DKO: ``dko_state`` = {"weights": DKO state_dict, "context": DKOContext dict}.

    The deterministic policy run knot by knot at the stored context; what the trunk trained
    with and what ``schedule.json`` holds.
    """
    net = DKO(hidden)
    net.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in dko_state["weights"].items()})
    net.eval()
    betas, _, _ = observer.build(net.deterministic_action, DKOContext.from_dict(dko_state["context"]))
    return betas
