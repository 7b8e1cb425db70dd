"""The paper's beta_t = f(t, sigma_local(x_t)) at inference, taken literally: a sampler that picks each
image's next log-SNR from the local variance of its current sample, within a fixed budget of N network
evaluations per image (``eval.sampler: adaptive``).

Notation (per image; lambda = log-SNR, alpha = sqrt(sigmoid(lambda)), s = sqrt(sigmoid(-lambda))):
    lambda_1..lambda_N  the noise levels evaluated; lambda_1 = lambda_min, the grid's noisiest (pure noise)
    lambda_{N+1}        lambda_max, the grid's cleanest level: where the rule's path ends
    x0_i, eps_i         the Denoiser's x0_hat and eps at (x_i, lambda_i), clip rule applied
    V_X, V_E            sigma_local^2 of x0_i and of eps_i: the DKO's feature (``dko.local_variance``, filter k)
    f_i(lambda)         sigmoid(lambda) V_X + sigmoid(-lambda) V_E: the expected sigma_local^2 of
                        x_lambda = alpha x0_i + s eps_i, the sample the update predicts at lambda (x0_i and
                        eps_i taken as independent; at lambda_i it is sigma_local^2(x_i) up to their cross term)
    L_i(lambda)         log f_i(lambda), monotone in lambda (f_i is linear in sigmoid(lambda))
    w                   the weight of sigma_local in the step rule (``ADAPTIVE_WEIGHT``)

The step rule. After evaluation i < N, with m = N + 1 - i intervals left to lambda_max, the next level
lambda_{i+1} in (lambda_i, lambda_max) solves u_i(lambda_{i+1}) = 1 / m, where

    u_i(lambda) = (1 - w) (lambda - lambda_i) / (lambda_max - lambda_i)
                + w (L_i(lambda) - L_i(lambda_i)) / (L_i(lambda_max) - L_i(lambda_i))

is the share of the remaining path covered, measured half in log-SNR and half in the predicted change of
log sigma_local^2 (both terms rise monotonically from 0 to 1, so the root is unique; bisection, per
image). Each step thus takes an equal share of what is left of the predicted change of sigma_local, and
steps are dense where an image's local variance is predicted to change fastest: around the level where
its signal's local variance meets the noise's, which differs between a smooth image and a textured one.
The rule is re-solved at every step from the newest predictions. Where L_i has no span (V_X = V_E) the
log-SNR term alone decides. w = 0 is uniform in log-SNR.

The update is DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with per-image step sizes, with
h_i = (lambda_{i+1} - lambda_i) / 2 (half log-SNR, the solver's lambda) and r_i = h_{i-1} / h_i:

    D_i     = x0_i                                           (i = 1: first order)
            = x0_i + (x0_i - x0_{i-1}) / (2 r_i)             (i > 1)
    x_{i+1} = (s_{i+1} / s_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i

and after evaluation N the last update goes to the clean image (s = 0, first order): the output is x0_N.
So the budget is exactly N evaluations and the sampler always ends at the clean endpoint; with w = 0 it
is diffusers' dpmpp_2m on a grid uniform in log-SNR (the common grid), which a test checks.
"""

from __future__ import annotations

import torch

from akod_ray.diffusion.dko import local_variance
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.samplers import Denoiser, sampler_steps_problem

# Half of each step follows sigma_local, half is uniform in log-SNR: sigma_local is a local (k x k)
# statistic, blind to the global structure that forms at low SNR, where the log-SNR half keeps steps.
ADAPTIVE_WEIGHT = 0.5
_BISECTIONS = 60  # the log-SNR range is < 40: 60 halvings reach float64 resolution


