"""Checkpoints: tensors and plain data only, loadable with torch.load(weights_only=True).

A checkpoint is a folder ``checkpoint_<step:08d>/`` holding ``state.pt`` (model, EMA,
optimizer, step, data position, schedule betas, config, and for AKOD the RL state) and,
when the schedule is learned, ``schedule.json``. Files are written to a temporary name
and renamed, so a crash never leaves a half-written ``state.pt``.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from akod_ray.config import Config, config_from_dict
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.errors import CheckpointError, ConfigError
from akod_ray.models.unet import UNet

STATE_FILE = "state.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def atomic_torch_save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def save_state(folder: str | Path, state: dict) -> Path:
    """Write ``state`` to ``folder/state.pt`` atomically; returns the folder."""
    folder = Path(folder)
    atomic_torch_save(state, folder / STATE_FILE)
    return folder


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint folder or its state.pt; a missing, truncated or corrupt file is a CheckpointError."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {str(file)!r} does not exist")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt or truncated: {str(e).splitlines()[0]}") from None
    required = {"model", "ema", "step", "betas", "config"}
    if not isinstance(state, dict) or not required <= set(state):
        missing = sorted(required - set(state)) if isinstance(state, dict) else sorted(required)
        raise CheckpointError(f"checkpoint file {str(file)!r} lacks {missing}")
    return state


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint folder with the highest step under ``folder`` (a run folder), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def config_of(state: dict, where: str = "checkpoint") -> Config:
    try:
        return config_from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{where}: stored config is invalid: {e}") from None


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, DiffusionProcess, Config]:
    """The EMA weights of a checkpoint in a U-Net in eval mode, its diffusion process, and its config."""
    state = load_state(path)
    cfg = config_of(state, str(path))
    model = UNet(cfg.model)
    try:
        model.load_state_dict(state["model"])
        for p, s in zip(model.parameters(), state["ema"]["shadow"]):
            p.data.copy_(s)
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its config's model: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), DiffusionProcess(state["betas"]), cfg
