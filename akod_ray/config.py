"""Typed configuration: frozen dataclasses, loaded from YAML, overridden with --set.

Every field is documented where it is declared and validated when the object is built, so
a bad value fails before anything starts, with a :class:`ConfigError` naming the field
(``train.batch_size must be >= 1, got 0``). The resolved configuration is written to the
run directory as YAML (:func:`save_config`) and reloads to an equal object.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import reprlib
import stat
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from akod_ray.errors import AkodError, ConfigError

SCHEDULES = ("linear", "cosine", "loglinear", "edm", "laplace", "akod", "file")
DATA_SOURCES = ("cifar10", "procedural")
REWARDS = ("credit", "paper")
# How the reward probe's per-level epsilon-MSE is weighted into one number, M (akod_ray/training/credit.py)
REWARD_METRICS = ("eps_uniform", "x0", "eps_edm", "eps_laplace", "eps_sigmoid")
NULL_REWARDS = ("none", "shuffle", "constant")
DKO_PRIORS = ("loglinear", "edm", "laplace")
ADAPTATIONS = ("none", "importance", "edm2")
BUDGET_CLOCKS = ("wall", "cpu")
# ddpm and ddim are written here (the reference); dpmpp_2m, unipc, euler and heun are diffusers' schedulers, adaptive
# takes per-image steps from sigma_local (akod_ray/diffusion/solvers.py, adaptive.py)
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "unipc", "euler", "heun", "adaptive")
SAMPLING_GRIDS = ("common", "own")
NOISE_CONDS = ("level", "schedule")
BUDGET_KINDS = ("images", "seconds")
SEARCHES = ("grid", "optuna")
SCHEDULERS = ("none", "asha")
# what a search minimizes: the trial's last fid_c10 or ref_loss, or fid_c10_final (sweep.referee_samples)
SEARCH_METRICS = ("fid_c10", "ref_loss", "fid_c10_final")
SEARCHABLE = ("diffusion.laplace_scale", "diffusion.laplace_loc")  # a fixed schedule's parameters
TRACKING = ("none", "mlflow")
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


# Limits that keep a run inside one machine's memory and time: a value past them cannot work
# (diffusion.T = 1e9 allocates tables until the machine runs out of memory).
IMAGE_SIZE = 32  # every dataset's images are 32 x 32 RGB (checked when the data files are opened)
MAX_T = 100_000  # diffusion steps: schedule tables and the DDPM sampler are O(T)
MAX_WIDTH = 4096  # U-Net and DKO layer widths
MAX_STEPS = 10**9  # optimizer steps and step intervals
MAX_IMAGES = 1_000_000  # images held in memory at once (a training subset, probes, FID samples)
MAX_BATCH = 65_536
MAX_SEED = 2**31 - 1
MAX_NAME = 200  # characters of a run or sweep name (one path component)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def show(value: Any) -> str:
    """A short one-line repr for messages (a config value can be a huge or deeply nested list)."""
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # an integer past Python's digit limit, ...
        return f"<{type(value).__name__}>"


def _check(cond: bool, name: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{name} {msg}, got {show(value)}")


def _finite(name: str, value: float) -> None:
    _check(math.isfinite(value), name, "must be a finite number", value)


def _at_most(name: str, value: float, limit: float, why: str = "") -> None:
    _check(value <= limit, name, f"must be <= {limit:,}{f' ({why})' if why else ''}", value)


def _plain_text(name: str, value: str | None) -> None:
    """No control, format or line-separator characters (NUL included): they break paths and log lines."""
    if value is not None:
        bad = [c for c in value if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
        _check(not bad, name, "must not contain control characters", value)


def check_name(name: str, value: str) -> None:
    """A run or sweep name is one folder under run.root: never a path, '.', '..' or a hidden control character."""
    _plain_text(name, value)
    _check(bool(value) and len(value) <= MAX_NAME, name, f"must be a non-empty name of at most {MAX_NAME} characters",
           value)
    _check("/" not in value and "\\" not in value, name, "must be a name without '/' or '\\' (one folder, not a path)",
           value)
    _check(value.strip(".") != "", name, "must not be '.' or '..' (it would name run.root or its parent)", value)


@dataclass(frozen=True)
class DiffusionConfig:
    T: int = 1000  # number of diffusion steps (DDPM: 1000)
    # linear | cosine | loglinear (uniform in log-SNR, the DKO's start) | edm (log-SNR at the quantiles of N(2.4, 2.4^2),
    # EDM's noise levels) | laplace (log-SNR at the quantiles of Laplace(0, laplace_scale), Hang et al. 2024) |
    # akod (learned by PPO) | file (a learned schedule file). loglinear, edm and laplace span [dko.logsnr_min, dko.logsnr_max].
    schedule: str = "linear"
    schedule_file: str | None = None  # schedule .json exported by an AKOD run, with schedule=file
    laplace_scale: float = 0.75  # scale of the laplace schedule (the best of 0.75, 1, 2 in a sweep: BENCHMARKS.md, "The pilot")
    # centre of the laplace schedule in log-SNR (Hang et al.: 0); > 0 trains more on low noise, < 0 on high noise. The
    # schedule must stay valid (beta_t <= 0.999 at its last step): the more concentrated, the less it may move up.
    laplace_loc: float = 0.0
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None = L_simple
    # Online adaptation without RL (akod_ray/training/adaptation.py), on the schedule's table: none | importance (a
    # loss-history importance sampler over noise levels; the objective stays the schedule's) | edm2 (EDM2's learned
    # uncertainty weighting of the F-type loss)
    adaptation: str = "none"
    adaptation_bins: int = 32  # importance: bins of the schedule's steps
    adaptation_decay: float = 0.1  # importance: how far each new loss moves its bin's average of loss^2
    adaptation_floor: float = 0.1  # importance: every bin keeps this share of its uniform-t probability

    def __post_init__(self) -> None:
        _check(self.T >= 2, "diffusion.T", "must be >= 2", self.T)
        _at_most("diffusion.T", self.T, MAX_T, "a memory-sized limit: schedule tables and DDPM sampling grow with T")
        if self.schedule == "linear":  # beta_T = 0.02 * 1000 / T must stay <= 0.999
            _check(self.T >= 21, "diffusion.T", "must be >= 21 for the linear schedule", self.T)
        _check(self.schedule in SCHEDULES, "diffusion.schedule", f"must be one of {SCHEDULES}", self.schedule)
        if self.schedule == "file":
            _check(bool(self.schedule_file), "diffusion.schedule_file", "must be set when diffusion.schedule=file", self.schedule_file)
        _plain_text("diffusion.schedule_file", self.schedule_file)
        _finite("diffusion.laplace_scale", self.laplace_scale)
        _check(0.05 <= self.laplace_scale <= 100, "diffusion.laplace_scale", "must be in [0.05, 100]", self.laplace_scale)
        _finite("diffusion.laplace_loc", self.laplace_loc)
        _check(-20.0 <= self.laplace_loc <= 20.0, "diffusion.laplace_loc", "must be in [-20, 20] (log-SNR)",
               self.laplace_loc)
        if self.min_snr_gamma is not None:
            _finite("diffusion.min_snr_gamma", self.min_snr_gamma)
            _check(self.min_snr_gamma > 0, "diffusion.min_snr_gamma", "must be > 0 or null", self.min_snr_gamma)
        _check(self.adaptation in ADAPTATIONS, "diffusion.adaptation", f"must be one of {ADAPTATIONS}", self.adaptation)
        _check(self.adaptation == "none" or self.schedule != "akod", "diffusion.adaptation",
               "must be none with diffusion.schedule=akod (the DKO sets the distribution)", self.adaptation)
        _check(self.adaptation == "none" or self.min_snr_gamma is None, "diffusion.adaptation",
               "must be none with diffusion.min_snr_gamma (one loss weighting at a time)", self.adaptation)
        _check(2 <= self.adaptation_bins <= self.T, "diffusion.adaptation_bins", f"must be in [2, diffusion.T={self.T}]",
               self.adaptation_bins)
        for name in ("adaptation_decay", "adaptation_floor"):
            _finite(f"diffusion.{name}", getattr(self, name))
        _check(0.0 < self.adaptation_decay <= 1.0, "diffusion.adaptation_decay", "must be in (0, 1]", self.adaptation_decay)
        _check(0.0 < self.adaptation_floor <= 1.0, "diffusion.adaptation_floor", "must be in (0, 1]", self.adaptation_floor)


@dataclass(frozen=True)
class ModelConfig:
    channels: tuple[int, ...] = (128, 256, 256, 512)  # width of each of the 4 resolution levels
    bottleneck_channels: int = 512  # width of the bottleneck (the paper: 512)
    num_res_blocks: int = 2  # residual blocks per level
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.1
    msfi: bool = True  # Multi-Scale Feature Integrator in the bottleneck (off: plain DDPM U-Net)
    beta_modulation: bool = True  # beta_t / log-SNR FiLM on the noise-prediction layer
    msfi_ffn_mult: int = 2  # hidden width of the MSFI feed-forward net, in bottleneck widths
    # What the MSFI and the modulation read besides log-SNR: level (neighbours at log-SNR +- level_offset and the beta of
    # a step of that size, computed from the noise level alone, so the network is the same function on any sampling grid)
    # | schedule (log-SNR of the training schedule's steps t-1, t+1 and its beta_t: version 1-2 checkpoints, tied to their
    # schedule; akod_ray/models/unet.py)
    noise_cond: str = "level"
    level_offset: float = 0.02  # log-SNR between the MSFI's neighbouring levels (one step of a 1,000-step grid uniform in log-SNR)

    def __post_init__(self) -> None:
        _check(len(self.channels) == 4, "model.channels", "must list 4 widths (four down/up blocks)", self.channels)
        for c in self.channels:
            _check(c >= 1, "model.channels", "must all be positive", self.channels)
            _check(c % 8 == 0, "model.channels", "must all be multiples of 8 (GroupNorm groups)", self.channels)
            _check(c <= MAX_WIDTH, "model.channels", f"must all be <= {MAX_WIDTH} (a memory-sized limit)", self.channels)
        _check(self.bottleneck_channels >= 8 and self.bottleneck_channels % 8 == 0, "model.bottleneck_channels",
               "must be a positive multiple of 8", self.bottleneck_channels)
        _at_most("model.bottleneck_channels", self.bottleneck_channels, MAX_WIDTH, "a memory-sized limit")
        _check(self.num_res_blocks >= 1, "model.num_res_blocks", "must be >= 1", self.num_res_blocks)
        _at_most("model.num_res_blocks", self.num_res_blocks, 16, "a memory-sized limit")
        levels = tuple(IMAGE_SIZE >> i for i in range(4))  # the feature-map sizes of the four levels
        for r in self.attention_resolutions:
            _check(r in levels, "model.attention_resolutions", f"must be feature-map sizes from {levels}",
                   self.attention_resolutions)
        _finite("model.dropout", self.dropout)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)
        _check(self.msfi_ffn_mult >= 1, "model.msfi_ffn_mult", "must be >= 1", self.msfi_ffn_mult)
        _at_most("model.msfi_ffn_mult", self.msfi_ffn_mult * self.bottleneck_channels, MAX_WIDTH * 4,
                 "model.msfi_ffn_mult * model.bottleneck_channels: a memory-sized limit")
        _check(self.noise_cond in NOISE_CONDS, "model.noise_cond", f"must be one of {NOISE_CONDS}", self.noise_cond)
        _finite("model.level_offset", self.level_offset)
        _check(0.0 < self.level_offset <= 5.0, "model.level_offset", "must be in (0, 5]", self.level_offset)


@dataclass(frozen=True)
class DKOConfig:
    kernel_size: int = 7  # Gaussian filter size k for sigma_local (the paper: 7; swept 3..11)
    hidden: tuple[int, ...] = (64, 64)  # DKO MLP hidden widths
    logsnr_max: float = 9.21  # log-SNR at t=1 (linear schedule's beta_1 = 1e-4); the anchors' and the DKO's range
    logsnr_min: float = -10.13  # log-SNR at t=T (linear schedule's abar_T)
    # The schedule whose steps the DKO reweights (a zero output trains exactly on it): loglinear | edm | laplace
    # (diffusion.laplace_scale; the best anchor measured: BENCHMARKS.md, "The pilot")
    prior: str = "laplace"
    bins: int = 32  # J: runs of the prior's steps the DKO chooses between (equal prior mass each)
    floor: float = 0.2  # every bin keeps at least this share of its prior probability (keeps the export valid: dko.py)
    probe_pool: int = 512  # training images the exported schedule averages the DKO's distribution over

    def __post_init__(self) -> None:
        k = self.kernel_size
        _check(k >= 3 and k % 2 == 1, "dko.kernel_size", "must be odd and >= 3", k)
        _check(k <= IMAGE_SIZE, "dko.kernel_size", f"must not exceed the image size {IMAGE_SIZE}", k)
        _check(all(h >= 1 for h in self.hidden) and len(self.hidden) >= 1, "dko.hidden", "must be positive widths", self.hidden)
        _check(len(self.hidden) <= 16 and all(h <= MAX_WIDTH for h in self.hidden), "dko.hidden",
               f"must be at most 16 widths of at most {MAX_WIDTH} (a memory-sized limit)", self.hidden)
        for name in ("logsnr_max", "logsnr_min", "floor"):
            _finite(f"dko.{name}", getattr(self, name))
        _check(self.logsnr_max > self.logsnr_min, "dko.logsnr_max", "must exceed dko.logsnr_min", self.logsnr_max)
        _check(-20.0 <= self.logsnr_min and self.logsnr_max <= 20.0, "dko.logsnr_max",
               "and dko.logsnr_min must lie in [-20, 20] (beta_1 rounds to 0 in float64 beyond)", self.logsnr_max)
        _check(self.prior in DKO_PRIORS, "dko.prior", f"must be one of {DKO_PRIORS}", self.prior)
        _check(2 <= self.bins <= 1000, "dko.bins", "must be in [2, 1000]", self.bins)
        _check(0.0 < self.floor <= 1.0, "dko.floor", "must be in (0, 1]", self.floor)
        _check(self.probe_pool >= 1, "dko.probe_pool", "must be >= 1", self.probe_pool)
        _at_most("dko.probe_pool", self.probe_pool, MAX_IMAGES // 10, "images held by every worker's rank 0")


@dataclass(frozen=True)
class DataConfig:
    source: str = "cifar10"  # cifar10 (Parquet folder) | procedural (seeded, no files)
    data_dir: str | None = None  # folder with train.parquet/test.parquet; None: AKOD_DATA_DIR, then the cache
    train_subset: int | None = None  # seeded random subset of the training set, by count; None = all
    val_size: int = 256  # held-out images for the reference validation loss
    seed: int = 0  # subset and shuffling seed

    def __post_init__(self) -> None:
        _check(self.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}", self.source)
        _plain_text("data.data_dir", self.data_dir)
        if self.train_subset is not None:
            _check(self.train_subset >= 1, "data.train_subset", "must be >= 1 or null", self.train_subset)
            _at_most("data.train_subset", self.train_subset, MAX_IMAGES * 10, "images held in memory by every worker")
        _check(self.val_size >= 1, "data.val_size", "must be >= 1", self.val_size)
        _at_most("data.val_size", self.val_size, MAX_IMAGES // 10, "held-out images evaluated at every log interval")
        _check(0 <= self.seed <= MAX_SEED, "data.seed", f"must be in [0, {MAX_SEED}]", self.seed)
        if self.source == "procedural":  # generated image by image in Python when a worker starts
            _at_most("data.train_subset", self.train_subset or 0, MAX_IMAGES // 5, "procedural images are generated one by one")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800_000  # optimizer steps
    batch_size: int = 64  # global batch (all workers, all accumulation micro-steps)
    grad_accum: int = 1  # micro-batches per optimizer step on each worker
    lr: float = 1e-4  # AdamW learning rate (the paper)
    weight_decay: float = 0.0
    warmup_steps: int = 1000  # linear learning-rate warm-up
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999
    bf16: bool = False  # bf16 autocast for the forward pass
    channels_last: bool = False  # NHWC memory format
    # How the training step runs (akod_ray/training/fast_step.py): eager | default (the U-Net compiled by
    # torch.compile) | reduce-overhead (default + the whole step captured in one CUDA graph; on a CPU or under
    # DDP it runs as default) | auto (reduce-overhead on one GPU, default under DDP on GPUs, eager on a CPU).
    # A failed compilation or capture prints one line and falls back. "eager", not "off": YAML reads off as false.
    compile: str = "auto"
    num_workers: int = 1  # Ray Train workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: int = 1  # CPUs (and torch threads) per worker when training on CPU
    log_every: int = 100  # steps between console progress lines / TensorBoard points
    ckpt_every: int = 5000  # steps between checkpoints (each is one report to Ray Train)
    sample_every: int = 10000  # steps between EMA sample grids
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 0  # Ray Train FailureConfig: worker-group restarts (-1 = forever)
    max_wall_s: float | None = None  # stop at the first log interval past this many budget seconds (a time budget)
    budget_clock: str = "wall"  # what max_wall_s counts: wall (wall-clock) | cpu (this process's CPU time: fair on a shared machine with 1 thread per run); evaluation (fid_c10, sample grids, metrics records) never counts
    val_batch: int = 64  # images per forward pass of the reference validation loss, per worker (memory; the value changes only by float rounding)
    ref_grid: int = 8  # log-SNR grid points of the reference protocol
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_workers", "cpus_per_worker", "log_every", "ckpt_every",
                     "sample_every", "num_to_keep", "val_batch", "ref_grid"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be >= 1", getattr(self, name))
        for name in ("steps", "log_every", "ckpt_every", "sample_every", "warmup_steps"):
            _at_most(f"train.{name}", getattr(self, name), MAX_STEPS)
        for name in ("batch_size", "val_batch"):
            _at_most(f"train.{name}", getattr(self, name), MAX_BATCH, "a memory-sized limit")
        for name, limit in (("num_workers", 1024), ("cpus_per_worker", 1024), ("num_to_keep", 1000), ("ref_grid", 1024)):
            _at_most(f"train.{name}", getattr(self, name), limit)
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay"):
            _finite(f"train.{name}", getattr(self, name))
        _check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0", self.grad_clip)
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)", self.ema_decay)
        _check(self.max_failures >= -1, "train.max_failures", "must be >= -1", self.max_failures)
        if self.max_wall_s is not None:
            _finite("train.max_wall_s", self.max_wall_s)
            _check(self.max_wall_s > 0, "train.max_wall_s", "must be > 0 or null", self.max_wall_s)
        _check(0 <= self.seed <= MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED}]", self.seed)
        _check(self.budget_clock in BUDGET_CLOCKS, "train.budget_clock", f"must be one of {BUDGET_CLOCKS}", self.budget_clock)
        compile_modes = ("auto", "eager", "default", "reduce-overhead")
        _check(self.compile in compile_modes, "train.compile", f"must be one of {compile_modes}", self.compile)
        per = self.num_workers * self.grad_accum
        _check(self.batch_size % per == 0, "train.batch_size",
               f"must be divisible by train.num_workers * train.grad_accum = {per}", self.batch_size)


@dataclass(frozen=True)
class RLConfig:
    segment_steps: int = 500  # steps of one decision window: one PPO episode, one request to the workers
    decision_every: int = 8  # every this many steps of a window is a decision step (the window's first included)
    decision_images: int = 8  # images of a decision step whose bins PPO draws and which get a reward (rank 0's first)
    # credit: each decision's first-order effect on the reward probe's metric, lr (P grad M) . g_i / (B M) (scaled by
    # rl.reward_scale) | paper: minus the image's own loss at its noise level (the paper's literal reward; it can be
    # gamed); akod_ray/rl/reward.py
    reward: str = "credit"
    # The reward probe's metric M: the epsilon-MSE weighted over log-SNR by eps_uniform (plain mean) | x0 (x0-MSE) |
    # eps_edm / eps_laplace (the edm / Laplace(0, 1) densities) | eps_sigmoid (sigmoid(2 - lambda)); chosen by its
    # rank correlation with fid_c10 (bench/reward_referee.py, BENCHMARKS.md). Its probe points are drawn from it.
    reward_metric: str = "eps_laplace"
    probe_pairs: int = 32  # (held-out image, level) pairs of the probe gradient grad M, drawn afresh every window
    reward_images: int = 8  # the fixed reward probe (benches, the policy gain): held-out images ...
    reward_grid: int = 8  # ... at this many quantiles of the metric's weighting (at most data.val_size images)
    reward_scale: float = 10000.0  # rewards are multiplied by this (a decision's relative effect is ~1e-4)
    fd_rel: float = 0.001  # the credit's finite-difference step, a share of the weights' norm
    kl_coeff: float = 0.1  # weight of KL(pi || prior) in PPO's loss (akod_ray/rl/ppo.py)
    frozen: bool = False  # the control: the DKO explores exactly as the learner would, PPO never updates it
    null_reward: str = "none"  # none | shuffle | constant: a control, rewards with no information (akod_ray/rl/reward.py)
    train_batch: int = 4  # decision windows (episodes) per PPO iteration
    minibatch_size: int = 128  # PPO minibatch, in decisions
    num_epochs: int = 4  # PPO epochs per iteration
    lr: float = 3e-4  # PPO learning rate
    broker_timeout_s: float = 600.0  # longest wait for the other side of the broker

    def __post_init__(self) -> None:
        for name in ("segment_steps", "decision_every", "decision_images", "probe_pairs", "reward_images",
                     "reward_grid", "train_batch", "minibatch_size", "num_epochs"):
            _check(getattr(self, name) >= 1, f"rl.{name}", "must be >= 1", getattr(self, name))
        _at_most("rl.segment_steps", self.segment_steps, MAX_STEPS)
        _at_most("rl.decision_every", self.decision_every, MAX_STEPS)
        _at_most("rl.decision_images", self.decision_images, MAX_BATCH)
        _check(self.reward in REWARDS, "rl.reward", f"must be one of {REWARDS}", self.reward)
        _check(self.reward_metric in REWARD_METRICS, "rl.reward_metric", f"must be one of {REWARD_METRICS}",
               self.reward_metric)
        _check(self.null_reward in NULL_REWARDS, "rl.null_reward", f"must be one of {NULL_REWARDS}", self.null_reward)
        _at_most("rl.probe_pairs", self.probe_pairs, MAX_IMAGES // 10, "held-out pairs evaluated every window")
        _at_most("rl.reward_images", self.reward_images, MAX_IMAGES // 10, "held-out images of the reward probe")
        _at_most("rl.reward_grid", self.reward_grid, 1024)
        for name in ("reward_scale", "fd_rel", "kl_coeff", "lr", "broker_timeout_s"):
            _finite(f"rl.{name}", getattr(self, name))
        _check(self.reward_scale > 0, "rl.reward_scale", "must be > 0", self.reward_scale)
        _check(0.0 < self.fd_rel <= 0.1, "rl.fd_rel", "must be in (0, 0.1]", self.fd_rel)
        _check(self.kl_coeff >= 0, "rl.kl_coeff", "must be >= 0", self.kl_coeff)
        for name, limit in (("train_batch", 4096), ("minibatch_size", 10**6), ("num_epochs", 1000)):
            _at_most(f"rl.{name}", getattr(self, name), limit)
        _check(self.lr > 0, "rl.lr", "must be > 0", self.lr)
        _check(self.broker_timeout_s > 0, "rl.broker_timeout_s", "must be > 0", self.broker_timeout_s)
        _at_most("rl.broker_timeout_s", self.broker_timeout_s, 7 * 24 * 3600.0, "a week")


@dataclass(frozen=True)
class EvalConfig:
    FIDS: typing.ClassVar[tuple[str, ...]] = ("c10", "inception", "both")  # eval.fid's values

    # ddpm (all T steps) | ddim | dpmpp_2m | unipc | euler | heun (diffusers' schedulers) | adaptive (per-image steps
    # from sigma_local, dko.kernel_size)
    sampler: str = "ddim"
    # network evaluations per image (ddpm: always T); heun spends 2N - 1 of them on N steps, so an odd number <= this
    sampler_steps: int = 50
    ddim_eta: float = 0.0  # DDIM's eta (0: deterministic)
    # common: every arm is sampled on one grid, uniform in log-SNR between dko.logsnr_max and dko.logsnr_min (the
    # range every arm trains on), so comparisons judge training only | own: the arm's training schedule as its grid
    sampling_grid: str = "common"
    clip_x0: bool = True  # clip x0_hat to [-1, 1] at every network evaluation, for every sampler (akod_ray/diffusion/samplers.py)
    fid_every: int = 0  # steps between offline-FID evaluations during training; 0 = only at the end
    fid_samples: int = 1000  # samples per evaluation, spread over the run's workers (each samples its share)
    # which FID the runs record and the sweep table and report show: c10 (the offline fid_c10) | inception (pytorch-fid's
    # Inception FID; fid_c10 stays in metrics.jsonl, which the progress line reads) | both. Inception FID needs the
    # pytorch-fid weights (AKOD_INCEPTION_WEIGHTS, or torch's hub cache); without them one line says so and runs record
    # fid_c10 only (akod_ray/evaluation/fid_run.py)
    fid: str = "both"
    # Inception reference statistics (.npz of `akod fid stats --feature inception`); null: `akod train` / `akod sweep`
    # compute them once from the training images into the run (sweep) folder, fid_ref_inception.npz
    inception_ref: str | None = None
    grid_size: int = 8  # sample grid is grid_size x grid_size
    target_ref_loss: float | None = None  # time-to-target threshold on the reference loss
    target_fid: float | None = None  # time-to-target threshold on FID / offline FID

    def __post_init__(self) -> None:
        _check(self.sampler in SAMPLERS, "eval.sampler", f"must be one of {SAMPLERS}", self.sampler)
        _check(self.sampler_steps >= 1, "eval.sampler_steps", "must be >= 1", self.sampler_steps)
        _at_most("eval.sampler_steps", self.sampler_steps, MAX_T, "network evaluations per image")
        _check(self.sampling_grid in SAMPLING_GRIDS, "eval.sampling_grid", f"must be one of {SAMPLING_GRIDS}",
               self.sampling_grid)
        _finite("eval.ddim_eta", self.ddim_eta)
        _check(0.0 <= self.ddim_eta <= 1.0, "eval.ddim_eta", "must be in [0, 1]", self.ddim_eta)
        _check(self.fid_every >= 0, "eval.fid_every", "must be >= 0", self.fid_every)
        _at_most("eval.fid_every", self.fid_every, MAX_STEPS)
        _check(self.fid_samples >= 2, "eval.fid_samples", "must be >= 2", self.fid_samples)
        _check(self.fid in self.FIDS, "eval.fid", f"must be one of {self.FIDS}", self.fid)
        _check(self.inception_ref is None or (isinstance(self.inception_ref, str) and self.inception_ref.strip() != ""),
               "eval.inception_ref", "must be a path to an .npz or null", self.inception_ref)
        _at_most("eval.fid_samples", self.fid_samples, MAX_IMAGES // 10, "samples held in memory")
        _check(self.grid_size >= 1, "eval.grid_size", "must be >= 1", self.grid_size)
        _at_most("eval.grid_size", self.grid_size, 64, "grid_size**2 samples")
        for name in ("target_ref_loss", "target_fid"):
            if getattr(self, name) is not None:
                _finite(f"eval.{name}", getattr(self, name))
                _check(getattr(self, name) >= 0, f"eval.{name}", "must be >= 0 or null", getattr(self, name))


@dataclass(frozen=True)
class ArmSpec:
    """An arm of a comparison (DESIGN 1.7): its schedule and switches, set from the arm, never from the base config."""

    schedule: str  # diffusion.schedule ("akod": the DKO's distribution over the dko.prior's steps)
    min_snr: bool = False  # Min-SNR-gamma loss weights (sweep.min_snr_gamma)
    akod_unet: bool = False  # the AKOD U-Net (MSFI and beta-modulation on); else the plain DDPM U-Net
    adaptation: str = "none"  # diffusion.adaptation: online adaptation without RL
    frozen: bool = False  # rl.frozen: the DKO explores as the learner would, without PPO updates

    def switches(self) -> dict:
        """The config fields the arm sets: {section: {field: value}} (min_snr_gamma: True for "the sweep's")."""
        return {"diffusion": {"schedule": self.schedule, "adaptation": self.adaptation},
                "model": {"msfi": self.akod_unet, "beta_modulation": self.akod_unet},
                "rl": {"frozen": self.frozen}}


ARM_SPECS = {
    "baseline": ArmSpec("linear"),  # the paper's baseline
    "cosine": ArmSpec("cosine"),
    "min_snr": ArmSpec("cosine", min_snr=True),
    "loglinear": ArmSpec("loglinear"),
    "edm": ArmSpec("edm"),
    "laplace": ArmSpec("laplace"),  # the DKO's prior by default, the best fixed arm measured
    "importance": ArmSpec("laplace", adaptation="importance"),  # online, no RL: a loss-history importance sampler
    "edm2": ArmSpec("laplace", adaptation="edm2"),  # online, no RL: EDM2's learned uncertainty weighting
    "msfi_only": ArmSpec("laplace", akod_unet=True),  # the AKOD U-Net on the fixed prior: the network's own effect
    "dko_frozen": ArmSpec("akod", frozen=True),  # the control: the learner's exploration without its updates
    "dko_only": ArmSpec("akod"),
    "akod": ArmSpec("akod", akod_unet=True),
}
ARMS = tuple(ARM_SPECS)


def search_ranges(entries: tuple[str, ...]) -> dict[str, tuple[float, float, bool]]:
    """``sweep.search_space`` parsed: {"section.field": (low, high, log)}, each entry checked (ConfigError)."""
    out: dict[str, tuple[float, float, bool]] = {}
    for entry in entries:
        key, sep, rng = entry.partition("=")
        parts = rng.split(":")
        _check(bool(sep) and len(parts) in (2, 3) and parts[2:] in ([], ["log"]), "sweep.search_space",
               "entries must look like section.field=low:high or section.field=low:high:log", entry)
        _check(key in SEARCHABLE, "sweep.search_space", f"fields must be from {SEARCHABLE}", entry)
        _check(key not in out, "sweep.search_space", "must not list a field twice", entries)
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(f"sweep.search_space {show(entry)}: low and high must be numbers") from None
        _check(math.isfinite(low) and math.isfinite(high) and low < high, "sweep.search_space",
               "needs finite bounds with low < high", entry)
        _check(parts[2:] != ["log"] or low > 0, "sweep.search_space", "needs low > 0 on a log scale", entry)
        out[key] = (low, high, parts[2:] == ["log"])
    return out


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"  # the Tune experiment folder under run.root; rerun with --resume to continue it
    arms: tuple[str, ...] = ARMS  # the arms of ARM_SPECS: baseline | cosine | min_snr | loglinear | edm | laplace | importance | edm2 | msfi_only | dko_frozen | dko_only | akod
    kernel_sizes: tuple[int, ...] = (7,)  # DKO filter sizes k swept for the akod arm
    seeds: tuple[int, ...] = (0,)
    min_snr_gamma: float = 5.0  # gamma of the min_snr arm (Hang et al. 2023)
    budget_kind: str = "images"  # images: train.steps = budget / train.batch_size; seconds: train.max_wall_s = budget (train.budget_clock)
    budget: float = 1_000_000  # the same budget for every arm (AKOD's RL overhead inside its time)
    max_concurrent_trials: int | None = None  # None: cluster CPUs (or GPUs) / resources per trial
    # grid: every arm x filter size x seed (the arm comparison) | optuna: Tune with Optuna's TPE over search_space, for the
    # one fixed arm in sweep.arms and the one seed in sweep.seeds, num_samples trials, minimizing sweep.metric
    search: str = "grid"
    # "section.field=low:high" (uniform) or "section.field=low:high:log", fields from SEARCHABLE; every point of the box
    # must be a valid config (a laplace schedule that is too concentrated and too far up is refused)
    search_space: tuple[str, ...] = ("diffusion.laplace_scale=0.6:2.0:log", "diffusion.laplace_loc=-1.5:0.5")
    num_samples: int = 12  # trials of an optuna search (a resume may raise it to search on)
    metric: str = "fid_c10"  # fid_c10 | ref_loss | fid_c10_final: what a search minimizes (asha: its latest value)
    # > 0: every trial ends with fid_c10_final, the fid_c10 of this many EMA samples from its final checkpoint with the
    # same starting noise for every trial (seed 10,000 + train.seed: bench/akod_science.py's referee), on the common
    # grid with eval.sampler; computed by the trial's driver process (where the Tune trial runs), after training
    referee_samples: int = 0
    # none | asha (Tune's ASHAScheduler: stops the worse trials at rungs of the budget; searches only, since an arm
    # comparison gives every arm its whole budget)
    scheduler: str = "none"
    asha_grace: float = 0.25  # share of the budget every trial trains before asha's first cut (rungs grow 3x)

    def __post_init__(self) -> None:
        check_name("sweep.name", self.name)
        _check(len(self.arms) >= 1, "sweep.arms", "must list at least one arm", self.arms)
        for a in self.arms:
            _check(a in ARMS, "sweep.arms", f"must be from {ARMS}", self.arms)
        _check(len(set(self.arms)) == len(self.arms), "sweep.arms", "must not repeat an arm", self.arms)
        for k in self.kernel_sizes:
            _check(k >= 3 and k % 2 == 1, "sweep.kernel_sizes", "must be odd and >= 3", self.kernel_sizes)
            _check(k <= IMAGE_SIZE, "sweep.kernel_sizes", f"must not exceed the image size {IMAGE_SIZE}", self.kernel_sizes)
        _check(len(self.kernel_sizes) >= 1 and len(self.seeds) >= 1, "sweep.kernel_sizes", "and sweep.seeds must be non-empty",
               self.kernel_sizes)
        for name in ("kernel_sizes", "seeds"):
            values = getattr(self, name)
            _check(len(set(values)) == len(values), f"sweep.{name}", "must not repeat a value", values)
            _check(len(values) <= 1000, f"sweep.{name}", "must list at most 1000 values", values)
        for seed in self.seeds:
            _check(0 <= seed <= MAX_SEED, "sweep.seeds", f"must be in [0, {MAX_SEED}]", self.seeds)
        _finite("sweep.min_snr_gamma", self.min_snr_gamma)
        _check(self.min_snr_gamma > 0, "sweep.min_snr_gamma", "must be > 0", self.min_snr_gamma)
        _check(self.budget_kind in BUDGET_KINDS, "sweep.budget_kind", f"must be one of {BUDGET_KINDS}", self.budget_kind)
        _finite("sweep.budget", self.budget)
        _check(self.budget > 0, "sweep.budget", "must be > 0", self.budget)
        if self.max_concurrent_trials is not None:
            _check(self.max_concurrent_trials >= 1, "sweep.max_concurrent_trials", "must be >= 1 or null",
                   self.max_concurrent_trials)
            _at_most("sweep.max_concurrent_trials", self.max_concurrent_trials, 10_000)
        _check(self.search in SEARCHES, "sweep.search", f"must be one of {SEARCHES}", self.search)
        _check(self.scheduler in SCHEDULERS, "sweep.scheduler", f"must be one of {SCHEDULERS}", self.scheduler)
        _check(self.metric in SEARCH_METRICS, "sweep.metric", f"must be one of {SEARCH_METRICS}", self.metric)
        _check(1 <= self.num_samples <= 10_000, "sweep.num_samples", "must be in [1, 10,000]", self.num_samples)
        _check(0 <= self.referee_samples <= MAX_IMAGES // 10, "sweep.referee_samples",
               f"must be in [0, {MAX_IMAGES // 10:,}]", self.referee_samples)
        _check(self.metric != "fid_c10_final" or self.referee_samples >= 2, "sweep.metric",
               "can be fid_c10_final only with sweep.referee_samples >= 2", self.metric)
        _check(self.metric != "fid_c10_final" or self.scheduler == "none", "sweep.metric",
               "must be measured during training with sweep.scheduler=asha (fid_c10_final comes at the end)",
               self.metric)
        _finite("sweep.asha_grace", self.asha_grace)
        _check(0.0 < self.asha_grace < 1.0, "sweep.asha_grace", "must be in (0, 1)", self.asha_grace)
        space = search_ranges(self.search_space)
        if self.search == "grid":
            _check(self.scheduler == "none", "sweep.scheduler", "must be 'none' with sweep.search=grid (an arm "
                   "comparison gives every arm its whole budget)", self.scheduler)
            return
        arm = self.arms[0]
        spec = ARM_SPECS[arm]
        _check(len(self.arms) == 1 and spec.schedule not in ("akod", "file") and spec.adaptation == "none", "sweep.arms",
               "must list one fixed-schedule arm with sweep.search=optuna (the schedule whose parameters are searched)",
               self.arms)
        _check(len(self.seeds) == 1, "sweep.seeds", "must list one seed with sweep.search=optuna", self.seeds)
        _check(len(space) >= 1, "sweep.search_space", "must list at least one field with sweep.search=optuna",
               self.search_space)
        for key in space:
            _check(not key.startswith("diffusion.laplace_") or spec.schedule == "laplace", "sweep.search_space",
                   f"searches {key}, which only the laplace arm uses, but sweep.arms is {[arm]}", self.search_space)


@dataclass(frozen=True)
class RunConfig:
    name: str = "akod"  # run name; the run folder is root/name, and rerunning resumes it
    root: str = "runs"  # where run folders go (shared or cloud storage on a cluster)
    ray_address: str | None = None  # None: join a cluster if RAY_ADDRESS is set, else start a local Ray
    num_cpus: int | None = None  # CPUs a locally started Ray may use (None: all)
    dashboard: bool = True  # start the Ray Dashboard (127.0.0.1 only) with a locally started Ray
    # none | mlflow: the resolved config as params, every metrics.jsonl record as metrics at its step, PPO's iterations,
    # and the schedule files, sample grids and report as artifacts (akod_ray/tracking.py); TensorBoard is always written
    tracking: str = "none"
    # MLflow tracking URI: http(s)://host:port (a tracking server every node reaches), sqlite:////abs/path/mlflow.db, ...;
    # None: a local store beside the runs, sqlite:///<run.root>/mlflow.db with the artifacts in <run.root>/mlartifacts
    tracking_uri: str | None = None
    tracking_experiment: str | None = None  # MLflow experiment; None: sweep.name for a sweep, run.name for a run

    def __post_init__(self) -> None:
        check_name("run.name", self.name)
        _plain_text("run.root", self.root)
        _check("://" not in self.root, "run.root",
               "must be a folder path (on a cluster: a shared filesystem mounted on every node), not a URI", self.root)
        _plain_text("run.ray_address", self.ray_address)
        if self.num_cpus is not None:
            _check(self.num_cpus >= 1, "run.num_cpus", "must be >= 1 or null", self.num_cpus)
            _at_most("run.num_cpus", self.num_cpus, 100_000)
        _check(self.tracking in TRACKING, "run.tracking", f"must be one of {TRACKING}", self.tracking)
        _plain_text("run.tracking_uri", self.tracking_uri)
        if self.tracking_uri is not None:
            scheme = self.tracking_uri.partition(":")[0].split("+")[0].lower()
            _check(scheme != "file", "run.tracking_uri", "must not be a file store (MLflow 3 refuses them); use "
                   "sqlite:////path/mlflow.db or a tracking server", self.tracking_uri)
            _check("://" in self.tracking_uri, "run.tracking_uri",
                   "must be a URI with a scheme (http://host:5000, sqlite:////path/mlflow.db)", self.tracking_uri)
            _check(scheme in TRACKING_SCHEMES, "run.tracking_uri", f"must use one of the schemes {TRACKING_SCHEMES}",
                   self.tracking_uri)
            _check(scheme != "sqlite" or self.tracking_uri.startswith("sqlite:////"), "run.tracking_uri",
                   "must name an absolute path (sqlite:////path/mlflow.db): Ray's workers run in other folders",
                   self.tracking_uri)
        if self.tracking_experiment is not None:
            _plain_text("run.tracking_experiment", self.tracking_experiment)
            _check(0 < len(self.tracking_experiment) <= MAX_NAME, "run.tracking_experiment",
                   f"must be a non-empty name of at most {MAX_NAME} characters", self.tracking_experiment)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dko: DKOConfig = field(default_factory=DKOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        d = self.diffusion
        _check(self.data.val_size >= self.train.num_workers, "data.val_size",
               f"must be >= train.num_workers={self.train.num_workers} (every worker evaluates its share of the "
               "held-out images)", self.data.val_size)
        tc, ev = self.train, self.eval
        from akod_ray.diffusion.samplers import sampler_steps_problem

        problem = sampler_steps_problem(ev.sampler, ev.sampler_steps, d.T)
        _check(problem is None, "eval.sampler_steps", problem or "", ev.sampler_steps)
        if d.schedule in ("edm", "laplace"):  # a concentrated schedule must stay valid (beta_t <= 0.999) at this T
            from akod_ray.diffusion.schedules import anchor_betas

            try:
                anchor_betas(d.schedule, d.T, self.dko.logsnr_max, self.dko.logsnr_min, d.laplace_scale, d.laplace_loc)
            except ValueError as e:
                field_name = "diffusion.laplace_scale" if d.schedule == "laplace" else "diffusion.T"
                if d.schedule == "laplace" and d.laplace_loc != 0.0 and _valid_laplace(self, d.laplace_scale, 0.0):
                    field_name = "diffusion.laplace_loc"  # the same scale centred at 0 is valid: the centre is at fault
                raise ConfigError(f"{field_name}: the {d.schedule} schedule is invalid for diffusion.T={d.T} within "
                                  f"[dko.logsnr_min, dko.logsnr_max]: {e}") from None
        _check(ev.fid_samples >= tc.num_workers, "eval.fid_samples", f"must be >= train.num_workers={tc.num_workers} "
               "(every worker samples its share)", ev.fid_samples)
        known = self.data.train_subset or (4096 if self.data.source == "procedural" else None)
        if known is not None:
            where = "data.train_subset" if self.data.train_subset else "the procedural dataset's default size"
            _check(tc.batch_size <= known, "train.batch_size", f"must be <= {where}={known} (one batch of training "
                   "images)", tc.batch_size)
        if self.sweep.budget_kind == "images":
            _check(self.sweep.budget >= tc.batch_size, "sweep.budget", f"must be >= train.batch_size={tc.batch_size} "
                   "images (one optimizer step) with sweep.budget_kind=images", self.sweep.budget)
            _at_most("sweep.budget", self.sweep.budget, MAX_STEPS * tc.batch_size,
                     f"{MAX_STEPS:,} steps of train.batch_size={tc.batch_size}")
        if self.sweep.search == "optuna":
            self._check_search_box()
        _check(self.sweep.scheduler != "asha" or self.sweep.metric != "fid_c10" or self.eval.fid_every > 0,
               "eval.fid_every", "must be > 0 with sweep.scheduler=asha and sweep.metric=fid_c10 (asha compares "
               "trials at rungs of the budget, on the fid_c10 they have measured by then)", self.eval.fid_every)
        if d.schedule == "akod":
            # the DKO's laplace prior is centred at 0 (akod_ray/diffusion/dko.py): a centre would be ignored there
            _check(self.dko.prior != "laplace" or d.laplace_loc == 0.0, "diffusion.laplace_loc",
                   "must be 0 with diffusion.schedule=akod and dko.prior=laplace (the DKO's prior is centred at 0)",
                   d.laplace_loc)
            _check(self.rl.reward_images >= self.train.num_workers, "rl.reward_images",
                   f"must be >= train.num_workers={self.train.num_workers} (every worker scores its share)",
                   self.rl.reward_images)
            _check(self.dko.bins <= d.T, "dko.bins", f"must be <= diffusion.T={d.T} (a bin holds whole steps)",
                   self.dko.bins)
            micro = tc.batch_size // (tc.num_workers * tc.grad_accum)
            _check(self.rl.decision_images <= micro, "rl.decision_images", f"must be <= {micro}, the images of one "
                   "micro-batch of a worker (train.batch_size / (train.num_workers * train.grad_accum))",
                   self.rl.decision_images)
            from akod_ray.diffusion.dko import NoiseBins
            from akod_ray.diffusion.schedules import anchor_logsnr

            try:  # the prior must be a valid schedule at this T, and stay valid stretched to the DKO's floor
                lam = anchor_logsnr(self.dko.prior, d.T, self.dko.logsnr_max, self.dko.logsnr_min, d.laplace_scale)
                from akod_ray.diffusion.schedules import anchor_betas

                anchor_betas(self.dko.prior, d.T, self.dko.logsnr_max, self.dko.logsnr_min, d.laplace_scale)
            except ValueError as e:
                raise ConfigError(f"dko.prior {self.dko.prior!r} is not a valid schedule at diffusion.T={d.T} within "
                                  f"[dko.logsnr_min, dko.logsnr_max]: {e}") from None
            from akod_ray.diffusion.dko import floor_problem

            problem = floor_problem(lam, NoiseBins(d.T, self.dko.bins), self.dko.floor)
            _check(problem is None, "dko.floor", f"is too small for dko.bins={self.dko.bins} of the {self.dko.prior} prior "
                   f"at diffusion.T={d.T}: {problem}; raise dko.floor", self.dko.floor)
            _check(self.train.ckpt_every % self.rl.segment_steps == 0, "train.ckpt_every",
                   f"must be a multiple of rl.segment_steps={self.rl.segment_steps} for the akod schedule "
                   "(checkpoints fall on segment ends)", self.train.ckpt_every)

    def _check_search_box(self) -> None:
        """Every corner of sweep.search_space is a valid trial config, so no point Optuna picks can fail on its
        config (a laplace schedule's validity is monotone in its scale and centre, so the corners decide)."""
        ranges = search_ranges(self.sweep.search_space)
        arm = self.sweep.arms[0]
        base = dataclasses.replace(self, sweep=dataclasses.replace(self.sweep, search="grid", scheduler="none"),
                                   diffusion=dataclasses.replace(self.diffusion, schedule=ARM_SPECS[arm].schedule))
        for corner in itertools.product(*[(low, high) for low, high, _ in ranges.values()]):
            changes: dict[str, dict[str, float]] = {}
            for key, value in zip(ranges, corner):
                section, name = key.split(".")
                changes.setdefault(section, {})[name] = value
            try:
                dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **fields)
                                             for section, fields in changes.items()})
            except ConfigError as e:
                where = ", ".join(f"{k}={v:g}" for k, v in zip(ranges, corner))
                raise ConfigError(f"sweep.search_space: the corner {where} of the search box is not a valid {arm} "
                                  f"trial: {e}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


def _valid_laplace(cfg: Config, scale: float, loc: float) -> bool:
    from akod_ray.diffusion.schedules import anchor_betas

    try:
        anchor_betas("laplace", cfg.diffusion.T, cfg.dko.logsnr_max, cfg.dko.logsnr_min, scale, loc)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against the type hint ``hint``; lists become tuples, floats must be finite."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {show(value)}")
        if len(value) > 1000:
            raise ConfigError(f"{name} must list at most 1000 values, got {len(value)}")
        (elem, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(v, elem, name) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {show(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported config type {hint} for {name}")  # a bug in this module


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            text = key if isinstance(key, str) and len(key) <= 80 else show(key)
            where = f"{prefix}.{text}" if prefix else text
            raise ConfigError(f"unknown config key {where!r}; allowed: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], where)
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, where)
    return cls(**kwargs)


RENAMED = {("eval", "ddim_steps"): "sampler_steps"}  # configs (and checkpoints) written before the rename still load
# What a checkpoint's stored config meant by a field it does not have: the behaviour of the code that wrote it
# (a file config without the field gets today's default)
CHECKPOINT_DEFAULTS = {("model", "noise_cond"): "schedule"}
# Fields (and values) of version 2's knot-by-knot DKO that a checkpoint's stored config may hold: dropped when a
# checkpoint is read (its weights and betas are all sampling needs), never accepted in a config file
RETIRED_FIELDS = {("dko", "num_knots"), ("dko", "min_segment_share"), ("dko", "knot_spacing"), ("dko", "probe_size"),
                  ("rl", "credit"), ("rl", "branches"), ("rl", "branch_steps")}
RETIRED_VALUES = {("rl", "reward"): ("improvement", "reference")}


def config_from_dict(data: dict) -> Config:
    if isinstance(data, dict):
        for (section, old), new in RENAMED.items():
            part = data.get(section)
            if isinstance(part, dict) and old in part and new not in part:
                data = {**data, section: {(new if k == old else k): v for k, v in part.items()}}
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred lines; anything larger is not one


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: let PyYAML say so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_error(e: Exception) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's own text spans several lines)."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def parse_yaml(text: str):
    """Parse YAML text safely (no tags that build objects, no duplicate keys); raises ValueError with one line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, RecursionError, ValueError) as e:  # ValueError: an integer past Python's digit limit
        raise ValueError(_yaml_error(e)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` strings; values are parsed as YAML scalars/lists."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {show(item)} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set key {show(key)} must look like section.field")
        section, name = parts
        sections = {f.name for f in dataclasses.fields(Config)}
        if section not in sections:
            raise ConfigError(f"unknown config key {show(key)}: no section {show(section)}; allowed: {sorted(sections)}")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except ValueError as e:
            raise ConfigError(f"--set {key}: cannot parse value {show(raw)}: {e}") from None
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section} must be a mapping, got {show(data[section])}")
        data[section][name] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        where = f"config file {str(p)!r}"
        if not p.exists():
            raise ConfigError(f"{where} does not exist")
        if not p.is_file():
            raise ConfigError(f"{where} is not a file")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{where} cannot be read: {e.strerror or e}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is {len(raw):,} bytes; a config holds at most {MAX_CONFIG_BYTES:,}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where} is not UTF-8 text (byte {e.start})") from None
        try:
            data = parse_yaml(text)
        except ValueError as e:
            raise ConfigError(f"{where} is not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a mapping of sections")
    return config_from_dict(apply_overrides(data, overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def make_dirs(path: str | Path) -> Path:
    """Create ``path`` and its missing parents without group or world write permission, whatever the
    umask: whoever may write into a run folder decides what a resume reads (docs/cluster.md)."""
    path = Path(path)
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:  # created meanwhile by another process: not ours to change
            continue
        d.chmod(stat.S_IMODE(d.stat().st_mode) & ~0o022)
    if not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a folder")
    return path


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    try:
        make_dirs(run_dir)
        tmp.write_text(dump_config(cfg))
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
        raise AkodError(f"cannot write {str(path)!r} (run.root {cfg.run.root!r}): {e.strerror or e}") from None
    return path
