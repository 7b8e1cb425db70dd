"""Few-step samplers from diffusers' schedulers (DPM-Solver++ 2M, UniPC, Euler, Heun), and any other diffusers
scheduler a user hands over, on any valid schedule of the project and any sampling grid (DESIGN 1.1). The
dispatcher that chooses between these and the other samplers is :mod:`akod_ray.diffusion.dispatch`.

Only diffusers' *schedulers* are used (no pipelines, nothing downloaded): each is built from the grid's
betas (``trained_betas``, ``num_train_timesteps`` = T, ``prediction_type="epsilon"``), with diffusers'
own clipping and thresholding off; the project's x0 clipping rule is applied by
:class:`~akod_ray.diffusion.samplers.Denoiser`, the same for every sampler.

Notation (diffusers' VE sigma beside the project's VP quantities of the grid, steps 0-based):
    abar_t          cumulative product of (1 - beta_s), s <= t (diffusers: alphas_cumprod, float32)
    sigma_t         sqrt((1 - abar_t) / abar_t), diffusers' noise level; sigma = 0 is the clean image
    lambda_t        log-SNR_t = log(abar_t / (1 - abar_t)) = -2 ln sigma_t, what the network is conditioned on
    x_t             the VP sample the network sees, sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    x_t^VE          x_t / sqrt(abar_t) = x_t sqrt(1 + sigma_t^2): the sample Euler and Heun hold
                    (``scale_model_input`` turns it back into x_t)
    N               scheduler steps; evaluations per image: N (Heun: 2N - 1)

Steps visited. All four samplers visit the same grid steps, the N largest of round(linspace(0, T-1, N+1))
(from T-1, pure noise, down to about (T-1)/N), and end at sigma = 0 (``final_sigmas_type="zero"``: the
last update lands on the clean image, x0_hat of the last evaluation). That is diffusers' default
``timestep_spacing="linspace"`` of DPM-Solver++ and UniPC. Euler and Heun get these timesteps explicitly
(``set_timesteps(timesteps=...)``): with their linspace spacing one step (N = 1) starts at step 0 (pure
noise taken for a nearly clean image) and the last evaluation is spent at the grid's cleanest step;
their ``trailing`` spacing starts at T-1 but its float ``arange`` yields N + 1 timesteps, the last one
-1, for 27,044 of the (T <= 1000, N <= T) pairs (T = 17, N = 7 is one). The project's DDIM differs in one
respect and keeps it (its parity tests): it evaluates at N steps from T-1 down to 0 inclusive.

Conditioning. A timestep diffusers hands over is a grid step (an integer): the network gets that step's
conditioning (``Denoiser.at_step``); any other (fractional) timestep is mapped through the sigma the
scheduler holds, lambda = -2 ln sigma (``Denoiser.at_logsnr``), so the network always sees the noise
level of the sample it is given.

Starting noise. Every sampler draws x_T = ``torch.randn(shape, generator)`` first, as ``ddim_sample``
does, so all start from the same tensor given the same generator: DPM-Solver++ and UniPC take it as is
(``init_noise_sigma`` = 1); Euler and Heun take it in their scaling, x_T sqrt(1 + sigma_max^2), so that
``scale_model_input`` hands the network exactly x_T. (Their ``init_noise_sigma`` under linspace spacing
is sigma_max, which would start from sqrt(1 - abar_{T-1}) x_T instead: 2e-5 smaller on the common grid.)

Budgets. ``steps`` is the number of network evaluations per image (``eval.sampler_steps``); the limits
are :func:`akod_ray.diffusion.samplers.sampler_steps_problem`'s: Heun takes N = (steps + 1) // 2 steps, i.e.
2N - 1 <= steps evaluations (N - 1 Heun steps and a final Euler step), and needs steps >= 3 to take one
Heun step; the others take N = steps <= T - 1 (round(linspace) of N + 1 points repeats a step beyond).

Schedules diffusers cannot take. diffusers keeps abar_t in float32. A valid float64 schedule whose
abar_t underflows float32 (e.g. many betas near 0.999) or whose first betas are below float32's
resolution (1 - beta_t == 1, so abar_t stops decreasing and sigma_t = 0 before the end) gives NaN or
repeated sigmas there: :func:`build_scheduler` refuses it with one line (the project's ddpm and ddim
compute in float64 and take it).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch

from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.samplers import Denoiser, sampler_steps_problem


@dataclass(frozen=True)
class Solver:
    """A sampler of this module: a diffusers scheduler class and its options."""

    scheduler: str  # diffusers class name
    options: dict = field(default_factory=dict)
    explicit_timesteps: bool = False  # pass solver_timesteps() to set_timesteps (see the module docstring)


_OFF = {"thresholding": False}  # the clip rule lives in the Denoiser
SOLVERS: dict[str, Solver] = {
    # DPM-Solver++ (Lu et al. 2022), multistep, 2nd order, data prediction; first order at the last step
    "dpmpp_2m": Solver("DPMSolverMultistepScheduler", {**_OFF, "algorithm_type": "dpmsolver++", "solver_order": 2,
                                                       "final_sigmas_type": "zero", "timestep_spacing": "linspace"}),
    # UniPC (Zhao et al. 2023), bh2 predictor-corrector, 2nd order; the corrector reuses the next evaluation
    "unipc": Solver("UniPCMultistepScheduler", {**_OFF, "solver_order": 2, "final_sigmas_type": "zero",
                                                "timestep_spacing": "linspace"}),
    # Euler (Karras et al. 2022, Algorithm 2 with gamma = 0): the probability-flow ODE in sigma
    "euler": Solver("EulerDiscreteScheduler", {"final_sigmas_type": "zero"}, explicit_timesteps=True),
    # Heun (Karras et al. 2022, Algorithm 1): 2 evaluations a step, the last step (to sigma = 0) Euler
    "heun": Solver("HeunDiscreteScheduler", {"clip_sample": False}, explicit_timesteps=True),
}


def scheduler_steps(name: str, steps: int) -> int:
    """N, the scheduler steps a budget of ``steps`` network evaluations per image buys."""
    return (steps + 1) // 2 if name == "heun" else steps


def solver_evaluations(name: str, steps: int) -> int:
    """Network evaluations per image that ``name`` really spends with a budget of ``steps`` (Heun: 2N - 1)."""
    if name not in SOLVERS:
        raise ValueError(f"eval.sampler must be one of {tuple(SOLVERS)}, got {name!r}")
    n = scheduler_steps(name, steps)
    return 2 * n - 1 if name == "heun" else n


def solver_timesteps(T: int, n: int) -> list[int]:
    """The N grid steps every diffusers sampler here visits: round(linspace(0, T-1, N+1)), descending,
    without its last (0); after them the samplers land on sigma = 0."""
    points = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).numpy().round()
    return [int(t) for t in points[::-1][:-1]]


def build_scheduler(name: str, grid: DiffusionProcess, steps: int):
    """The diffusers scheduler of sampler ``name`` on ``grid``, with its timesteps set for ``steps`` evaluations.

    Raises ValueError (one line naming the sampler) for a budget it cannot spend on T steps, or a schedule
    diffusers cannot hold in float32.
    """
    problem = sampler_steps_problem(name, steps, grid.T)
    if problem is not None:
        raise ValueError(f"{name}: eval.sampler_steps {problem}, got {steps}")
    _check_float32(name, grid)
    sched = make_scheduler(name, grid.betas)
    set_scheduler_steps(sched, grid.T, scheduler_steps(name, steps))
    return sched


def make_scheduler(name: str, betas: torch.Tensor):
    """The diffusers scheduler of sampler ``name`` (:data:`SOLVERS`) on ``betas`` (``trained_betas``, kept in
    its config as float64: saved with ``save_pretrained``, it loads back the same schedule), timesteps not set."""
    import diffusers  # 4 s to import: only when a diffusers sampler runs

    spec = SOLVERS[name]
    with _quiet_numpy_copy():
        return getattr(diffusers, spec.scheduler)(num_train_timesteps=int(betas.shape[0]),
                                                  trained_betas=betas.double().tolist(), prediction_type="epsilon",
                                                  **spec.options)


@contextlib.contextmanager
def _quiet_numpy_copy():
    """diffusers 0.42 calls np.array on a torch tensor; numpy 2 warns about the copy keyword, harmlessly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        yield