def _log_f(lam: torch.Tensor, vx: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
    """L(lambda) = log(sigmoid(lambda) V_X + sigmoid(-lambda) V_E), floored away from log 0."""
    return torch.log((torch.sigmoid(lam) * vx + torch.sigmoid(-lam) * ve).clamp(min=1e-30))


def next_logsnr(lam: torch.Tensor, lam_end: float, intervals: int, vx: torch.Tensor, ve: torch.Tensor,
                weight: float = ADAPTIVE_WEIGHT) -> torch.Tensor:
    """lambda_{i+1} [B] solving u_i(lambda_{i+1}) = 1 / intervals (module docstring), float64."""
    lam_end_t = torch.full_like(lam, lam_end)
    l0, l1 = _log_f(lam, vx, ve), _log_f(lam_end_t, vx, ve)
    span = l1 - l0
    has_span = span.abs() > 1e-12
    w = torch.where(has_span, torch.full_like(lam, weight), torch.zeros_like(lam))
    safe_span = torch.where(has_span, span, torch.ones_like(span))

    def u(x: torch.Tensor) -> torch.Tensor:
        return (1 - w) * (x - lam) / (lam_end - lam) + w * (_log_f(x, vx, ve) - l0) / safe_span

    lo, hi, target = lam.clone(), lam_end_t.clone(), 1.0 / intervals
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        below = u(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


@torch.no_grad()
def adaptive_sample(den: Denoiser, x_T: torch.Tensor, steps: int, kernel_size: int = 7,
                    weight: float = ADAPTIVE_WEIGHT, trace: list | None = None) -> torch.Tensor:
    """x_0 from x_T in exactly ``steps`` network evaluations per image (module docstring);
    ``trace``, when given, receives each evaluation's log-SNR [B]."""
    if not 1 <= steps:
        raise ValueError(f"adaptive: eval.sampler_steps must be >= 1, got {steps}")
    if min(x_T.shape[-2:]) < kernel_size:
        raise ValueError(f"adaptive: dko.kernel_size {kernel_size} exceeds the image size {tuple(x_T.shape[-2:])}")
    grid = den.grid
    lam_min, lam_max = grid.log_snr[-1].item(), grid.log_snr[0].item()
    lam = torch.full((x_T.shape[0],), lam_min, dtype=torch.float64)
    view = (-1,) + (1,) * (x_T.ndim - 1)

    def coef(values: torch.Tensor) -> torch.Tensor:  # per-image scalars as x's dtype and device, broadcastable
        return values.view(view).to(x_T.dtype).to(x_T.device)

    x, x0_prev, h_prev = x_T, None, None
    for i in range(steps):
        # 1. eps_i and x0_i at each image's own lambda_i (the clip rule applied).
        eps, x0 = den.at_logsnrs(x, lam)
        if trace is not None:
            trace.append(lam.clone())
        if i == steps - 1:
            break  # 4. the last update lands on the clean image: x0_N
        # 2. lambda_{i+1} from sigma_local of this step's prediction (the step rule).
        vx = local_variance(x0.float(), kernel_size).double().cpu()
        ve = local_variance(eps.float(), kernel_size).double().cpu()
        lam_next = next_logsnr(lam, lam_max, steps - i, vx, ve, weight)
        # 3. DPM-Solver++(2M): D_i, then x_{i+1}.
        h = (lam_next - lam) / 2
        d = x0 if x0_prev is None else x0 + coef(h / (2 * h_prev)) * (x0 - x0_prev)
        ratio = torch.sqrt(torch.sigmoid(-lam_next) / torch.sigmoid(-lam))
        x = coef(ratio) * x - coef(torch.sqrt(torch.sigmoid(lam_next)) * torch.expm1(-h)) * d
        x0_prev, h_prev, lam = x0, h, lam_next
    return x0


@torch.no_grad()
def adaptive_images(model, process: DiffusionProcess, shape: tuple[int, ...], generator: torch.Generator, steps: int,
                    device: torch.device | str = "cpu", bf16: bool = False, grid: DiffusionProcess | None = None,
                    clip_x0: bool = True, kernel_size: int = 7) -> torch.Tensor:
    """Images [shape] from :func:`adaptive_sample` on ``grid`` (default: the training schedule), starting from
    x_T = ``torch.randn(shape, generator)`` as every sampler does; refuses a budget before drawing noise."""
    den = Denoiser(model, process, grid, clip_x0, bf16)
    problem = sampler_steps_problem("adaptive", steps, den.grid.T)
    if problem is not None:
        raise ValueError(f"adaptive: eval.sampler_steps {problem}, got {steps}")
    x_T = torch.randn(shape, generator=generator, device=device)
    return adaptive_sample(den, x_T, steps, kernel_size)
