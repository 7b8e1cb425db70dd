"""One way into sampling: the dispatcher above every sampler of the project, and above any diffusers scheduler
a user hands over.

The modules import downwards only::

    samplers.py    Denoiser (the x0 clipping rule), DDPM and DDIM (the reference), grids, budgets
      ^   ^
    solvers.py   adaptive.py      diffusers' schedulers; per-image steps from sigma_local
      ^   ^
    dispatch.py    this module: a sampler by name (``eval.sampler``) or a scheduler object
      ^
    evaluation/sampling.py (a run's eval config), akod_ray/pipeline.py (AKODPipeline), cli.py, bench/

Every sampler draws its starting noise x_T = ``torch.randn(shape, generator)`` first, from one generator that
continues from batch to batch, so the same seed gives the same images whichever way they are asked for.
"""

from __future__ import annotations

import torch

from akod_ray.diffusion.adaptive import adaptive_images
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.samplers import STEP_SAMPLERS, ddim_sample, ddpm_sample
from akod_ray.diffusion.solvers import SOLVERS, scheduler_sample, solver_evaluations, solver_sample
from akod_ray.progress import progress

ADAPTIVE = "adaptive"
SAMPLERS = STEP_SAMPLERS + tuple(SOLVERS) + (ADAPTIVE,)  # the names eval.sampler takes (config.SAMPLERS)


def network_evaluations(sampler: str, steps: int, T: int) -> int:
    """Network evaluations per image of ``sampler`` with ``steps``: DDPM always takes T, Heun 2N - 1."""
    if sampler == "ddpm":
        return T
    if sampler in ("ddim", ADAPTIVE):
        return steps
    return solver_evaluations(sampler, steps)


def check_sampler(sampler) -> None:
    """A sampler name of :data:`SAMPLERS`, or an object with diffusers' scheduler API."""
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(f"eval.sampler must be one of {SAMPLERS}, got {sampler!r}")
    elif not all(hasattr(sampler, a) for a in ("set_timesteps", "step", "scale_model_input")):
        raise ValueError(f"a sampler is a name from {SAMPLERS} or a diffusers scheduler, got {type(sampler).__name__}")


def sample_batch(sampler, model, process: DiffusionProcess, shape: tuple[int, ...], generator: torch.Generator,
                 steps: int, eta: float = 0.0, device: torch.device | str = "cpu", bf16: bool = False,
                 grid: DiffusionProcess | None = None, clip_x0: bool = True, kernel_size: int = 7) -> torch.Tensor:
    """One batch [shape] from ``sampler`` (see :func:`sample`), not clamped."""
    if not isinstance(sampler, str):
        return scheduler_sample(sampler, model, process, shape, generator, steps, device, bf16, grid, clip_x0, eta)
    if sampler == "ddpm":
        return ddpm_sample(model, process, shape, generator, device, bf16, grid, clip_x0)
    if sampler == "ddim":
        return ddim_sample(model, process, shape, generator, steps, eta, device, bf16, grid=grid, clip_x0=clip_x0)
    if sampler == ADAPTIVE:
        return adaptive_images(model, process, shape, generator, steps, device, bf16, grid, clip_x0, kernel_size)
    return solver_sample(sampler, model, process, shape, generator, steps, device, bf16, grid, clip_x0)


def sample(model, process: DiffusionProcess, n: int, generator: torch.Generator, sampler="ddim", steps: int = 50,
           eta: float = 0.0, device="cpu", image_size: int = 32, bf16: bool = False, batch_size: int = 256,
           grid: DiffusionProcess | None = None, clip_x0: bool = True, kernel_size: int = 7,
           progress_desc: str | None = None) -> torch.Tensor:
    """n images in [-1, 1], in batches of ``batch_size``, from one generator.

    ``sampler``: a name of :data:`SAMPLERS` (``ddpm`` takes all T steps; ``steps`` is the budget of network
    evaluations per image of the others; ``kernel_size`` is sigma_local's filter for ``adaptive``) on ``grid``
    (default: the training schedule ``process``); or a diffusers scheduler object, which takes ``steps`` of its
    own steps on its own grid (``eta`` where its ``step`` takes one). ``progress_desc``: show progress under
    that name (:mod:`akod_ray.progress`).
    """
    check_sampler(sampler)
    out = []
    with progress(progress_desc, n) as bar:
        for start in range(0, n, batch_size):
            shape = (min(batch_size, n - start), 3, image_size, image_size)
            out.append(sample_batch(sampler, model, process, shape, generator, steps, eta, device, bf16, grid, clip_x0,
                                    kernel_size))
            bar.update(shape[0])
    return torch.cat(out).clamp(-1, 1)
