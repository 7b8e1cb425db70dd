"""The Ray Train side of training: the per-worker function and its WorkerEnv.

Ray Train starts ``train_worker`` on every worker; it builds the loop's surroundings from
ray.train (rank, device, DDP, checkpoints, reports) and calls the Ray-free loop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from akod_ray.config import config_from_dict
from akod_ray.data.sources import load_training_data
from akod_ray import storage
from akod_ray.storage import location
from akod_ray.training.checkpoint import checkpoint_dir_name, load_state, write_checkpoint
from akod_ray.training.loop import run_training
from akod_ray.training.schedule_source import fixed_source


class RayTrainEnv:
    def __init__(self):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def all_reduce_mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every worker's equally shaped tensor along dim 0."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def resume_state(self) -> dict | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d, map_location="cpu")

    def report(self, metrics: dict, state: dict | None, step: int) -> None:
        """One round trip to the Train controller: metrics, and rank 0's checkpoint."""
        if state is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_dir_name(step))
            return
        tmp = Path(tempfile.mkdtemp(prefix="akod_ckpt_"))
        try:  # Ray Train uploads the folder to its storage file by file; the manifest makes it whole or absent
            write_checkpoint(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=checkpoint_dir_name(step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def train_worker(loop_config: dict) -> None:
    """Per-worker entry point: 1. config, 2. env, 3. data, 4. schedules, 5. the loop.

    ``loop_config``: the config dict, data_dir, run_dir, cpus_per_worker, and optionally
    ``source_factory(cfg, env, loop_config) -> ScheduleSource`` (default: the fixed schedule).
    """
    cfg = config_from_dict(loop_config["config"])
    run_dir = location(loop_config["run_dir"])
    env = RayTrainEnv()
    if env.device.type == "cpu" and loop_config.get("cpus_per_worker"):
        torch.set_num_threads(int(loop_config["cpus_per_worker"]))
    storage.write_text(run_dir / "workers" / f"rank{env.rank}.pid", str(os.getpid()))  # for operators and fault tests
    data = load_training_data(cfg, loop_config.get("data_dir"))
    # the AKOD driver passes its source (akod_ray.rl.worker_source); training/ never imports rl/
    schedules = (loop_config.get("source_factory") or fixed_source)(cfg, env, loop_config)
    run_training(cfg, data, env, run_dir, schedules)
