"""The trained model where users already sample: a diffusers model (:class:`AKODUNet`) and pipeline
(:class:`AKODPipeline`), loaded from the folder ``akod export`` writes (diffusers' pipeline layout)::

    from akod_ray.pipeline import AKODPipeline
    pipe = AKODPipeline.from_pretrained("exported/")
    images = pipe(batch_size=16, num_inference_steps=20).images          # PIL images, as DDPMPipeline returns

The folder: ``model_index.json``; ``unet/config.json`` (the U-Net's ModelConfig fields, its image size and
the training schedule ``training_betas``) with ``unet/diffusion_pytorch_model.safetensors`` (the EMA
weights); ``scheduler/scheduler_config.json`` (the training schedule as ``trained_betas``, for the
diffusers scheduler of the run's sampler). JSON and safetensors only: nothing in it is unpickled.

Conditioning. The U-Net (``akod_ray.models.unet.UNet``) is called as ``unet(x_t, cond[B, 4])`` with cond =
(log-SNR, the MSFI's neighbouring log-SNRs, beta). The pipeline computes cond from the noise level of the
sample it hands over, so any scheduler's grid works: a ``level`` network (``model.noise_cond``, the
default) gets (lambda, :func:`~akod_ray.models.unet.level_cond`); an earlier ``schedule`` network gets
the columns its training schedule gives that lambda (``DiffusionProcess.cond_at_logsnr``).

Two ways to sample, both through :mod:`akod_ray.diffusion.dispatch`:

- ``pipe(...)``: ``pipe.scheduler``, any diffusers scheduler (swap in DPM-Solver++, UniPC, ...), on its own
  grid, ``num_inference_steps`` of its own steps, as diffusers' pipelines do.
- ``pipe(..., sampler="ddim")`` (any of ``eval.sampler``'s names): the project's sampler exactly as ``akod
  sample`` runs it: ``num_inference_steps`` network evaluations per image (default: the run's
  ``eval.sampler_steps``), on the run's sampling grid, with its x0 clipping; the same seed gives the same
  images as ``akod sample --seed`` (the generator draws the starting noise the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from akod_ray.config import IMAGE_SIZE, ModelConfig
from akod_ray.diffusion import dispatch
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.samplers import sampling_grid
from akod_ray.errors import ConfigError
from akod_ray.models.unet import UNet, level_cond

# What AKODPipeline's own samplers read (``akod_sampling`` in model_index.json): the run's eval settings, the
# endpoints of the common grid, sigma_local's filter and the bf16 switch, as sample_as_configured reads them.
SAMPLING_DEFAULTS = {"sampler": "ddim", "sampler_steps": 50, "ddim_eta": 0.0, "sampling_grid": "common",
                     "clip_x0": True, "logsnr_max": None, "logsnr_min": None, "kernel_size": 7, "bf16": False}
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))
_TUPLE_FIELDS = ("channels", "attention_resolutions")


@dataclass
class AKODUNetOutput(BaseOutput):
    sample: torch.Tensor  # eps_theta [B, C, H, W]


class LevelConditioning:
    """cond from the noise level alone (``model.noise_cond: level``), for a network without its training schedule."""

    def __init__(self, offset: float):
        self.offset = offset

    def cond_at_logsnr(self, log_snr: torch.Tensor) -> torch.Tensor:
        return level_cond(torch.as_tensor(log_snr, dtype=torch.float64).reshape(-1), self.offset)


class AKODUNet(ModelMixin, ConfigMixin):
    """The project's U-Net as a diffusers model: ``save_pretrained`` / ``from_pretrained`` (config.json and
    safetensors). Its config is :class:`~akod_ray.config.ModelConfig`'s fields, ``sample_size``,
    ``in_channels`` and ``training_betas`` (float64 list; needed by ``noise_cond: schedule`` networks and by
    the project's samplers, which sample on the training schedule or the common grid)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels=ModelConfig.channels, bottleneck_channels=ModelConfig.bottleneck_channels,
                 num_res_blocks=ModelConfig.num_res_blocks, attention_resolutions=ModelConfig.attention_resolutions,
                 dropout=ModelConfig.dropout, msfi=ModelConfig.msfi, beta_modulation=ModelConfig.beta_modulation,
                 msfi_ffn_mult=ModelConfig.msfi_ffn_mult, noise_cond=ModelConfig.noise_cond,
                 level_offset=ModelConfig.level_offset, sample_size: int = IMAGE_SIZE, in_channels: int = 3,
                 training_betas: list[float] | None = None):
        super().__init__()
        given = dict(channels=channels, bottleneck_channels=bottleneck_channels, num_res_blocks=num_res_blocks,
                     attention_resolutions=attention_resolutions, dropout=dropout, msfi=msfi,
                     beta_modulation=beta_modulation, msfi_ffn_mult=msfi_ffn_mult, noise_cond=noise_cond,
                     level_offset=level_offset)
        self.model_config = ModelConfig(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in given.items()})
        self.process = None if training_betas is None else DiffusionProcess(torch.tensor(training_betas, dtype=torch.float64))
        if self.process is None and noise_cond == "schedule" and (msfi or beta_modulation):
            raise ConfigError("AKODUNet: model.noise_cond=schedule reads its training schedule; give training_betas")
        self.unet = UNet(self.model_config, sample_size, in_channels)

    @classmethod
    def from_unet(cls, unet: UNet, training_betas: torch.Tensor | None = None, sample_size: int = IMAGE_SIZE) -> "AKODUNet":
        """The same network (weights copied) as a diffusers model."""
        cfg = unet.cfg
        model = cls(**{k: list(v) if k in _TUPLE_FIELDS else v for k, v in
                       ((name, getattr(cfg, name)) for name in MODEL_FIELDS)},
                    sample_size=sample_size, in_channels=unet.conv_in.weight.shape[1],
                    training_betas=None if training_betas is None else training_betas.double().tolist())
        model.unet.load_state_dict(unet.state_dict())
        return model

    def conditioning(self):
        """What turns a noise level into cond (``cond_at_logsnr``): the training schedule for a ``schedule``
        network that reads more than column 0, else the level alone (:class:`LevelConditioning`)."""
        cfg = self.model_config
        if cfg.noise_cond == "schedule" and (cfg.msfi or cfg.beta_modulation):
            return self.process
        return LevelConditioning(cfg.level_offset)

    def forward(self, sample: torch.Tensor, log_snr: torch.Tensor, return_dict: bool = True):
        """eps_theta of ``sample`` [B, C, H, W] at noise level ``log_snr`` [B] (or a number)."""
        lam = torch.as_tensor(log_snr, dtype=torch.float64).reshape(-1).expand(sample.shape[0])
        eps = self.unet(sample, self.conditioning().cond_at_logsnr(lam.cpu()).to(sample.device))
        return AKODUNetOutput(sample=eps) if return_dict else (eps,)


