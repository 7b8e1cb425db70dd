"""A single-process WorkerEnv: the training loop without Ray (tests, debugging, benchmarks)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from akod_ray.training.checkpoint import CHECKPOINT_RE, checkpoint_dir_name, latest_checkpoint, load_state, save_state


class LocalEnv:
    rank = 0
    world_size = 1

    def __init__(self, run_dir: Path, num_to_keep: int = 2, device: str | torch.device = "cpu"):
        self.run_dir = Path(run_dir)
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
        if state is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / checkpoint_dir_name(step)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_ckpt_", dir=self.run_dir))
        save_state(tmp, state)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        ckpts = sorted(p for p in self.run_dir.iterdir() if CHECKPOINT_RE.match(p.name))
        for old in ckpts[: max(0, len(ckpts) - self.num_to_keep)]:
            shutil.rmtree(old)
