"""The DDPM diffusion process (Ho et al. 2020), built from any valid betas.

It has no parameters and no optimizer: the model is passed in per call, so any schedule,
fixed or learned, plugs in. Constants are precomputed in float64 and read through
:meth:`DiffusionProcess.extract`. Steps are 0-based: index t here is step t+1 of the paper.

The denoiser is conditioned on the noise level, not the index: ``noise_cond(t)`` gives a
[B, 4] float32 tensor with columns (log-SNR_t, log-SNR_{t-1}, log-SNR_{t+1}, beta_t), where
log-SNR_t = log(abar_t / (1 - abar_t)). The neighbours feed the MSFI, beta_t the
modulated output layer; a plain U-Net reads only column 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from akod_ray.diffusion.schedules import validate_betas

COND_DIM = 4
# Columns of :meth:`DiffusionProcess.step_tables`: everything a training step reads at step t.
TABLE_SQRT_ABAR, TABLE_SQRT_ONE_MINUS_ABAR, TABLE_COND, TABLE_WEIGHT = 0, 1, slice(2, 2 + COND_DIM), 2 + COND_DIM
TABLE_WIDTH = 3 + COND_DIM


class DiffusionProcess:
    def __init__(self, betas: torch.Tensor):
        betas = validate_betas(torch.as_tensor(betas))
        self.T = int(betas.shape[0])
        self.betas = betas
        self.alphas = 1.0 - betas
        self.abar = torch.cumprod(self.alphas, 0)  # abar_t = prod_{s<=t} (1 - beta_s)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.sqrt_abar = self.abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - self.abar).sqrt()
        self.log_snr = torch.log(self.abar) - torch.log1p(-self.abar)
        # Posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I), Ho et al. Eq. 6-7.
        self.posterior_variance = betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        self.posterior_mean_coef1 = betas * self.abar_prev.sqrt() / (1.0 - self.abar)
        self.posterior_mean_coef2 = (1.0 - self.abar_prev) * self.alphas.sqrt() / (1.0 - self.abar)
        idx = torch.arange(self.T)
        self._cond_source = torch.stack(  # float64, for cond_at_logsnr
            [
                self.log_snr,
                self.log_snr[(idx - 1).clamp(min=0)],
                self.log_snr[(idx + 1).clamp(max=self.T - 1)],
                betas,
            ],
            dim=1,
        )
        self._cond_table = self._cond_source.float()

    @staticmethod
    def extract(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as x's dtype and device, shaped [B, 1, 1, 1] to broadcast against x."""
        out = arr.to(x.device)[t.to(x.device)].to(x.dtype)
        return out.reshape(-1, *([1] * (x.ndim - 1)))

    def noise_cond(self, t: torch.Tensor) -> torch.Tensor:
        """[B, 4]: (log-SNR_t, log-SNR_{t-1}, log-SNR_{t+1}, beta_t) at 0-based steps t."""
        return self._cond_table.to(t.device)[t]

    def cond_at_logsnr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """[B, 4] float32: the conditioning this process gives the noise level ``log_snr`` [B],
        wherever it falls between (or beyond) its steps.

        Column 0 is ``log_snr`` itself; the neighbours' log-SNR and beta_t are interpolated
        linearly in log-SNR between the two steps around it (clamped to the first or last step
        beyond the process's range). At a step's own log-SNR this is exactly that step's row of
        :meth:`noise_cond`, so a sampler that visits another grid of noise levels (fractional
        timesteps, another schedule) conditions a network as the schedule it trained with would.
        """
        lam = torch.as_tensor(log_snr, dtype=torch.float64).reshape(-1).cpu()
        u = -self.log_snr  # increasing in t
        j = torch.clamp(torch.searchsorted(u, -lam, right=True) - 1, 0, self.T - 2)
        w = ((-lam - u[j]) / (u[j + 1] - u[j])).clamp(0.0, 1.0)[:, None]
        src = self._cond_source
        out = src[j] * (1 - w) + src[j + 1] * w
        out[:, 0] = lam
        return out.float()

    def sample_t(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.T, (batch,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al. Eq. 4)."""
        return self.extract(self.sqrt_abar, t, x0) * x0 + self.extract(self.sqrt_one_minus_abar, t, x0) * noise

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (x_t - self.extract(self.sqrt_one_minus_abar, t, x_t) * eps) / self.extract(self.sqrt_abar, t, x_t)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return (x_t - self.extract(self.sqrt_abar, t, x_t) * x0) / self.extract(self.sqrt_one_minus_abar, t, x_t)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 7)."""
        mean = self.extract(self.posterior_mean_coef1, t, x_t) * x0 + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self.extract(self.posterior_variance, t, x_t)

    def loss_weights(self, t: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor | None:
        """Min-SNR-gamma for epsilon prediction (Hang et al. 2023): w_t = min(SNR_t, gamma) / SNR_t."""
        if min_snr_gamma is None:
            return None
        snr = torch.exp(self.log_snr.to(t.device)[t])
        return (torch.clamp(snr, max=min_snr_gamma) / snr).float()

    def step_tables(self, min_snr_gamma: float | None = None) -> torch.Tensor:
        """[T, 7] float32: per step t, the columns sqrt(abar_t), sqrt(1 - abar_t), noise_cond(t)
        (4 columns) and the loss weight w_t (1 without Min-SNR).

        Every value is the float32 rounding of the float64 constant that :meth:`extract`,
        :meth:`noise_cond` and :meth:`loss_weights` read, so a step that gathers one row per
        example from this table computes exactly what :meth:`training_loss` computes. Built on
        the host; a fast step keeps one copy on the device and overwrites it in place
        (``copy_``) when the schedule changes, so compiled or captured code sees new values at
        the same address.
        """
        snr = torch.exp(self.log_snr)
        weight = torch.ones_like(snr) if min_snr_gamma is None else torch.clamp(snr, max=min_snr_gamma) / snr
        return torch.cat([self.sqrt_abar[:, None].float(), self.sqrt_one_minus_abar[:, None].float(),
                          self._cond_table, weight[:, None].float()], dim=1)

    @staticmethod
    def table_loss(model, tables: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   weighted: bool = False) -> torch.Tensor:
        """:meth:`training_loss`, reading the rows of :meth:`step_tables` (kept on x0's device)
        instead of the float64 constants on the host: the same values, and no host-to-device
        copy or synchronization, so it can be compiled or captured in a CUDA graph."""
        row = tables[t]  # [B, 7]
        shape = (-1,) + (1,) * (x0.ndim - 1)
        x_t = (row[:, TABLE_SQRT_ABAR].view(shape).to(x0.dtype) * x0
               + row[:, TABLE_SQRT_ONE_MINUS_ABAR].view(shape).to(x0.dtype) * noise)  # Eq. 4
        eps = model(x_t, row[:, TABLE_COND])
        loss = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))  # Eq. 14
        return loss * row[:, TABLE_WEIGHT] if weighted else loss

    def training_loss(
        self,
        model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        min_snr_gamma: float | None = None,
    ) -> torch.Tensor:
        """Per-example L_simple = ||eps - eps_theta(x_t, t)||^2 (Ho et al. Eq. 14), optionally Min-SNR weighted."""
        x_t = self.q_sample(x0, t, noise)
        eps = model(x_t, self.noise_cond(t))
        loss = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        w = self.loss_weights(t, min_snr_gamma)
        return loss if w is None else loss * w
