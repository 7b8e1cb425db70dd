"""The training loop of one worker: it connects data, the pure train step, schedules,
checkpoints and metrics. Where it runs (a Ray Train worker, or one local process) is a
:class:`WorkerEnv`; the loop itself imports nothing from Ray, and nothing from the RL side:
a :class:`ScheduleSource` hands it schedules.

Phases of :func:`run_training`:
  1. build: model, optimizer, EMA, data stream, reference protocol (:class:`TrainingRun`);
  2. resume from the latest checkpoint, if any;
  3. per optimizer step:
     a. at a segment start, the source gives the segment's schedule (the table of noise levels the
        step reads) and, for the adaptive arms, a :class:`~akod_ray.training.adaptation.StepSampler`
        that draws each image's step instead of uniform t (the DKO's policy, an importance sampler);
     b. one train step (micro-batches, all-reduce under DDP), EMA update; its t, noise and
        dropout draws depend on (train.seed, rank, step) only (:func:`step_seed`);
     c. at a segment end, the source hears of it (the AKOD source posts the segment's rewards);
     d. at intervals: metrics record, fid_c10, sample grid, checkpoint, each at most once per step,
        after the divergence check (a NaN or inf loss or gradient norm on any worker stops every
        worker: :meth:`TrainingRun.read_loss`), with the EMA weights in eval mode; then one report
        (with the checkpoint when one is due), so Train and Tune see every log interval.

Budget. ``train.max_wall_s`` counts budget seconds on ``train.budget_clock`` (wall-clock, or
this process's CPU time): everything but evaluation (metrics records, fid_c10, sample grids),
so schedule waits, credits and the learner's updates count, as an arm's own cost.
"""

from __future__ import annotations

import contextlib
import copy
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
from akod_ray.evaluation.sampling import sample_as_configured, sampling_record
from akod_ray.errors import CheckpointError
from akod_ray.models.unet import UNet
from akod_ray.reporting.grids import save_grid
from akod_ray.training import credit
from akod_ray.training.adaptation import EDM2Weighting, StepSampler
from akod_ray.training.ema import EMA
from akod_ray.training.fast_step import FastStep, resolve_compile, use_channels_last
from akod_ray.training.step import Divergence, ReferenceProtocol, StepOptions, lr_at, make_optimizer


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
    """A run of steps trained with one schedule (its table of noise levels).

    ``sampler`` draws each image's step (default: uniform t); ``sampling_process`` is the schedule that
    evaluation samples with on its own grid and that checkpoints store (default: ``process``)."""

    process: DiffusionProcess
    length: int
    request_id: int | None = None
    sampler: StepSampler | None = None
    sampling_process: DiffusionProcess | None = None


class Trunk(Protocol):
    """What a schedule source may do with the trunk (the run's model) between and within segments."""

    step: int
    stream: BatchStream  # the data stream (a source may peek at the next batches' images)
    def reference(self) -> dict: ...  # {"ref_loss", "loss_profile", "profile_logsnr", "step"} of the trunk now
    def reward_profile(self) -> dict: ...  # {"profile", "profile_logsnr", "probe_loss", "step"}: the fixed reward probe now
    def probe_direction(self, seed: int) -> tuple[list[torch.Tensor], float]: ...  # (u = P grad M, M), credit.py
    def image_credits(self, x0, t, noise, direction) -> tuple[torch.Tensor, torch.Tensor | None]: ...  # (d_i, L_i)
    def learning_rate(self) -> float: ...
    def branch(self, process: DiffusionProcess, steps: int, salt: int = 0) -> dict: ...  # train a branch, score it, undo it