def set_scheduler_steps(sched, T: int, n: int) -> None:
    """``sched.set_timesteps`` for N scheduler steps on a grid of T steps, by this module's rule (the module
    docstring): Euler and Heun at their default spacing get :func:`solver_timesteps` explicitly, every
    other scheduler (and Euler or Heun configured otherwise: Karras sigmas, trailing spacing) its own."""
    cfg = sched.config
    own_sigmas = any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
    explicit = any(spec.explicit_timesteps and spec.scheduler == type(sched).__name__ for spec in SOLVERS.values())
    with _quiet_numpy_copy():
        if explicit and cfg.get("timestep_spacing", "linspace") == "linspace" and not own_sigmas:
            sched.set_timesteps(timesteps=solver_timesteps(T, n))
        else:
            sched.set_timesteps(n)


def _check_float32(name: str, grid: DiffusionProcess) -> None:
    """diffusers holds abar_t in float32: refuse a schedule where it underflows or stops decreasing."""
    abar32 = torch.cumprod(1.0 - grid.betas.float(), 0)
    underflow = torch.nonzero(abar32 <= 0)
    flat = torch.nonzero(torch.cat([abar32[:1] >= 1, abar32[1:] >= abar32[:-1]]))
    if len(underflow):
        t = int(underflow[0])
        why = f"abar[{t}] underflows to 0"
    elif len(flat):
        t = int(flat[0])
        why = (f"abar[{t}] = {abar32[t].item():.9g} does not decrease (beta[{t}] = {grid.betas[t].item():.3g} is "
               f"below float32's resolution)")
    else:
        return
    raise ValueError(f"{name} cannot take this schedule: diffusers keeps abar_t in float32, where {why}; "
                     f"sample it with ddpm or ddim (float64)")


