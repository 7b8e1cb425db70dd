"""The training loop of one worker: it connects data, the pure train step, schedules,
checkpoints and metrics. Where it runs (a Ray Train worker, or one local process) is a
:class:`WorkerEnv`; the loop itself imports nothing from Ray.

Order of work at each optimizer step:
  1. at a segment start, take the schedule for the segment (fixed, or the DKO's proposal);
  2. one train step (micro-batches, all-reduce under DDP), EMA update, NaN check;
  3. at a segment end, the reference loss (all-reduced) goes back to the schedule source;
  4. at intervals: progress line and metrics, sample grid, checkpoint (one report each).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from akod_ray.config import Config, config_to_dict
from akod_ray.data.parquet import to_model_range
from akod_ray.data.sources import TrainingData
from akod_ray.data.stream import BatchStream
from akod_ray.diffusion.dko import uniform_logsnr_betas
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.samplers import sample
from akod_ray.errors import CheckpointError
from akod_ray.models.unet import UNet
from akod_ray.reporting.grids import save_grid
from akod_ray.training.ema import EMA
from akod_ray.training.step import ReferenceProtocol, StepOptions, check_finite, lr_at, make_optimizer, schedule_loss, train_step


class WorkerEnv(Protocol):
    """What the loop needs from its surroundings (Ray Train or a local process)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def all_reduce_mean(self, value: float) -> float: ...
    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def resume_state(self) -> dict | None: ...
    def report(self, metrics: dict, state: dict | None, step: int) -> None: ...


@dataclass
class Segment:
    """A run of steps trained with one schedule."""

    process: DiffusionProcess
    length: int
    request_id: int | None = None