class ScheduleSource(Protocol):
    def next_segment(self, step: int, steps_left: int, trunk: Trunk) -> Segment: ...
    def finish_segment(self, segment: Segment, result: dict, trunk: Trunk) -> None: ...
    def heartbeat(self, step: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class FixedSchedule:
    """A fixed schedule (linear, cosine or a schedule file): one segment for the whole run; with a
    ``sampler`` (``diffusion.adaptation=importance``) each image's step comes from it, not uniform t."""

    def __init__(self, betas: torch.Tensor, sampler=None):
        self.process = DiffusionProcess(betas)
        self.sampler = sampler

    def next_segment(self, step: int, steps_left: int, trunk: Trunk) -> Segment:
        return Segment(self.process, steps_left, sampler=self.sampler)

    def finish_segment(self, segment: Segment, result: dict, trunk: Trunk) -> None:
        pass

    def heartbeat(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None and state.get("sampler"):
            self.sampler.load_state_dict(state["sampler"])


def reference_process(cfg: Config) -> DiffusionProcess:
    """The reference protocol's process: log-SNR linear in t between the DKO endpoints."""
    return DiffusionProcess(uniform_logsnr_betas(cfg.diffusion.T, cfg.dko.logsnr_max, cfg.dko.logsnr_min))


def offline_fid(cfg: Config, model: torch.nn.Module, process: DiffusionProcess, env: WorkerEnv, step: int) -> dict:
    """fid_c10 (and Inception FID where eval.fid asks and the weights are present) of eval.fid_samples EMA
    samples, spread over the workers: :func:`akod_ray.evaluation.fid_run.evaluate_in_run` ({} without the
    shipped classifier: a run never fails for want of an evaluation network)."""
    from akod_ray.evaluation.fid_run import evaluate_in_run

    return evaluate_in_run(cfg, model, process, env, step)


EVALUATION = ("metrics", "fid", "samples")  # timer kinds that never count against a time budget


@dataclass
class Timers:
    """Wall seconds in denoiser train steps and in everything else, by kind; and the budget clock.

    ``budget()`` is the clock's time since the start minus the time spent in evaluation
    (:data:`EVALUATION`), on wall-clock or this process's CPU time.
    """

    clock: str = "wall"
    train: float = 0.0
    other: dict[str, float] = field(default_factory=dict)
    excluded: float = 0.0  # budget-clock seconds spent in evaluation

    def __post_init__(self) -> None:
        self._clock = time.process_time if self.clock == "cpu" else time.perf_counter
        self._start = self._clock()

    def budget(self) -> float:
        return self._clock() - self._start - self.excluded

    def move_from_train(self, dst: str, seconds: float) -> None:
        """Re-label ``seconds`` measured as training as ``dst`` (work nested inside a train step)."""
        if seconds > 0:
            self.train -= seconds
            self.other[dst] = self.other.get(dst, 0.0) + seconds

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Re-label ``seconds`` measured under ``src`` as ``dst`` (work nested inside a measured wait)."""
        if seconds > 0:
            self.other[src] = self.other.get(src, 0.0) - seconds
            self.other[dst] = self.other.get(dst, 0.0) + seconds

    @contextlib.contextmanager
    def measure(self, kind: str):
        t, c = time.perf_counter(), self._clock()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            if kind == "train":
                self.train += dt
            else:
                self.other[kind] = self.other.get(kind, 0.0) + dt
            if kind in EVALUATION:
                self.excluded += self._clock() - c


class MetricsLog:
    """Rank 0's metrics: metrics.jsonl (one JSON object per interval) and TensorBoard events."""

    def __init__(self, run_dir: Path, resume_step: int):
        run_dir.mkdir(parents=True, exist_ok=True)
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

    def image(self, path: Path, step: int) -> None:
        """A sample grid (PNG) into TensorBoard's images, beside the scalars."""
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.tb.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one worker's t and noise draws at one step: distinct for every (seed, rank, step)."""
    return (((seed * 1_000_003 + rank) << 32) + step) % 2**63


def global_seed(seed: int) -> int:
    """The global generator's seed (dropout's masks) for the step whose t and noise seed is ``seed``.

    A bijection of ``seed`` (an odd multiplier is invertible mod 2**63), so the masks too depend on
    (train.seed, rank, step) only: a resumed run draws what the uninterrupted one drew, replays of a
    branch draw alike, and workers draw distinct masks, as one process would for the whole batch.
    """
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63


BRANCH_SALT = 0x5EED_B7A9C4  # branch draws never coincide with the trunk's


class TrainingRun:
    """One worker's training run: the phases of :func:`run_training` as methods."""

    # ------------------------------------------------------------------ 1. build

    def __init__(self, cfg: Config, data: TrainingData, env: WorkerEnv, run_dir: Path, schedules: ScheduleSource):
        self.cfg, self.env, self.run_dir, self.schedules = cfg, env, Path(run_dir), schedules
        tc = cfg.train
        self.tc = tc
        torch.manual_seed(tc.seed)  # the same initial weights on every worker
        mode, _ = resolve_compile(tc.compile, env.device, distributed=env.world_size > 1)
        self.channels_last = use_channels_last(tc.channels_last, mode, env.device)  # NCHW when compiled on CUDA
        model = UNet(cfg.model).to(env.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = env.prepare_model(model)
        self.raw = getattr(self.model, "module", self.model)
        self.optimizer = make_optimizer(self.raw, tc.lr, tc.weight_decay)
        self.ema = EMA(self.raw, tc.ema_decay)
        self.stream = BatchStream(data.train, tc.batch_size, env.rank, env.world_size, tc.grad_accum, cfg.data.seed)
        self.stream.move_to(env.device)  # the images on the accelerator when they fit (CIFAR-10: 150 MB)
        self.opts = StepOptions(cfg.diffusion.min_snr_gamma, tc.bf16, tc.grad_clip)
        # EDM2's learned uncertainty weighting (diffusion.adaptation=edm2) is the step's objective
        self.objective = EDM2Weighting(tc.lr).to(env.device) if cfg.diffusion.adaptation == "edm2" else None
        # The step, built once: tables on the device, no host sync inside, the EMA update included,
        # compiled / captured per train.compile (one printed line if that fails and it falls back).
        self.runner = FastStep(self.model, self.optimizer, self.opts, cfg.diffusion.T, tc.compile, ema=self.ema,
                               log=print if env.rank == 0 else lambda _: None, objective=self.objective)
        share = data.val.shape[0] // env.world_size  # the reference protocol on this worker's share
        self.val_x0 = to_model_range(data.val[env.rank * share:(env.rank + 1) * share]).to(env.device)
        self.ref = ReferenceProtocol(reference_process(cfg), self.val_x0, tc.ref_grid, seed=tc.seed + 1234,
                                     batch=tc.val_batch)
        # The reward probe (rl.reward_images held-out images at rl.reward_grid levels where rl.reward_metric puts
        # its mass, fixed noise): the metric the AKOD credit improves, scored on demand (benches, the policy gain)
        probe_share = max(cfg.rl.reward_images // env.world_size, 1)
        self.reward_probe = credit.LevelProbe(self.val_x0[:probe_share], credit.metric_quantiles(
            cfg.rl.reward_metric, cfg.dko.logsnr_max, cfg.dko.logsnr_min, cfg.rl.reward_grid), seed=tc.seed + 4321,
            batch=tc.val_batch)
        self._probe: dict | None = None  # the trunk's reward-probe profile, cached for self.step
        self.gen = torch.Generator(device=env.device)  # re-seeded at every step, see train_one_step
        self.timers = Timers(clock=tc.budget_clock)
        self.step, self.wall_offset, self.budget_offset = 0, 0.0, 0.0
        self.process: DiffusionProcess | None = None
        self.sampling_process: DiffusionProcess | None = None  # what evaluation samples with on its own grid
        self.eval_model = None
        self._reference: dict | None = None  # the trunk's reference profile, cached for self.step
        self._evaluated: tuple[int, set[str]] = (-1, set())  # (step, what after_step did at that step)

    # ------------------------------------------------------------------ 2. resume

    def resume(self) -> None:
        state = self.env.resume_state()
        if state is None:
            return
        try:
            self.raw.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.stream.load_state_dict(state["data"])
            self.schedules.load_state_dict(state.get("schedule_source", {}))
            if self.objective is not None:
                self.objective.load_checkpoint_state(state["objective"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint at step {state.get('step')} does not fit this run: {e}") from None
        self.step, self.wall_offset = int(state["step"]), float(state["wall_s"])
        self.budget_offset = float(state.get("budget_s", self.wall_offset))
        done = state.get("evaluated")  # what the run that wrote the checkpoint did at its step
        if not (isinstance(done, list) and all(isinstance(k, str) for k in done)):
            done = self._due(False)  # a checkpoint from before this field: what was due at its step
        self._evaluated = (self.step, set(done) | {"checkpoint"})
        if self.env.rank == 0:
            print(f"[akod] resumed from the checkpoint at step {self.step}", flush=True)

    # ------------------------------------------------------------------ clocks and state

    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self._t0

    def budget(self) -> float:
        return self.budget_offset + self.timers.budget()

    def checkpoint_state(self) -> dict:
        return {
            "model": self.raw.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "data": self.stream.state_dict(), "step": self.step, "wall_s": self.wall(), "budget_s": self.budget(),
            "betas": self.sampling_process.betas, "config": config_to_dict(self.cfg),
            "schedule_source": self.schedules.state_dict(),
            **({"objective": self.objective.checkpoint_state()} if self.objective is not None else {}),
            "evaluated": sorted(self._evaluated[1]) if self._evaluated[0] == self.step else [],
        }

    # ------------------------------------------------------------------ 3b. one optimizer step

    def train_one_step(self, process: DiffusionProcess, seed: int, sampler: StepSampler | None = None,
                       k: int = 0) -> None:
        """One optimizer step and the EMA update. Nothing is read back: the loss and the divergence
        check are read at log intervals, segment ends and before evaluations and checkpoints
        (:meth:`read_loss`). ``sampler`` draws each image's step (the ``k``-th of its segment)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.tc.lr, self.tc.warmup_steps)
        # t, noise and dropout depend only on (seed, rank, step), so a resumed run draws exactly what
        # the uninterrupted run would have drawn (no generator is checkpointed): t and noise from
        # self.gen, dropout from the global generator, which the step seeds itself
        self.gen.manual_seed(seed)
        batch = self.stream.next(self.env.device, self.channels_last)
        if sampler is None:
            self.runner(batch, process, self.gen, rng_seed=global_seed(seed))
            return
        drawn = sampler.draw(self, batch, self.gen, k)
        self.runner(batch, process, self.gen, rng_seed=global_seed(seed), t=drawn.t, noise=drawn.noise,
                    weights=drawn.weights)
        sampler.observe(self.runner.last_losses)

    def read_loss(self, reset: bool = True) -> float:
        """The mean training loss since the last read (one host sync), with the divergence check.

        Every worker calls it at the same steps (log intervals, before checkpoints) and they agree:
        when any worker saw a NaN or inf loss or gradient norm since its last read, every worker
        raises the same TrainingDivergedError, naming the earliest such step (and its worker), so
        no worker goes on to a checkpoint or waits in a collective that the others left."""
        loss, bad = self.runner.read(self.step, reset)
        if self.env.world_size > 1:
            bad = self._agree(bad)
        if bad is not None:
            raise bad.error()
        return loss

    def _agree(self, bad: Divergence | None) -> Divergence | None:
        """Every worker's divergence (one all-gather); the earliest, or None when none diverged."""
        mine = [-1.0, 0.0, 0.0] if bad is None else [float(bad.step), float(bad.what == "gradient norm"), bad.value]
        rows = self.env.gather(torch.tensor([mine], dtype=torch.float64, device=self.env.device)).tolist()
        seen = [(int(step), rank, grad, value) for rank, (step, grad, value) in enumerate(rows) if step >= 0]
        if not seen:
            return None
        step, rank, grad, value = min(seen)
        return Divergence(step, "gradient norm" if grad else "loss", value, worker=rank)

    # ------------------------------------------------------------------ the Trunk protocol

    def _profile(self) -> list[float]:
        """The model's reference loss profile now, all-reduced over the workers."""
        return [self.env.all_reduce_mean(v) for v in self.ref.profile(self.model, self.tc.bf16)]

    def reference(self) -> dict:
        """The trunk's reference loss profile at the current step (computed once per step, then cached)."""
        if self._reference is None or self._reference["step"] != self.step:
            profile = self._profile()
            self._reference = {"ref_loss": sum(profile) / len(profile), "loss_profile": profile,
                               "profile_logsnr": self.ref.grid_logsnr, "step": self.step}
        return dict(self._reference)

    def _probe_profile(self) -> list[float]:
        """The reward probe's profile of the model now, all-reduced over the workers."""
        return [self.env.all_reduce_mean(v) for v in self.reward_probe.profile(self.model, self.tc.bf16)]

    def reward_profile(self) -> dict:
        """The trunk's reward-probe profile at the current step (computed once per step, then cached):
        {"profile", "profile_logsnr", "probe_loss" (M: the profile's mean, the levels being the metric's
        quantiles), "step"}."""
        if self._probe is None or self._probe["step"] != self.step:
            profile = self._probe_profile()
            self._probe = {"profile": profile, "profile_logsnr": self.reward_probe.grid_logsnr,
                           "probe_loss": sum(profile) / len(profile), "step": self.step}
        return dict(self._probe)

    def probe_direction(self, seed: int) -> tuple[list[torch.Tensor], float]:
        """u = P grad M on rl.probe_pairs fresh (image, level) pairs of this worker's held-out share, and M
        (:func:`akod_ray.training.credit.probe_direction`; this worker only, no collective)."""
        rl, dko = self.cfg.rl, self.cfg.dko
        pairs = credit.probe_pairs(self.val_x0, rl.probe_pairs, rl.reward_metric, dko.logsnr_max, dko.logsnr_min, seed)
        return credit.probe_direction(self.raw, self.optimizer, pairs, self.tc.bf16)

    def image_credits(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      direction: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d_i, L_i) of images about to be trained at steps ``t`` with ``noise`` (this worker only); L_i only
        when the reward needs it (rl.reward=paper)."""
        return credit.directional_derivatives(self.raw, self.runner.tables, x0, t, noise, direction,
                                              weighted=self.opts.min_snr_gamma is not None,
                                              fd_rel=self.cfg.rl.fd_rel, with_loss=self.cfg.rl.reward == "paper")

    def learning_rate(self) -> float:
        return lr_at(self.step, self.tc.lr, self.tc.warmup_steps)

    def branch(self, process: DiffusionProcess, steps: int, salt: int = 0, inspect=None) -> dict:
        """Train ``steps`` steps with ``process`` from the current weights, score, and undo.

        Every branch from the same trunk step (and ``salt``) sees the same t and noise draws
        (common random numbers), and the same batches, so branches differ by their schedule
        only. The trunk's EMA is restored with everything else.
        Returns the branch's reward-probe profile (``after_profile``) and, with ``inspect`` (a callable of
        this run), what it returns while the branch's weights and EMA are in place (``inspected``).
        """
        snapshot = self.runner.snapshot()  # weights, optimizer, EMA, loss sum: restored in place (no recapture)
        data_state = copy.deepcopy(self.stream.state_dict())
        step = self.step
        try:
            for j in range(steps):
                seed = step_seed(self.tc.seed, self.env.rank, step) + BRANCH_SALT * (salt + 1) + j
                self.train_one_step(process, seed % 2**63)
            out = {"after_profile": self._probe_profile()}
            if inspect is not None:
                out["inspected"] = inspect(self)
        finally:
            self.runner.restore(snapshot)
            self.stream.load_state_dict(data_state)
        return out

    # ------------------------------------------------------------------ 3d. evaluation

    def _eval_model(self):
        """The EMA weights in a U-Net in eval mode (no dropout), as `akod sample` and `akod fid` load them."""
        if self.eval_model is None:
            self.eval_model = UNet(self.cfg.model).to(self.env.device).eval()
        self.ema.copy_to(self.eval_model)
        return self.eval_model

    def metrics_record(self, loss: float, rate: tuple[float, float]) -> dict:
        last_t, last_step = rate
        return {
            "step": self.step, "wall_s": self.wall(), "budget_s": self.budget(), "loss": self.env.all_reduce_mean(loss),
            "ref_loss": self.reference()["ref_loss"],  # a segment end at this step already computed it
            "img_per_s": (self.step - last_step) * self.tc.batch_size / max(time.perf_counter() - last_t, 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"], "train_s": self.timers.train,
            **{f"other_{k}_s": v for k, v in self.timers.other.items()},
        }

    def sample_grid(self) -> Path:
        g = torch.Generator(device=self.env.device).manual_seed(self.tc.seed)
        n = self.cfg.eval.grid_size**2
        images = sample_as_configured(self.cfg, self._eval_model(), self.sampling_process, n, g, self.env.device)
        return save_grid(images, self.run_dir / "samples" / f"grid_{self.step:08d}.png", self.cfg.eval.grid_size)

    # ------------------------------------------------------------------ 3. the loop

    def budget_spent(self, log_due: bool) -> bool:
        """Is the time budget spent? One process checks at every call; workers agree at log intervals."""
        if self.tc.max_wall_s is None or not (log_due or self.env.world_size == 1):
            return False
        return self.env.all_reduce_mean(float(self.budget() >= self.tc.max_wall_s)) > 0

    def _due(self, last: bool) -> set[str]:
        """What falls on this step: "metrics", "fid", "samples", "checkpoint" (all of them at the end)."""
        every = {"metrics": self.tc.log_every, "fid": self.cfg.eval.fid_every, "samples": self.tc.sample_every,
                 "checkpoint": self.tc.ckpt_every}  # 0: only at the end (eval.fid_every)
        return {kind for kind, n in every.items() if last or (n > 0 and self.step % n == 0)}

    def after_step(self, last: bool) -> None:
        """3d. The metrics record, fid_c10, sample grid and checkpoint that fall on this step, each at
        most once: ``last`` may come for a step that was already evaluated (the budget ran out at the
        next segment start), and then adds only what the end of a run adds.

        The divergence check (:meth:`read_loss`) comes first, so a diverged model is neither evaluated
        nor checkpointed; the workers decide alike what is due, so they meet in the same collectives."""
        cfg, tc, env, timers = self.cfg, self.tc, self.env, self.timers
        if self._evaluated[0] != self.step:
            self._evaluated = (self.step, set())
        done = self._evaluated[1]
        due = self._due(last) - done
        done |= due
        if due and "metrics" not in due:
            with timers.measure("metrics"):
                self.read_loss(reset=False)  # a diverged run never overwrites its last good checkpoint
        if "metrics" in due:
            with timers.measure("metrics"):
                self.record = self.metrics_record(self.read_loss(), self.rate)
                self.rate = (time.perf_counter(), self.step)
                if self.log is not None:
                    self.log.write(self.record)
                    r = self.record
                    print(f"[akod] step {self.step}/{tc.steps} loss {r['loss']:.4f} ref_loss {r['ref_loss']:.4f} "
                          f"{r['img_per_s']:.1f} img/s lr {r['lr']:.2e} wall {r['wall_s']:.1f}s", flush=True)
        if "fid" in due:
            with timers.measure("fid"):
                fid = offline_fid(cfg, self._eval_model(), self.sampling_process, env, self.step)
                if fid and self.log is not None:
                    self.record = dict(self.record, **fid)
                    self.log.write({"step": self.step, "wall_s": self.record.get("wall_s", self.wall()),
                                    "budget_s": self.record.get("budget_s", self.budget()), **fid})
                    print(f"[akod] step {self.step} fid_c10 {fid['fid_c10']:.3f} (N={fid['fid_c10_n']})", flush=True)
        if env.rank == 0 and "samples" in due:
            with timers.measure("samples"):
                grid = self.sample_grid()
                if self.log is not None:
                    self.log.image(grid, self.step)
        if "checkpoint" in due:
            with timers.measure("checkpoint"):
                env.report(self.record or {"step": self.step}, self.checkpoint_state() if env.rank == 0 else None,
                           self.step)
        elif due & {"metrics", "fid"}:  # progress for Train, Tune and the Dashboard at every log interval
            with timers.measure("report"):
                env.report(self.record, None, self.step)

    def run(self) -> dict:
        cfg, tc, env, timers = self.cfg, self.tc, self.env, self.timers
        self.log = MetricsLog(self.run_dir, self.step) if env.rank == 0 else None
        self._t0 = time.perf_counter()
        self.rate = (self._t0, self.step)
        self.record = {}
        segment: Segment | None = None
        seg_left = 0
        try:
            while self.step < tc.steps:
                if seg_left == 0:  # a. the segment's schedule (and, for the AKOD arm, its decisions)
                    with timers.measure("schedule_wait"):
                        segment = self.schedules.next_segment(self.step, tc.steps - self.step, self)
                    if self.step > 0 and self.budget_spent(log_due=False):
                        # the wait spent the budget: the model stays as the last step left it
                        self.after_step(last=True)
                        break
                    self.process, seg_left = segment.process, segment.length
                    self.sampling_process = segment.sampling_process or segment.process
                with timers.measure("train"):  # b. one optimizer step (the EMA update included)
                    self.train_one_step(self.process, step_seed(tc.seed, env.rank, self.step), segment.sampler,
                                        segment.length - seg_left)
                if segment.sampler is not None:  # the credits measured inside the step are the learner's cost
                    timers.move_from_train("credit", segment.sampler.pop_overhead_s())
                self.step += 1
                seg_left -= 1
                self.schedules.heartbeat(self.step)

                if seg_left == 0 and segment.request_id is not None:  # c. the segment's result
                    with timers.measure("reward"):
                        self.read_loss(reset=False)  # a diverged trunk posts no reward: every worker stops here
                        self.schedules.finish_segment(segment, {"step": self.step, "wall_s": self.wall()}, self)

                spent = self.budget_spent(log_due=self.step % tc.log_every == 0)
                self.after_step(last=self.step == tc.steps or spent)  # d. evaluation
                if spent:
                    break
        finally:
            if self.log is not None:
                self.log.close()
        record = dict(self.record)
        record["train_s"] = timers.train
        record.update({f"other_{k}_s": v for k, v in timers.other.items()})
        return record


def run_training(cfg: Config, data: TrainingData, env: WorkerEnv, run_dir: Path, schedules: ScheduleSource) -> dict:
    """Train until cfg.train.steps (or the budget); returns the last metrics record (rank 0's view)."""
    run = TrainingRun(cfg, data, env, run_dir, schedules)  # 1. build
    run.resume()  # 2. resume
    return run.run()  # 3. the loop