def holds_ve_sample(sched) -> bool:
    """Does ``sched`` hold x_t^VE = x_t sqrt(1 + sigma_t^2) (Euler, Heun and the other Karras-style schedulers)
    rather than the VP x_t? Those are the schedulers whose ``init_noise_sigma`` is not 1 (diffusers' pipelines
    scale the starting noise by it)."""
    return float(sched.init_noise_sigma) != 1.0


def scheduler_grid(sched, process: DiffusionProcess | None = None) -> DiffusionProcess:
    """The grid a diffusers scheduler steps on, in float64: its ``trained_betas`` as configured (a scheduler
    loaded from a file keeps them exactly), else its own float32 betas. ``process`` itself when the betas are
    the same, so that a network samples its training schedule through its own conditioning rows."""
    betas = sched.config.get("trained_betas")
    betas = torch.as_tensor(betas if betas is not None else sched.betas, dtype=torch.float64).reshape(-1)
    if isinstance(process, DiffusionProcess) and process.T == betas.shape[0] and torch.equal(process.betas, betas):
        return process
    return DiffusionProcess(betas)


def _on_grid(sigma: float, grid: DiffusionProcess, t: int) -> bool:
    """Is the scheduler's sigma at timestep t the grid's own sigma_t (up to diffusers' float32)? Not so for
    schedulers that space their own sigmas (Karras, exponential) and round the timesteps they report."""
    if not 0 <= t < grid.T:
        return False
    lam = grid.log_snr[t].item()
    return abs(-2.0 * math.log(sigma) - lam) <= 1e-4 * max(1.0, abs(lam))


def run_scheduler(sched, den: Denoiser, x_T: torch.Tensor, ve_scaled: bool | None = None,
                  generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
    """Integrate from x_T with a scheduler whose timesteps are set; one network evaluation per timestep.

    Step i: (1) the VP x_t the network expects (``scale_model_input``); (2) eps at the grid step, or at
    lambda = -2 ln sigma_i where the scheduler's sigma is not a grid step's (a fractional timestep, its own
    sigma spacing), the clip rule applied; (3) the scheduler's update. ``ve_scaled`` None:
    :func:`holds_ve_sample`. A stochastic scheduler (DDPM, ancestral samplers, DDIM with ``eta`` > 0) draws
    its noise from ``generator`` (the project's four solvers draw none).
    """
    if ve_scaled is None:
        ve_scaled = holds_ve_sample(sched)
    accepts = inspect.signature(sched.step).parameters
    extra = {}
    if generator is not None and "generator" in accepts:
        extra["generator"] = generator
    if eta and "eta" in accepts:
        extra["eta"] = eta
    sigmas = sched.sigmas.double() if getattr(sched, "sigmas", None) is not None else None
    x = x_T * math.sqrt(1.0 + sigmas[0].item() ** 2) if ve_scaled else x_T
    for i, t in enumerate(sched.timesteps):
        x_t = sched.scale_model_input(x, t)
        step = float(t)
        if step.is_integer() and (sigmas is None or _on_grid(sigmas[i].item(), den.grid, int(step))):
            eps, _ = den.at_step(x_t, int(step))
        else:
            eps, _ = den.at_logsnr(x_t, -2.0 * math.log(sigmas[i].item()))
        x = sched.step(eps, t, x, **extra).prev_sample
    return x


@torch.no_grad()
def solver_sample(name: str, model, process: DiffusionProcess, shape: tuple[int, ...], generator: torch.Generator,
                  steps: int, device: torch.device | str = "cpu", bf16: bool = False,
                  grid: DiffusionProcess | None = None, clip_x0: bool = True) -> torch.Tensor:
    """Images [shape] from the diffusers sampler ``name`` with a budget of ``steps`` network evaluations per
    image on ``grid`` (default: the training schedule)."""
    if name not in SOLVERS:
        raise ValueError(f"eval.sampler must be one of {tuple(SOLVERS)}, got {name!r}")
    den = Denoiser(model, process, grid, clip_x0, bf16)
    sched = build_scheduler(name, den.grid, steps)  # refuses before any noise is drawn
    x_T = torch.randn(shape, generator=generator, device=device)  # the same x_T as ddim_sample's
    return run_scheduler(sched, den, x_T)


@torch.no_grad()
def scheduler_sample(sched, model, process: DiffusionProcess, shape: tuple[int, ...], generator: torch.Generator,
                     steps: int, device: torch.device | str = "cpu", bf16: bool = False,
                     grid: DiffusionProcess | None = None, clip_x0: bool = True, eta: float = 0.0) -> torch.Tensor:
    """Images [shape] from any diffusers scheduler ``sched`` (a user's, e.g. through ``AKODPipeline``) with
    ``steps`` of its own steps (diffusers' ``num_inference_steps``), on its grid (:func:`scheduler_grid`
    unless ``grid`` is given); the network is conditioned by ``process``, its training schedule."""
    den = Denoiser(model, process, scheduler_grid(sched, process) if grid is None else grid, clip_x0, bf16)
    set_scheduler_steps(sched, den.grid.T, steps)  # also resets a multistep scheduler's history
    x_T = torch.randn(shape, generator=generator, device=device)
    return run_scheduler(sched, den, x_T, generator=generator, eta=eta)
