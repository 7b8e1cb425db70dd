"""Sampling as a run's config says: sampler, network evaluations, sampling grid and x0 clipping.

Every figure that comes from samples (in-run fid_c10, sample grids, ``akod sample``, ``akod fid``,
the benchmarks) goes through :func:`sample_as_configured`, so they agree on what was sampled,
and :func:`sampling_record` says it next to the figure.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from akod_ray.config import Config
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.dispatch import network_evaluations, sample
from akod_ray.diffusion.samplers import sampler_steps_problem, sampling_grid
from akod_ray.errors import AkodError, one_line


def grid_for(cfg: Config, process: DiffusionProcess, kind: str | None = None) -> DiffusionProcess:
    """The sampling grid ``kind`` (default ``eval.sampling_grid``) for a model trained with ``process``."""
    return sampling_grid(kind or cfg.eval.sampling_grid, process, cfg.dko.logsnr_max, cfg.dko.logsnr_min)


def sample_as_configured(cfg: Config, model, process: DiffusionProcess, n: int, generator: torch.Generator,
                         device: str | torch.device = "cpu", *, sampler: str | None = None, steps: int | None = None,
                         eta: float | None = None, grid: str | None = None, batch_size: int = 256,
                         image_size: int = 32, progress_desc: str | None = None) -> torch.Tensor:
    """n images in [-1, 1] with the run's eval settings (each can be overridden); ``progress_desc``: show
    progress under that name."""
    ev = cfg.eval
    return sample(model, process, n, generator, sampler or ev.sampler, steps or ev.sampler_steps,
                  ev.ddim_eta if eta is None else eta, device, image_size=image_size, bf16=cfg.train.bf16,
                  batch_size=batch_size, grid=grid_for(cfg, process, grid), clip_x0=ev.clip_x0,
                  kernel_size=cfg.dko.kernel_size, progress_desc=progress_desc)


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a sample drawn with ``seed`` (:func:`sample_chunks`)."""
    return (seed * 1_000_003 + chunk) % 2**63


def sample_chunks(cfg: Config, model, process: DiffusionProcess, n: int, seed: int, device: str | torch.device = "cpu",
                  *, chunk: int, rank: int = 0, world_size: int = 1, **overrides) -> Iterator[tuple[int, torch.Tensor]]:
    """Images 0..n-1 in chunks of ``chunk``, chunk c drawn from its own generator (:func:`chunk_seed`), so any
    worker can draw any chunk: this worker (``rank`` of ``world_size``) yields (c, images) for its chunks
    rank, rank + world_size, ... The images of a chunk do not depend on how many workers share the work.
    ``overrides``: :func:`sample_as_configured`'s keywords (sampler, steps, eta, grid, progress_desc)."""
    for c in range(rank, math.ceil(n / chunk), world_size):
        g = torch.Generator(device=device).manual_seed(chunk_seed(seed, c))
        yield c, sample_as_configured(cfg, model, process, min(chunk, n - c * chunk), g, device, batch_size=chunk,
                                      **overrides)


def sampling_record(cfg: Config, T: int, *, sampler: str | None = None, steps: int | None = None,
                    grid: str | None = None) -> dict:
    """What was sampled, for the record beside a figure: sampler, evaluations per image, grid, clipping."""
    sampler, steps = sampler or cfg.eval.sampler, steps or cfg.eval.sampler_steps
    return {"sampler": sampler, "nfe": network_evaluations(sampler, steps, T),
            "sampling_grid": grid or cfg.eval.sampling_grid, "clip_x0": cfg.eval.clip_x0}


def describe_sampling(record: dict) -> str:
    """One phrase for a :func:`sampling_record`: ``dpmpp_2m, 10 network evaluations per image, common grid``."""
    return (f"{record['sampler']}, {record['nfe']} network evaluations per image, {record['sampling_grid']} grid"
            f"{'' if record['clip_x0'] else ', x0 not clipped'}")


def check_sampling(cfg: Config, process: DiffusionProcess, *, sampler: str | None = None, steps: int | None = None,
                   grid: str | None = None) -> dict:
    """Fail before sampling, with one line (AkodError), when ``sampler`` cannot spend ``steps`` network
    evaluations per image on T steps or cannot take the sampling grid's schedule (diffusers' float32);
    returns the :func:`sampling_record` of what will be sampled. ``None`` means the run's eval config."""
    sampler, steps = sampler or cfg.eval.sampler, steps or cfg.eval.sampler_steps
    T = process.T
    if sampler != "ddpm" and steps > T:
        raise AkodError(f"--steps must be <= diffusion.T={T} of the checkpoint (a sampler visits at most the T steps "
                        f"of its grid), got {steps}")
    problem = sampler_steps_problem(sampler, steps, T)
    if problem is not None:
        raise AkodError(f"--steps {problem}, got {steps}")
    if sampler not in ("ddpm", "ddim", "adaptive"):
        from akod_ray.diffusion.solvers import build_scheduler

        try:
            build_scheduler(sampler, grid_for(cfg, process, grid), steps)
        except ValueError as e:
            raise AkodError(one_line(e)) from None
    return sampling_record(cfg, T, sampler=sampler, steps=steps, grid=grid)


def sample_checkpoint(checkpoint, n: int, seed: int, device: str | torch.device = "cpu", *, sampler: str | None = None,
                      steps: int | None = None, eta: float | None = None, grid: str | None = None,
                      schedule: str | None = None) -> tuple[torch.Tensor, dict]:
    """What ``akod sample`` draws: n images in [-1, 1] from a checkpoint's (or a run's latest) EMA weights (its eval config unless
    overridden; ``schedule``: a schedule file in place of the checkpoint's), from a generator seeded with
    ``seed`` on ``device``, and their :func:`sampling_record`."""
    from akod_ray.diffusion.schedules import load_schedule
    from akod_ray.training.checkpoint import load_for_sampling, resolve_checkpoint

    model, process, cfg = load_for_sampling(resolve_checkpoint(checkpoint), device)
    if schedule:
        process = DiffusionProcess(load_schedule(schedule, cfg.diffusion.T))
    record = check_sampling(cfg, process, sampler=sampler, steps=steps, grid=grid)
    g = torch.Generator(device=device).manual_seed(seed)
    images = sample_as_configured(cfg, model, process, n, g, device, sampler=sampler, steps=steps, eta=eta, grid=grid,
                                  progress_desc="sampling")
    return images, record