class ScheduleSource(Protocol):
    def next_segment(self, step: int, steps_left: int) -> Segment: ...
    def finish_segment(self, segment: Segment, result: dict) -> None: ...
    def heartbeat(self, step: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class FixedSchedule:
    """A fixed schedule (linear, cosine or a schedule file): one segment for the whole run."""

    def __init__(self, betas: torch.Tensor):
        self.process = DiffusionProcess(betas)

    def next_segment(self, step: int, steps_left: int) -> Segment:
        return Segment(self.process, steps_left)

    def finish_segment(self, segment: Segment, result: dict) -> None:
        pass

    def heartbeat(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def reference_process(cfg: Config) -> DiffusionProcess:
    """The reference protocol's process: log-SNR linear in t between the DKO endpoints."""
    return DiffusionProcess(uniform_logsnr_betas(cfg.diffusion.T, cfg.dko.logsnr_max, cfg.dko.logsnr_min))


def offline_fid(cfg: Config, model: torch.nn.Module, process: DiffusionProcess, env: WorkerEnv, step: int) -> dict:
    """fid_c10 of eval.fid_samples EMA samples, spread over the workers (each samples its share).

    Returns {} when the shipped classifier or its reference statistics are missing, so a
    run never fails for want of an evaluation network; the record then simply lacks fid_c10.
    """
    from akod_ray.errors import AkodError
    from akod_ray.evaluation.fid import (c10_activations, c10_implementation, default_c10_reference, frechet_distance,
                                         statistics)

    try:
        ref = default_c10_reference()
    except AkodError:
        return {}
    n = cfg.eval.fid_samples // env.world_size
    g = torch.Generator(device=env.device).manual_seed(cfg.train.seed * 7919 + env.rank * 104_729 + step)
    images = sample(model, process, n, g, cfg.eval.sampler, cfg.eval.ddim_steps, cfg.eval.ddim_eta, env.device,
                    bf16=cfg.train.bf16)
    acts = env.gather(torch.from_numpy(c10_activations(images.float(), device=env.device)).to(env.device)).cpu().numpy()
    value = frechet_distance(statistics(acts, "samples", c10_implementation()), ref)  # same feature space as ref
    return {"fid_c10": value, "fid_c10_n": int(acts.shape[0])}


@dataclass
class Timers:
    """Seconds spent in denoiser train steps and in everything else, by kind."""

    train: float = 0.0
    other: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def measure(self, kind: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            if kind == "train":
                self.train += dt
            else:
                self.other[kind] = self.other.get(kind, 0.0) + dt


class MetricsLog:
    """Rank 0's metrics: metrics.jsonl (one JSON object per interval) and TensorBoard events."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():  # drop records of steps after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one worker's t and noise draws at one step: distinct for every (seed, rank, step)."""
    return (((seed * 1_000_003 + rank) << 32) + step) % 2**63


def run_training(cfg: Config, data: TrainingData, env: WorkerEnv, run_dir: Path, schedules: ScheduleSource) -> dict:
    """Train until cfg.train.steps; returns the last metrics record (rank 0's view)."""
    tc = cfg.train
    device = env.device
    channels_last = tc.channels_last
    torch.manual_seed(tc.seed)  # the same initial weights on every worker
    model = UNet(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = env.prepare_model(model)
    raw = getattr(model, "module", model)
    optimizer = make_optimizer(raw, tc.lr, tc.weight_decay)
    ema = EMA(raw, tc.ema_decay)
    stream = BatchStream(data.train, tc.batch_size, env.rank, env.world_size, tc.grad_accum, cfg.data.seed)
    opts = StepOptions(cfg.diffusion.min_snr_gamma, tc.bf16, tc.grad_clip)

    # 1. Resume from the latest checkpoint, if any.
    step, wall_offset = 0, 0.0
    state = env.resume_state()
    if state is not None:
        try:
            raw.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            stream.load_state_dict(state["data"])
            schedules.load_state_dict(state.get("schedule_source", {}))
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint at step {state.get('step')} does not fit this run: {e}") from None
        step, wall_offset = int(state["step"]), float(state["wall_s"])
        if env.rank == 0:
            print(f"[akod] resumed from the checkpoint at step {step}", flush=True)

    # 2. The reference protocol on this worker's share of the held-out images.
    share = data.val.shape[0] // env.world_size
    val = data.val[env.rank * share:(env.rank + 1) * share]
    val_x0 = to_model_range(val).to(device)
    ref = ReferenceProtocol(reference_process(cfg), val_x0, tc.ref_grid, seed=tc.seed + 1234, batch=tc.val_batch)
    log = MetricsLog(run_dir, step) if env.rank == 0 else None
    eval_model = None
    timers = Timers()
    gen = torch.Generator(device=device)  # re-seeded at every step, see below
    images_per_step = tc.batch_size
    t0 = time.perf_counter()
    last_log_t, last_log_step = t0, step
    record: dict = {}
    budget_spent = False
    segment: Segment | None = None
    seg_left = 0
    process = None

    def wall() -> float:
        return wall_offset + time.perf_counter() - t0

    def checkpoint_state() -> dict:
        return {
            "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "data": stream.state_dict(), "step": step, "wall_s": wall(), "betas": process.betas,
            "config": config_to_dict(cfg), "schedule_source": schedules.state_dict(),
        }

    try:
        while step < tc.steps and not budget_spent:
            if seg_left == 0:
                with timers.measure("schedule_wait"):
                    segment = schedules.next_segment(step, tc.steps - step)
                process, seg_left = segment.process, segment.length
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc.lr, tc.warmup_steps)
            with timers.measure("train"):
                # t and noise depend only on (seed, rank, step), so a resumed run draws exactly
                # what the uninterrupted run would have drawn (the generator is not checkpointed)
                gen.manual_seed(step_seed(tc.seed, env.rank, step))
                micro = stream.next(device, channels_last)
                metrics = train_step(model, process, micro, optimizer, opts, gen)
                loss = metrics["loss"].item()
                check_finite(loss, step + 1)
                ema.update(raw)
            step += 1
            seg_left -= 1
            schedules.heartbeat(step)

            seg_ref_loss = None  # the segment's reference loss, reused by a metrics record at the same step
            if seg_left == 0 and segment.request_id is not None:
                with timers.measure("reward"):
                    seg_ref_loss = env.all_reduce_mean(ref.loss(model, tc.bf16))
                    result = {"ref_loss": seg_ref_loss, "step": step, "wall_s": wall()}
                    if cfg.rl.reward == "paper":
                        result["paper_loss"] = env.all_reduce_mean(schedule_loss(model, process, val_x0, bf16=tc.bf16))
                    schedules.finish_segment(segment, result)

            if step % tc.log_every == 0 or step == tc.steps:
                with timers.measure("metrics"):
                    # the same model at the same step gives the same (deterministic) reference loss
                    ref_loss = seg_ref_loss if seg_ref_loss is not None else env.all_reduce_mean(ref.loss(model, tc.bf16))
                    now = time.perf_counter()
                    record = {
                        "step": step, "wall_s": wall(), "loss": env.all_reduce_mean(loss), "ref_loss": ref_loss,
                        "img_per_s": (step - last_log_step) * images_per_step / max(now - last_log_t, 1e-9),
                        "lr": optimizer.param_groups[0]["lr"], "train_s": timers.train,
                        **{f"other_{k}_s": v for k, v in timers.other.items()},
                    }
                    last_log_t, last_log_step = time.perf_counter(), step
                    if tc.max_wall_s is not None and env.all_reduce_mean(float(wall() >= tc.max_wall_s)) > 0:
                        budget_spent = True  # every worker sees the same all-reduced decision
                    if log is not None:
                        log.write(record)
                        print(f"[akod] step {step}/{tc.steps} loss {record['loss']:.4f} ref_loss {ref_loss:.4f} "
                              f"{record['img_per_s']:.1f} img/s lr {record['lr']:.2e} wall {record['wall_s']:.1f}s", flush=True)

            last = step == tc.steps or budget_spent
            fid_due = last or (cfg.eval.fid_every > 0 and step % cfg.eval.fid_every == 0)
            if fid_due:
                with timers.measure("fid"):
                    if eval_model is None:
                        eval_model = UNet(cfg.model).to(device)
                    ema.copy_to(eval_model)
                    fid = offline_fid(cfg, eval_model, process, env, step)
                    if fid and log is not None:
                        record = dict(record, **fid)
                        log.write({"step": step, "wall_s": record.get("wall_s", wall()), **fid})
                        print(f"[akod] step {step} fid_c10 {fid['fid_c10']:.3f} (N={fid['fid_c10_n']})", flush=True)

            if env.rank == 0 and (step % tc.sample_every == 0 or last):
                with timers.measure("samples"):
                    if eval_model is None:
                        eval_model = UNet(cfg.model).to(device)
                    ema.copy_to(eval_model)
                    g = torch.Generator(device=device).manual_seed(tc.seed)
                    n = cfg.eval.grid_size**2
                    images = sample(eval_model, process, n, g, cfg.eval.sampler, cfg.eval.ddim_steps, cfg.eval.ddim_eta,
                                    device, bf16=tc.bf16)
                    save_grid(images, run_dir / "samples" / f"grid_{step:08d}.png", cfg.eval.grid_size)

            if step % tc.ckpt_every == 0 or last:
                with timers.measure("checkpoint"):
                    env.report(record or {"step": step}, checkpoint_state() if env.rank == 0 else None, step)
    finally:
        if log is not None:
            log.close()
    record = dict(record)
    record["train_s"] = timers.train
    record.update({f"other_{k}_s": v for k, v in timers.other.items()})
    return record
