"""`akod export RUN_OR_CHECKPOINT --out DIR`: a checkpoint's EMA model in diffusers' pipeline layout
(:mod:`akod_ray.pipeline` says what the folder holds and how it loads).

The scheduler written is the diffusers scheduler of the run's ``eval.sampler`` on the training schedule:
its own class and options for dpmpp_2m, unipc, euler and heun; DPM-Solver++ (2M) for ``adaptive`` (its
update rule); DDIMScheduler (trailing spacing: it starts from pure noise, clipping off) for ``ddim``;
DDPMScheduler (posterior variance, clipping off) for ``ddpm``. The folder is written beside ``DIR`` under a
temporary name and renamed, so ``DIR`` is either a whole export or absent.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from akod_ray.config import Config
from akod_ray.diffusion.solvers import SOLVERS, make_scheduler
from akod_ray.errors import AkodError

MODEL_INDEX = "model_index.json"


def export_scheduler(sampler: str, betas: torch.Tensor):
    """The diffusers scheduler that stands for ``sampler`` on ``betas`` (module docstring)."""
    import diffusers

    if sampler in SOLVERS:
        return make_scheduler(sampler, betas)
    if sampler == "adaptive":
        return make_scheduler("dpmpp_2m", betas)
    common = dict(num_train_timesteps=int(betas.shape[0]), trained_betas=betas.double().tolist(),
                  prediction_type="epsilon", clip_sample=False)
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**common, timestep_spacing="trailing", set_alpha_to_one=True)
    return diffusers.DDPMScheduler(**common, variance_type="fixed_small")


def sampling_settings(cfg: Config) -> dict:
    """What AKODPipeline's own samplers need of the run's config (:data:`akod_ray.pipeline.SAMPLING_DEFAULTS`)."""
    ev = cfg.eval
    return {"sampler": ev.sampler, "sampler_steps": ev.sampler_steps, "ddim_eta": ev.ddim_eta,
            "sampling_grid": ev.sampling_grid, "clip_x0": ev.clip_x0, "logsnr_max": cfg.dko.logsnr_max,
            "logsnr_min": cfg.dko.logsnr_min, "kernel_size": cfg.dko.kernel_size, "bf16": cfg.train.bf16}


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's (or a run's latest) EMA model, training schedule and sampling settings to ``out`` (a new folder, or a
    previous export, which is replaced); returns ``out``."""
    from akod_ray.pipeline import AKODPipeline, AKODUNet
    from akod_ray.training.checkpoint import load_for_sampling, resolve_checkpoint

    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MODEL_INDEX).is_file())):
        raise AkodError(f"--out {str(out)!r} exists and is not an earlier export (no {MODEL_INDEX}); "
                        "give a new folder")
    model, process, cfg = load_for_sampling(resolve_checkpoint(checkpoint))
    pipe = AKODPipeline(AKODUNet.from_unet(model, process.betas), export_scheduler(cfg.eval.sampler, process.betas),
                        akod_sampling=sampling_settings(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
