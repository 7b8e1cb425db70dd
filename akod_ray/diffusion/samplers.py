"""The reference samplers (DDPM, DDIM) and the :class:`Denoiser` every sampler evaluates the network through,
for any valid schedule, on any sampling grid, reproducible from an explicit torch.Generator. The other samplers
(``solvers.py``: diffusers' schedulers, ``adaptive.py``) build on this module; :mod:`akod_ray.diffusion.dispatch`
chooses between all of them.

Two schedules meet in a sampler (DESIGN 1.1):
    process         the schedule the network trained with: it defines the network's
                    conditioning (``DiffusionProcess.noise_cond`` / ``cond_at_logsnr``)
    grid            the schedule whose steps the sampler visits (``sampling_grid``): the
                    training schedule itself (``own``), or one grid for every arm
                    (``common``: uniform in log-SNR between the shared endpoints)
Every network here is conditioned on the noise level (log-SNR), so it can be sampled on any
grid within the range it trained on.

Notation (0-based grid steps t = 0..T-1, step t is the paper's t+1):
    abar_t          cumulative product of (1 - beta_s), s <= t, of the grid
    eps_theta       the network's noise prediction at (x_t, log-SNR_t)
    x0_hat          (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
    beta~_t         posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t)
    sigma_t(eta)    DDIM noise scale (Song et al. 2021, Eq. 16)

The x0 clipping rule (``clip_x0``, ``eval.clip_x0``), the same for every sampler and arm: when
on, x0_hat is clipped to the data range [-1, 1] at every network evaluation and the noise
prediction the sampler goes on with is the one that clipped x0_hat implies,
eps = (x_t - sqrt(abar_t) clip(x0_hat)) / sqrt(1 - abar_t). That is DDPM's rule (Ho et al.'s
code) and diffusers' ``clip_sample`` for DDIM; it keeps a step where sqrt(abar_t) is tiny (the
noisiest step of a schedule) from amplifying the network's error into x0_hat.
"""

from __future__ import annotations

import contextlib

import torch

from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import uniform_logsnr_betas

GRIDS = ("common", "own")
STEP_SAMPLERS = ("ddpm", "ddim")  # written here, the reference; the others: solvers.py (diffusers), adaptive.py


def sampling_grid(kind: str, process: DiffusionProcess, logsnr_max: float, logsnr_min: float) -> DiffusionProcess:
    """The schedule a sampler visits: ``own`` = ``process`` itself; ``common`` = log-SNR uniform in t
    from ``logsnr_max`` to ``logsnr_min`` over ``process.T`` steps (the same for every arm)."""
    if kind == "own":
        return process
    if kind == "common":
        return DiffusionProcess(uniform_logsnr_betas(process.T, logsnr_max, logsnr_min))
    raise ValueError(f"eval.sampling_grid must be one of {GRIDS}, got {kind!r}")


def _autocast(x: torch.Tensor, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)


