"""Samplers for any valid schedule, reproducible from an explicit torch.Generator.

Notation (0-based steps t = 0..T-1, step t is the paper's t+1):
    abar_t          cumulative product of (1 - beta_s), s <= t
    eps_theta       the model's noise prediction at (x_t, t)
    x0_hat          (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
    beta~_t         posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t)
    sigma_t(eta)    DDIM noise scale (Song et al. 2021, Eq. 16)
"""

from __future__ import annotations

import contextlib

import torch

from akod_ray.diffusion.process import DiffusionProcess


def _autocast(x: torch.Tensor, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)


def _eps(model, process: DiffusionProcess, x: torch.Tensor, t: int, bf16: bool) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    with _autocast(x, bf16):
        return model(x, process.noise_cond(tt)).float()


@torch.no_grad()
def ddpm_sample(
    model,
    process: DiffusionProcess,
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2), variance beta~_t."""
    x = torch.randn(shape, generator=generator, device=device)
    for t in reversed(range(process.T)):
        # 1. Predict the noise and the clean image it implies.
        eps = _eps(model, process, x, t, bf16)
        tt = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
        x0_hat = process.predict_x0_from_eps(x, tt, eps).clamp(-1, 1)
        # 2. Posterior mean mu~_t(x_t, x0_hat) and variance beta~_t.
        mean, var = process.q_posterior(x0_hat, x, tt)
        # 3. x_{t-1} = mu~ + sqrt(beta~) z, with no noise at the last step.
        if t > 0:
            x = mean + var.sqrt() * torch.randn(shape, generator=generator, device=device)
        else:
            x = mean
    return x


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """S evenly spaced 0-based steps from T-1 down to 0."""
    if not 1 <= steps <= T:
        raise ValueError(f"eval.ddim_steps must be in [1, T={T}], got {steps}")
    return sorted({round(x) for x in torch.linspace(0, T - 1, steps, dtype=torch.float64).tolist()}, reverse=True)


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
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) over S steps; eta = 0 is deterministic, eta = 1 is DDPM-like."""
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    ts = ddim_timesteps(process.T, steps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        # 1. eps_theta and x0_hat at step t.
        eps = _eps(model, process, x, t, bf16)
        abar_t = process.abar[t].item()
        abar_prev = 1.0 if t_prev is None else process.abar[t_prev].item()
        x0_hat = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
        # 2. sigma_t(eta) and the direction pointing to x_t.
        sigma = ddim_sigma(process, t, t_prev, eta)
        direction = max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        # 3. x_{t_prev} = sqrt(abar_prev) x0_hat + direction + sigma z.
        x = abar_prev**0.5 * x0_hat + direction
        if sigma > 0 and t_prev is not None:
            x = x + sigma * torch.randn(shape, generator=generator, device=device)
    return x


def sample(model, process: DiffusionProcess, n: int, generator: torch.Generator, sampler: str = "ddim",
           steps: int = 50, eta: float = 0.0, device="cpu", image_size: int = 32, bf16: bool = False,
           batch_size: int = 256) -> torch.Tensor:
    """n images in [-1, 1] from ``sampler`` (ddpm | ddim), in batches, from one generator."""
    out = []
    for start in range(0, n, batch_size):
        shape = (min(batch_size, n - start), 3, image_size, image_size)
        if sampler == "ddpm":
            out.append(ddpm_sample(model, process, shape, generator, device, bf16))
        elif sampler == "ddim":
            out.append(ddim_sample(model, process, shape, generator, steps, eta, device, bf16))
        else:
            raise ValueError(f"eval.sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    return torch.cat(out).clamp(-1, 1)
