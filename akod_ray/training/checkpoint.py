"""Checkpoints: tensors and plain data only, in a file that is read without unpickling anything.

A checkpoint is a folder ``checkpoint_<step:08d>/`` holding ``state.safetensors`` (model, EMA,
optimizer, step, data position, schedule betas, config, and for AKOD the RL state: the tensors as
safetensors tensors, the rest as JSON in its header, :mod:`akod_ray.training.plain_state`) and,
``manifest.json`` (each file's size and sha256, written last: :func:`write_checkpoint`). The state file is
written to a temporary name and renamed, and a run's checkpoint folder is renamed into place whole, so a
crash never leaves a half-written one locally. In an object store, where nothing can be renamed, a
checkpoint folder exists only once its manifest and every file it lists are there at their sizes
(:func:`checkpoint_complete`), and a state file is loaded only when it matches the manifest: a torn
upload is never read as a checkpoint (akod_ray/storage.py). Checkpoints of earlier versions hold ``state.pt``
(``torch.save``) instead; they still load, with ``torch.load(weights_only=True)``, which refuses any
pickled object other than tensors and plain data.
"""

from __future__ import annotations

import io
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
from akod_ray import storage
from akod_ray.storage import StoragePath, location
from akod_ray.training import plain_state

STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # torch.save, before issue 23
STATE_FILES = (STATE_FILE, LEGACY_STATE_FILE)  # the one a checkpoint folder holds, in order of preference
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def atomic_torch_save(obj: Any, path: StoragePath) -> StoragePath:
    """``torch.save`` of plain data, published whole (storage.write_bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return storage.write_bytes(path, buf.getvalue())


def save_state(folder: str | Path, state: dict) -> Path:
    """Write ``state`` to ``folder/state.safetensors`` atomically; returns the folder. A value that is not a
    tensor or plain data is a CheckpointError naming where it sits (nothing is written)."""
    folder = Path(folder)
    try:
        plain_state.save(state, folder / STATE_FILE)
    except TypeError as e:
        raise CheckpointError(f"checkpoint state for {str(folder)!r} cannot be stored: {e}") from None
    return folder


def write_checkpoint(folder: Path, state: dict) -> Path:
    """A whole checkpoint in the local folder ``folder`` (a staging folder that is then renamed or uploaded):
    its state file, then its manifest."""
    save_state(folder, state)
    storage.write_manifest(folder)
    return folder


def state_file(folder: str | StoragePath) -> StoragePath | None:
    """The state file of a checkpoint folder (:data:`STATE_FILES`), or None."""
    folder = location(folder)
    return next((folder / name for name in STATE_FILES if storage.is_file(folder / name)), None)


def checkpoint_complete(folder: StoragePath) -> bool:
    """Is this checkpoint folder whole? In an object store: its manifest and every file it lists, a state file
    among them (a torn upload or a half-done deletion is not). Locally, where folders are renamed into place
    whole: a state file."""
    if storage.is_remote(folder):
        files = storage.complete_files(folder)
        return files is not None and any(name in files for name in STATE_FILES)
    return state_file(folder) is not None


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
    if storage.is_remote(path):
        path = io.BytesIO(storage.read_bytes(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint folder or its state file (state.safetensors, or an earlier version's state.pt); a
    missing, truncated or corrupt file is a CheckpointError."""
    path = location(path)
    file = (state_file(path) or path / STATE_FILE) if storage.is_dir(path) else path
    if not storage.is_file(file):
        raise CheckpointError(f"checkpoint file {str(file)!r} does not exist")
    if storage.is_remote(file) and storage.read_manifest(file.parent) is None:
        raise CheckpointError(f"checkpoint file {str(file)!r} has no {storage.MANIFEST} beside it: its upload did not "
                              "finish, or it is no checkpoint of this project (an object store's checkpoints are whole "
                              "only with their manifest)")
    try:
        with storage.local_copy(file) as local:
            problem = storage.manifest_problem(file.parent, file.name, local)
            if problem is not None:
                raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt or truncated: {problem}")
            if file.suffix == ".safetensors":
                state = plain_state.load(local, map_location)
            else:
                state = load_plain(local, map_location)
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


def latest_checkpoint(folder: str | StoragePath) -> StoragePath | None:
    """The whole checkpoint folder (:func:`checkpoint_complete`) with the highest step under ``folder`` (a run
    folder), or None."""
    found = sorted(((int(m.group(1)), e.path) for e in storage.list_dir(folder)
                    if e.is_dir and (m := CHECKPOINT_RE.match(e.path.name))), reverse=True)
    return next((p for _, p in found if checkpoint_complete(p)), None)


TRAIN_INDEX = "checkpoint_manager_snapshot.json"  # Ray Train's own list of a run's checkpoints, in the run folder


def registered_checkpoint(run_dir: str | StoragePath) -> StoragePath | None:
    """The checkpoint a Ray Train run resumes from: the latest that Train's index (:data:`TRAIN_INDEX`) registered,
    or None without an index (Train then starts at step 0).

    Not :func:`latest_checkpoint`: a worker uploads a checkpoint before the controller registers it, so a run killed
    in between has a whole checkpoint folder newer than the one its trunk resumes from. Whatever else resumes with
    the trunk (the AKOD driver's PPO policy) takes this one. An index that cannot be read is
    :func:`akod_ray.training.trainer.check_train_index`'s to report; here it is None as well."""
    import json

    try:
        index = json.loads(storage.read_bytes(location(run_dir) / TRAIN_INDEX).decode("utf-8"))
        name = index["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, RecursionError, TypeError, KeyError):
        return None
    return location(run_dir) / name if isinstance(name, str) and CHECKPOINT_RE.match(name) else None


def resolve_checkpoint(path: str | StoragePath) -> StoragePath:
    """A checkpoint folder (or state file) as given, or the latest checkpoint of a run folder."""
    path = location(path)
    # a checkpoint folder whose state file is spoiled (even a folder in its place) is refused as that file
    if storage.is_dir(path) and not any(storage.exists(path / name) for name in STATE_FILES):
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


def load_for_sampling(path: str | StoragePath, device: str | torch.device = "cpu") -> tuple[UNet, DiffusionProcess, Config]:
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