class AKODPipeline(DiffusionPipeline):
    """Unconditional image generation with an AKOD U-Net and any diffusers scheduler (see the module docstring).

    ``akod_sampling``: the run's sampling settings (:data:`SAMPLING_DEFAULTS`' keys) that ``sampler=`` calls
    read; ``akod export`` writes them into model_index.json.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: AKODUNet, scheduler, akod_sampling: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(akod_sampling=dict(akod_sampling or {}))

    def sampling_settings(self) -> dict:
        unknown = set(self.config.akod_sampling or {}) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise ConfigError(f"model_index.json: akod_sampling has unknown keys {sorted(unknown)}")
        return {**SAMPLING_DEFAULTS, **(self.config.akod_sampling or {})}

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, output_type: str = "pil", return_dict: bool = True,
                 sampler: str | None = None, sampling_grid_kind: str | None = None, eta: float | None = None,
                 chunk_size: int = 256):
        """``batch_size`` images. ``sampler`` None: ``self.scheduler`` with ``num_inference_steps`` of its steps
        (default: the run's budget); a name: the project's sampler (module docstring), on
        ``sampling_grid_kind`` (common | own; default: the run's). ``eta``: DDIM's (the run's for ``ddim``).
        ``output_type``: pil | np (NHWC in [0, 1]) | pt (NCHW in [0, 1]). ``chunk_size``: images per batch
        (``akod sample`` takes 256; the same chunks give the same images). ``generator``: on the pipeline's
        device, as ``akod sample --device`` makes it (the noise is drawn there)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be pil, np or pt, got {output_type!r}")
        run = self.sampling_settings()
        device = self._execution_device
        if generator is None:  # from torch's global generator, as diffusers' randn_tensor draws without one
            generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ()).item()))
        steps = num_inference_steps or run["sampler_steps"]
        net, cond = self.unet.unet, self.unet.conditioning()
        common = dict(device=device, image_size=self.unet.config.sample_size, bf16=run["bf16"], batch_size=chunk_size,
                      clip_x0=run["clip_x0"], kernel_size=run["kernel_size"],
                      progress_desc=None if getattr(self, "_progress_bar_config", {}).get("disable") else "sampling")
        if sampler is None:
            images = dispatch.sample(net, cond, batch_size, generator, self.scheduler, steps,
                                     0.0 if eta is None else eta, **common)
        else:
            if self.unet.process is None:
                raise ConfigError("AKODPipeline: the project's samplers need the U-Net's training_betas "
                                  "(unet/config.json); sample with a diffusers scheduler (sampler=None)")
            lmax, lmin = run["logsnr_max"], run["logsnr_min"]
            kind = sampling_grid_kind or run["sampling_grid"]
            if kind == "common" and (lmax is None or lmin is None):
                raise ConfigError("AKODPipeline: the common grid needs akod_sampling's logsnr_max and logsnr_min")
            grid = sampling_grid(kind, self.unet.process, lmax, lmin)
            images = dispatch.sample(net, cond, batch_size, generator, sampler, steps,
                                     run["ddim_eta"] if eta is None else eta, grid=grid, **common)
        images = (images / 2 + 0.5).clamp(0, 1).cpu()
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).float().numpy().astype(np.float32)
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
