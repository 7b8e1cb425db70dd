"""Two workers agree on divergence before a checkpoint (issue 18, items 6 and 7), without Ray.

Two processes run the training loop under DDP on a gloo process group, with a WorkerEnv that
does what Ray Train's does (tests/test_train_ray.py runs the real one, slowly): all-reduce,
all-gather, and a report in which every worker takes part (rank 0 writes the checkpoint, then
every worker waits for the others, as ``ray.train.report`` does). A worker that raised while the
other waits in a collective would hang it; the group's timeout turns that into a failure here.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from akod_ray.training.checkpoint import latest_checkpoint, load_state
from akod_ray.training.local import LocalEnv

STEPS, CKPT_EVERY, BAD_STEP = 6, 2, 4  # the bad step is a checkpoint step, not a log step
COLLECTIVE_TIMEOUT_S = 60


class GlooEnv:
    """RayTrainEnv's contract on a plain gloo group (CPU)."""

    def __init__(self, rank: int, world_size: int, run_dir: Path):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self.local = LocalEnv(run_dir, num_to_keep=10)

    def prepare_model(self, model):
        return torch.nn.parallel.DistributedDataParallel(model)

    def all_reduce_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def broadcast(self, tensor):
        dist.broadcast(tensor, src=0)
        return tensor

    def gather(self, tensor):
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def resume_state(self):
        return self.local.resume_state()

    def report(self, metrics, state, step):
        if state is not None:
            self.local.report(metrics, state, step)
        dist.barrier()


def _inject(run, kind: str) -> None:
    """On this worker only, at step BAD_STEP: an infinite gradient (which DDP's all-reduce carries to
    every worker) or a NaN loss that this worker alone records (its gradients stay finite)."""
    if kind == "gradient":
        calls = []

        def hook(grad):
            calls.append(1)
            return torch.full_like(grad, float("inf")) if len(calls) == BAD_STEP else grad

        next(run.raw.parameters()).register_hook(hook)
    else:
        update = run.runner._update

        def nan_loss(loss):
            return update(loss + float("nan") if run.runner._calls == BAD_STEP else loss)

        run.runner._update = nan_loss


def _worker(rank: int, world_size: int, port: int, root: str, cases: list[tuple[str, str]], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    from akod_ray.config import save_config
    from akod_ray.data.sources import load_training_data
    from akod_ray.errors import AkodError
    from akod_ray.training.loop import TrainingRun
    from akod_ray.training.schedule_source import fixed_source
    from test_train_local import tiny_config

    try:
        for name, kind in cases:
            cfg = tiny_config(Path(root), name, STEPS, ckpt_every=CKPT_EVERY, log_every=10)
            if rank == 0:
                save_config(cfg, cfg.run_dir)
            dist.barrier()
            run = TrainingRun(cfg, load_training_data(cfg, None), GlooEnv(rank, world_size, cfg.run_dir), cfg.run_dir,
                              fixed_source(cfg))
            if rank == 1:
                _inject(run, kind)
            try:
                run.resume()
                run.run()
                out[(name, rank)] = "finished"
            except AkodError as e:
                out[(name, rank)] = str(e)
    except Exception as e:  # noqa: BLE001 - a hang's timeout, reported to the test
        out[("error", rank)] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_stop_together_and_never_checkpoint_a_divergence_that_one_of_them_saw(tmp_path):
    cases = [("gradient", "gradient"), ("loss", "loss")]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), cases, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=2 * COLLECTIVE_TIMEOUT_S + 120)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        out = dict(out)
    assert not alive and all(p.exitcode == 0 for p in procs), out
    assert not any(k[0] == "error" for k in out), out
    # an infinite gradient on worker 1 reaches both through the all-reduce: both see it
    assert out[("gradient", 0)] == out[("gradient", 1)] == "training diverged: gradient norm is inf at step 4 on worker 0"
    # a NaN loss that worker 1 alone recorded: worker 0 stops too, naming it
    assert out[("loss", 0)] == out[("loss", 1)] == "training diverged: loss is nan at step 4 on worker 1"
    for name, _ in cases:
        last = load_state(latest_checkpoint(tmp_path / name))
        assert last["step"] == BAD_STEP - CKPT_EVERY, name
        assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
        assert all(torch.isfinite(s).all() for s in last["ema"]["shadow"])
