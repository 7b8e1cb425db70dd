"""A tiny checkpoint made by hand (no training, no Ray): what `akod sample` and `akod fid` read."""

from __future__ import annotations

from pathlib import Path

import torch

from akod_ray.config import (Config, DataConfig, DiffusionConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig,
                             config_to_dict)
from akod_ray.diffusion.schedules import cosine_betas
from akod_ray.models.unet import UNet
from akod_ray.training.checkpoint import LEGACY_STATE_FILE, atomic_torch_save, checkpoint_dir_name, save_state
from akod_ray.training.ema import EMA

T = 50  # the checkpoint's diffusion steps


def tiny_config(root: Path, name: str = "ckpt") -> Config:
    return Config(
        run=RunConfig(name=name, root=str(root)),
        diffusion=DiffusionConfig(T=T, schedule="cosine"),
        model=ModelConfig(channels=(8, 8, 8, 8), bottleneck_channels=8, num_res_blocks=1, attention_resolutions=(),
                          dropout=0.0, msfi=False, beta_modulation=False),
        data=DataConfig(source="procedural", train_subset=64, val_size=8),
        train=TrainConfig(steps=4, batch_size=8, ckpt_every=2),
        eval=EvalConfig(sampler_steps=5, grid_size=2, fid_samples=8),
    )


def checkpoint_state(cfg: Config, step: int = 4) -> dict:
    """The state a run's checkpoint holds (random weights: sampling needs no trained model)."""
    torch.manual_seed(0)
    model = UNet(cfg.model)
    ema = EMA(model, 0.99)
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "data": {"epoch": 0, "offset": 0},
            "step": step, "wall_s": 1.0, "betas": cosine_betas(cfg.diffusion.T), "config": config_to_dict(cfg),
            "schedule_source": {}}


def make_checkpoint(run_dir: Path, state: dict | None = None, step: int = 4, cfg: Config | None = None,
                    legacy: bool = False) -> Path:
    """``run_dir/checkpoint_<step>/state.safetensors`` (``legacy``: an earlier version's ``state.pt``, written
    with torch.save); returns the checkpoint folder."""
    cfg = cfg or tiny_config(Path(run_dir).parent, Path(run_dir).name)
    folder = Path(run_dir) / checkpoint_dir_name(step)
    state = state if state is not None else checkpoint_state(cfg, step)
    if legacy:
        atomic_torch_save(state, folder / LEGACY_STATE_FILE)
    else:
        save_state(folder, state)
    return folder
