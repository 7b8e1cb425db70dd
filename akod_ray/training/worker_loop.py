"""The Ray Train side of training: the per-worker function and its WorkerEnv.

Ray Train starts ``train_worker`` on every worker; it builds the loop's surroundings from
ray.train (rank, device, DDP, checkpoints, reports) and calls the Ray-free loop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import ray
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
    def __init__(self, tracking: dict | None = None):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.metrics = None  # rank 0 logs what it reports to MLflow when the driver opened a run (akod_ray.tracking)
        if tracking and self.rank == 0:
            from akod_ray.tracking import WorkerMetrics

            try:
                self.metrics = WorkerMetrics(tracking)
            except Exception as e:  # noqa: BLE001 - tracking is a convenience: a server this node cannot reach
                print(f"[akod] MLflow logging off: {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)

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
        """Metrics, and rank 0's checkpoint, to the Train controller (and to MLflow, on rank 0 when tracking).

        Without a checkpoint the report goes out asynchronously: Train's result queue holds one report and its
        controller takes it every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), so a synchronous report at every log
        interval would wait up to that long; asynchronous, only the ranks' agreement on the report waits
        (BENCHMARKS.md, "Reporting at every log interval"). A checkpoint report stays synchronous, after the
        reports before it."""
        if self.metrics is not None:
            self._track(metrics)
        if state is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_dir_name(step),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            return
        tmp = Path(tempfile.mkdtemp(prefix="akod_ckpt_"))
        try:  # Ray Train uploads the folder to its storage file by file; the manifest makes it whole or absent
            write_checkpoint(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=checkpoint_dir_name(step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _track(self, metrics: dict) -> None:
        try:
            self.metrics.log(metrics)
        except Exception as e:  # noqa: BLE001 - tracking is a convenience: a lost server never stops training
            self.metrics = None
            print(f"[akod] MLflow logging stopped: {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)


def train_worker(loop_config: dict) -> None:
    """Per-worker entry point: 1. config, 2. env, 3. data, 4. schedules, 5. the loop.

    ``loop_config``: the config dict, data_dir, run_dir, cpus_per_worker, and optionally
    ``source_factory(cfg, env, loop_config) -> ScheduleSource`` (default: the fixed schedule).
    """
    cfg = config_from_dict(loop_config["config"])
    run_dir = location(loop_config["run_dir"])
    env = RayTrainEnv(loop_config.get("tracking"))
    if env.device.type == "cpu" and loop_config.get("cpus_per_worker"):
        torch.set_num_threads(int(loop_config["cpus_per_worker"]))
    # the node beside the pid (first: the console names a line's trial by (node, pid), as pids repeat across nodes)
    storage.write_text(run_dir / "workers" / f"rank{env.rank}.node", ray.util.get_node_ip_address())
    storage.write_text(run_dir / "workers" / f"rank{env.rank}.pid", str(os.getpid()))  # for operators and fault tests
    data = load_training_data(cfg, loop_config.get("data_dir"))
    # the AKOD driver passes its source (akod_ray.rl.worker_source); training/ never imports rl/
    schedules = (loop_config.get("source_factory") or fixed_source)(cfg, env, loop_config)
    run_training(cfg, data, env, run_dir, schedules)
