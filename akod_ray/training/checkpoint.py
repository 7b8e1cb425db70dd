"""Checkpoints: tensors and plain data only, in a file that is read without unpickling anything.

A checkpoint is a folder ``checkpoint_<step:08d>/`` holding ``state.safetensors`` (model, EMA,
optimizer, step, data position, schedule betas, config, and for AKOD the RL state: the tensors as
safetensors tensors, the rest as JSON in its header, :mod:`akod_ray.training.plain_state`) and,
when the schedule is learned, ``schedule.json``. Files are written to a temporary name and renamed,
so a crash never leaves a half-written state file. Checkpoints of earlier versions hold ``state.pt``
(``torch.save``) instead; they still load, with ``torch.load(weights_only=True)``, which refuses any
pickled object other than tensors and plain data.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from akod_ray.config import CHECKPOINT_DEFAULTS, RETIRED_FIELDS, RETIRED_VALUES, Config, config_from_dict
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import validate_betas
from akod_ray.errors import CheckpointError, ConfigError
from akod_ray.models.unet import UNet
from akod_ray.training import plain_state

STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # torch.save, before issue 23
STATE_FILES = (STATE_FILE, LEGACY_STATE_FILE)  # the one a checkpoint folder holds, in order of preference
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
    """Write ``state`` to ``folder/state.safetensors`` atomically; returns the folder. A value that is not a
    tensor or plain data is a CheckpointError naming where it sits (nothing is written)."""
    folder = Path(folder)
    try:
        plain_state.save(state, folder / STATE_FILE)
    except TypeError as e:
        raise CheckpointError(f"checkpoint state for {str(folder)!r} cannot be stored: {e}") from None
    return folder


def state_file(folder: str | Path) -> Path | None:
    """The state file of a checkpoint folder (:data:`STATE_FILES`), or None."""
    return next((Path(folder) / name for name in STATE_FILES if (Path(folder) / name).is_file()), None)


def torch_load_error(e: BaseException) -> str:
    """The cause of a torch.load failure in one line, without torch's advice to retry with weights_only=False
    (that would run whatever code the file holds)."""
    text = str(e)
    if "Weights only load failed" in text:
        detail = next((line.strip() for line in text.splitlines()
                       if "GLOBAL" in line or "Unsupported" in line or "global" in line.lower()[:40]), "")
        return ("it holds Python objects other than tensors and plain data, which are never loaded "
                f"(weights_only=True){': ' + detail if detail else ''}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


LOAD_ERRORS = (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError,
               AttributeError, IndexError, KeyError, UnicodeDecodeError, RecursionError, MemoryError)


def load_plain(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``, without torch's warnings on stderr: a file pickled with another
    protocol (a planted payload, say) gets a two-line UserWarning before its refusal, and the caller's
    one-line error says enough. Raises what torch.load raises (:data:`LOAD_ERRORS`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint folder or its state file (state.safetensors, or an earlier version's state.pt); a
    missing, truncated or corrupt file is a CheckpointError."""
    path = Path(path)
    file = (state_file(path) or path / STATE_FILE) if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {str(file)!r} does not exist")
    try:
        if file.suffix == ".safetensors":
            state = plain_state.load(file, map_location)
        else:
            state = load_plain(file, map_location)
    except plain_state.PlainStateError as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt or truncated: {e}") from None
    except LOAD_ERRORS as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt or truncated: {torch_load_error(e)}") from None
    required = {"model", "ema", "step", "betas", "config"}
    if not isinstance(state, dict) or not required <= set(state):
        missing = sorted(required - set(state)) if isinstance(state, dict) else sorted(required)
        raise CheckpointError(f"checkpoint file {str(file)!r} lacks {missing}")
    kinds = {"model": dict, "ema": dict, "config": dict, "betas": torch.Tensor}
    for key, kind in kinds.items():
        if not isinstance(state[key], kind):
            raise CheckpointError(f"checkpoint file {str(file)!r}: '{key}' must be a {kind.__name__}, "
                                  f"got {type(state[key]).__name__}")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"checkpoint file {str(file)!r}: 'step' must be an integer >= 0, got {state['step']!r:.40}")
    return state


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint folder with the highest step under ``folder`` (a run folder), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and state_file(p)]
    return max(found)[1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (or state file) as given, or the latest checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir() and not any((path / name).exists() for name in STATE_FILES):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint_XXXXXXXX folder with a {' or '.join(STATE_FILES)} under {str(path)!r}")
        return found
    return path


def config_of(state: dict, where: str = "checkpoint") -> Config:
    """The config a checkpoint was trained with; fields it predates keep the meaning they had then
    (:data:`akod_ray.config.CHECKPOINT_DEFAULTS`)."""
    stored = {k: dict(v) if isinstance(v, dict) else v for k, v in state["config"].items()}
    for (section, name), value in CHECKPOINT_DEFAULTS.items():
        part = stored.get(section)
        if isinstance(part, dict) and name not in part:
            part[name] = value
    for section, name in RETIRED_FIELDS | {k for k, bad in RETIRED_VALUES.items()
                                           if isinstance(stored.get(k[0]), dict) and stored[k[0]].get(k[1]) in bad}:
        if isinstance(stored.get(section), dict):
            stored[section].pop(name, None)
    try:
        return config_from_dict(stored)
    except ConfigError as e:
        raise CheckpointError(f"{where}: stored config is invalid: {e}") from None


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, DiffusionProcess, Config]:
    """The EMA weights of a checkpoint in a U-Net in eval mode, its diffusion process, and its config."""
    state = load_state(path)
    where = f"checkpoint {str(path)!r}"
    cfg = config_of(state, where)
    try:
        process = DiffusionProcess(validate_betas(state["betas"], cfg.diffusion.T, name="betas"))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    model = UNet(cfg.model)
    shadow = state["ema"].get("shadow")
    params = list(model.parameters())
    if not isinstance(shadow, list) or len(shadow) != len(params):
        n = len(shadow) if isinstance(shadow, list) else type(shadow).__name__
        raise CheckpointError(f"{where}: its EMA holds {n} tensors, the model has {len(params)} parameters "
                              "(sampling uses the EMA weights)")
    try:
        model.load_state_dict(state["model"])
        for i, (p, s) in enumerate(zip(params, shadow)):
            if not isinstance(s, torch.Tensor) or s.shape != p.shape or not torch.is_floating_point(s):
                raise ValueError(f"EMA tensor {i} does not match the model's parameter of shape {list(p.shape)}")
            if not torch.isfinite(s).all():
                raise ValueError(f"EMA tensor {i} holds NaN or inf")
            p.data.copy_(s)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where} does not match its config's model: {torch_load_error(e)}") from None
    return model.to(device).eval(), process, cfg
