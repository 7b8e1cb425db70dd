"""A single-process WorkerEnv: the training loop without Ray (tests, debugging, benchmarks)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from akod_ray import storage
from akod_ray.storage import StoragePath, location
from akod_ray.training.checkpoint import (CHECKPOINT_RE, checkpoint_dir_name, latest_checkpoint, load_state,
                                          write_checkpoint)


class LocalEnv:
    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | StoragePath, num_to_keep: int = 2, device: str | torch.device = "cpu"):
        self.run_dir = location(run_dir)
        self.num_to_keep = num_to_keep
        self.device = torch.device(device)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_mean(self, value: float) -> float:
        return value

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def resume_state(self) -> dict | None:
        path = latest_checkpoint(self.run_dir)
        return None if path is None else load_state(path)

    def report(self, metrics: dict, state: dict | None, step: int) -> None:
        """The checkpoint, staged in a local folder (beside its place, or a temporary one for an object store) and
        published whole (storage.publish_folder); then the checkpoints beyond train.num_to_keep go."""
        if state is None:
            return
        local_run = not storage.is_remote(self.run_dir)
        if local_run:
            storage.make_dirs(self.run_dir)
        staging = Path(tempfile.mkdtemp(prefix=".tmp_ckpt_" if local_run else "akod_ckpt_",
                                        dir=self.run_dir if local_run else None))
        try:
            write_checkpoint(staging, state)
            storage.publish_folder(staging, self.run_dir / checkpoint_dir_name(step))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        ckpts = sorted(e.path for e in storage.list_dir(self.run_dir) if CHECKPOINT_RE.match(e.path.name))
        for old in ckpts[: max(0, len(ckpts) - self.num_to_keep)]:
            storage.delete_tree(old)