class Denoiser:
    """eps_theta and x0_hat at a noise level of a sampling grid (see the module docstring).

    ``model`` is called as ``model(x_t, cond)``; ``cond`` comes from ``process`` (the training
    schedule): its own row at a step of its own, else :meth:`DiffusionProcess.cond_at_logsnr`.
    """

    def __init__(self, model, process: DiffusionProcess, grid: DiffusionProcess | None = None,
                 clip_x0: bool = True, bf16: bool = False):
        self.model, self.process = model, process
        self.grid = process if grid is None else grid
        self.clip_x0, self.bf16 = clip_x0, bf16

    def _network(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with _autocast(x, self.bf16):
            return self.model(x, cond.to(x.device)).float()

    def _clipped(self, x: torch.Tensor, eps: torch.Tensor, abar: float) -> tuple[torch.Tensor, torch.Tensor]:
        x0_hat = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        if self.clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - abar**0.5 * x0_hat) / (1 - abar) ** 0.5
        return eps, x0_hat

    def at_step(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0_hat) at step t of the grid."""
        if self.grid is self.process:
            cond = self.process.noise_cond(torch.full((x.shape[0],), t, dtype=torch.long))
        else:
            cond = self.process.cond_at_logsnr(self.grid.log_snr[t].expand(x.shape[0]))
        return self._clipped(x, self._network(x, cond), self.grid.abar[t].item())

    def at_logsnr(self, x: torch.Tensor, log_snr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0_hat) at any log-SNR (a fractional step of a grid)."""
        lam = torch.full((x.shape[0],), float(log_snr), dtype=torch.float64)
        abar = torch.sigmoid(lam[:1]).item()
        return self._clipped(x, self._network(x, self.process.cond_at_logsnr(lam)), abar)

    def at_logsnrs(self, x: torch.Tensor, log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0_hat) with one noise level per image, ``log_snr`` [B] (per-image step sizes).

        The clipping rule of :meth:`_clipped`, with sqrt(abar) = sqrt(sigmoid(lambda)) and
        sqrt(1 - abar) = sqrt(sigmoid(-lambda)) per image (no 1 - abar cancellation near abar = 1).
        """
        lam = torch.as_tensor(log_snr, dtype=torch.float64).reshape(-1).cpu()
        eps = self._network(x, self.process.cond_at_logsnr(lam))
        view = (-1,) + (1,) * (x.ndim - 1)
        a = torch.sigmoid(lam).sqrt().view(view).to(x.dtype).to(x.device)
        s = torch.sigmoid(-lam).sqrt().view(view).to(x.dtype).to(x.device)
        x0_hat = (x - s * eps) / a
        if self.clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - a * x0_hat) / s
        return eps, x0_hat


@torch.no_grad()
def ddpm_sample(
    model,
    process: DiffusionProcess,
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    grid: DiffusionProcess | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """Ancestral sampling over all T steps of the grid (Ho et al. 2020, Algorithm 2), variance beta~_t."""
    den = Denoiser(model, process, grid, clip_x0, bf16)
    grid = den.grid
    x = torch.randn(shape, generator=generator, device=device)
    for t in reversed(range(grid.T)):
        # 1. Predict the noise and the clean image it implies.
        _, x0_hat = den.at_step(x, t)
        # 2. Posterior mean mu~_t(x_t, x0_hat) and variance beta~_t.
        tt = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
        mean, var = grid.q_posterior(x0_hat, x, tt)
        # 3. x_{t-1} = mu~ + sqrt(beta~) z, with no noise at the last step.
        if t > 0:
            x = mean + var.sqrt() * torch.randn(shape, generator=generator, device=device)
        else:
            x = mean
    return x


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """S evenly spaced 0-based steps from T-1 down to 0; one step is T-1 (from pure noise straight to x_0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"eval.sampler_steps must be in [1, T={T}] for DDIM, got {steps}")
    if steps == 1:
        return [T - 1]
    return sorted({round(x) for x in torch.linspace(0, T - 1, steps, dtype=torch.float64).tolist()}, reverse=True)


def sampler_steps_problem(sampler: str, steps: int, T: int) -> str | None:
    """Why ``steps`` network evaluations per image are no budget for ``sampler`` on a grid of T steps, worded to
    follow the field's name (``eval.sampler_steps must ...``); None when they are one (ddpm ignores them)."""
    if sampler == "ddpm":
        return None
    if steps < 1:
        return "must be >= 1"
    if sampler == "heun" and steps < 3:
        return "must be >= 3 for heun (N steps take 2N - 1 network evaluations: N - 1 Heun steps and a last Euler step)"
    if steps > T:
        return f"must be <= diffusion.T={T} (a sampler visits at most the T steps of its grid)"
    if sampler in ("dpmpp_2m", "unipc", "euler") and steps > T - 1:  # heun: (steps + 1) // 2 <= T - 1 already
        return (f"must be <= T - 1 = {T - 1} for {sampler} (N steps span N + 1 distinct grid steps, the last "
                f"replaced by the clean image)")
    return None


def ddim_sigma(process: DiffusionProcess, t: int, t_prev: int | None, eta: float) -> float:
    """sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  (Song et al. Eq. 16).

    With eta = 1 and t_prev = t - 1 this is sqrt(beta~_t), DDPM's posterior standard deviation.
    """
    abar_t = process.abar[t].item()
    abar_prev = 1.0 if t_prev is None else process.abar[t_prev].item()
    return eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5


@torch.no_grad()
def ddim_sample(
    model,
    process: DiffusionProcess,
    shape: tuple[int, ...],
    generator: torch.Generator,
    steps: int = 50,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    x_T: torch.Tensor | None = None,
    grid: DiffusionProcess | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) over S steps of the grid; eta = 0 is deterministic, eta = 1 is DDPM-like."""
    den = Denoiser(model, process, grid, clip_x0, bf16)
    grid = den.grid
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    ts = ddim_timesteps(grid.T, steps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        # 1. eps_theta and x0_hat at step t (the clipping rule applied).
        eps, x0_hat = den.at_step(x, t)
        abar_prev = 1.0 if t_prev is None else grid.abar[t_prev].item()
        # 2. sigma_t(eta) and the direction pointing to x_t.
        sigma = ddim_sigma(grid, t, t_prev, eta)
        direction = max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        # 3. x_{t_prev} = sqrt(abar_prev) x0_hat + direction + sigma z.
        x = abar_prev**0.5 * x0_hat + direction
        if sigma > 0 and t_prev is not None:
            x = x + sigma * torch.randn(shape, generator=generator, device=device)
    return x
