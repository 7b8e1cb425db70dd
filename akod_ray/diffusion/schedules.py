"""Noise schedules: every schedule is float64 betas of shape [T], checked by one validator.

Fixed baselines are pure functions of T; learned schedules (``dko.py``) and schedule files
pass through the same :func:`validate_betas`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from akod_ray.errors import ConfigError, DataError

MAX_BETA = 0.999


def linear_betas(T: int) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4: beta linear from 1e-4 to 0.02 for T = 1000.

    For other T the endpoints are scaled by 1000 / T (improved-diffusion's convention), so
    that the total noise added stays that of the T = 1000 schedule.
    """
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1+s)) pi/2).

    beta_t = 1 - abar(t) / abar(t-1), clipped at 0.999 to avoid the singularity at t = T.
    """
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return torch.clamp(1.0 - abar[1:] / abar[:-1], max=MAX_BETA)


def betas_from_logsnr(log_snr: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 - abar_t / abar_{t-1} with abar_t = sigmoid(lambda_t), computed in log space (float64)."""
    log_abar = F.logsigmoid(log_snr.to(torch.float64))
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar[:-1]])
    return -torch.expm1(log_abar - prev)


def uniform_logsnr_betas(T: int, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    """loglinear: log-SNR falls linearly in t from logsnr_max to logsnr_min (the DKO's start, the common sampling grid)."""
    return validate_betas(betas_from_logsnr(torch.linspace(logsnr_max, logsnr_min, T, dtype=torch.float64)), T)


# EDM (Karras et al. 2022): ln sigma ~ N(P_mean = -1.2, P_std = 1.2) with sigma^2 = 1 / SNR, so
# log-SNR = -2 ln sigma ~ N(2.4, 2.4^2).
EDM_LOGSNR_MEAN, EDM_LOGSNR_STD = 2.4, 2.4


def _normal_cdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.special.ndtr((x - mean) / std)


def _normal_quantile(p: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return mean + std * torch.special.ndtri(p)


def _laplace_cdf(x: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    z = (x - loc) / scale
    return torch.where(z < 0, 0.5 * torch.exp(z), 1 - 0.5 * torch.exp(-z))


def _laplace_quantile(p: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    return loc + scale * torch.where(p < 0.5, torch.log(2 * p), -torch.log(2 - 2 * p))


def quantile_logsnr(T: int, logsnr_max: float, logsnr_min: float, cdf, quantile) -> torch.Tensor:
    """log-SNR at step t = the quantile 1 - t / (T - 1) of a distribution truncated to [logsnr_min, logsnr_max].

    Under uniform t the network then trains on log-SNR drawn from that distribution (the T
    steps are its quantiles), and the endpoints are exactly logsnr_max (t = 0) and logsnr_min
    (t = T - 1), the range every arm shares.
    """
    hi, lo = cdf(torch.tensor(logsnr_max, dtype=torch.float64)), cdf(torch.tensor(logsnr_min, dtype=torch.float64))
    u = torch.linspace(0, 1, T, dtype=torch.float64)
    lam = quantile(hi - u * (hi - lo))
    lam[0], lam[-1] = logsnr_max, logsnr_min  # exact endpoints (the quantile function rounds at the tails)
    return lam


ANCHORS = ("loglinear", "edm", "laplace")  # fixed schedules within the shared endpoints; the DKO's possible priors


def anchor_logsnr(name: str, T: int, logsnr_max: float, logsnr_min: float, laplace_scale: float = 1.0,
                  laplace_loc: float = 0.0) -> torch.Tensor:
    """log-SNR [T] (float64) of an anchor schedule within [logsnr_min, logsnr_max]:

    loglinear   linear in t (uniform log-SNR under uniform t)
    edm         the quantiles of EDM's training noise levels, N(2.4, 2.4^2) (Karras et al. 2022)
    laplace     the quantiles of Laplace(laplace_loc, laplace_scale) (Hang et al. 2024 centre it at 0)
    """
    if name == "loglinear":
        return torch.linspace(logsnr_max, logsnr_min, T, dtype=torch.float64)
    if name == "edm":
        return quantile_logsnr(T, logsnr_max, logsnr_min, lambda x: _normal_cdf(x, EDM_LOGSNR_MEAN, EDM_LOGSNR_STD),
                               lambda p: _normal_quantile(p, EDM_LOGSNR_MEAN, EDM_LOGSNR_STD))
    if name == "laplace":
        return quantile_logsnr(T, logsnr_max, logsnr_min, lambda x: _laplace_cdf(x, laplace_loc, laplace_scale),
                               lambda p: _laplace_quantile(p, laplace_loc, laplace_scale))
    raise ValueError(f"anchor schedule must be one of {ANCHORS}, got {name!r}")


def anchor_betas(name: str, T: int, logsnr_max: float, logsnr_min: float, laplace_scale: float = 1.0,
                 laplace_loc: float = 0.0) -> torch.Tensor:
    """Betas of :func:`anchor_logsnr`, validated (a too concentrated one has beta_t > 0.999 at its ends)."""
    what = f"{name} schedule"
    if name == "laplace":
        what = f"laplace schedule (scale {laplace_scale:g}" + (f", centre {laplace_loc:g})" if laplace_loc else ")")
    lam = anchor_logsnr(name, T, logsnr_max, logsnr_min, laplace_scale, laplace_loc)
    return validate_betas(betas_from_logsnr(lam), T, name=what)


def edm_betas(T: int, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    """edm: log-SNR at the quantiles of EDM's training noise levels, N(2.4, 2.4^2), within the shared endpoints."""
    return anchor_betas("edm", T, logsnr_max, logsnr_min)


def laplace_betas(T: int, logsnr_max: float, logsnr_min: float, scale: float, loc: float = 0.0) -> torch.Tensor:
    """laplace: log-SNR at the quantiles of Laplace(loc, scale) (Hang et al. 2024: loc 0), within the shared endpoints."""
    return anchor_betas("laplace", T, logsnr_max, logsnr_min, scale, loc)


FIXED_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def fixed_schedule(name: str, T: int) -> torch.Tensor:
    if name not in FIXED_SCHEDULES:
        raise ConfigError(f"diffusion.schedule {name!r} is not a fixed schedule; allowed: {sorted(FIXED_SCHEDULES)}")
    return validate_betas(FIXED_SCHEDULES[name](T), T)


def validate_betas(betas: torch.Tensor, T: int | None = None, name: str = "schedule") -> torch.Tensor:
    """The one validator: float64 [T], finite, 0 < beta_t <= 0.999, abar_t strictly decreasing."""
    betas = torch.as_tensor(betas)
    if betas.dtype != torch.float64:
        raise ValueError(f"{name}: betas must be float64, got {betas.dtype}")
    if betas.ndim != 1 or (T is not None and betas.shape[0] != T):
        raise ValueError(f"{name}: betas must have shape [{T if T is not None else 'T'}], got {list(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ValueError(f"{name}: betas contain NaN or inf")
    if not ((betas > 0).all() and (betas <= MAX_BETA).all()):
        bad = int(torch.nonzero((betas <= 0) | (betas > MAX_BETA))[0])
        raise ValueError(f"{name}: beta_t must lie in (0, {MAX_BETA}], got beta[{bad}] = {betas[bad].item()!r}")
    # abar_{-1} = 1 leads the sequence: abar_0 == 1 (beta_0 lost to rounding) would make log-SNR_0 infinite.
    abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])
    if not (abar[1:] < abar[:-1]).all():
        bad = int(torch.nonzero(abar[1:] >= abar[:-1])[0])
        prev = f"abar[{bad - 1}]" if bad > 0 else "1"
        raise ValueError(f"{name}: abar_t must be strictly decreasing, but abar[{bad}] >= {prev}")
    return betas


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_schedule(path: str | Path, betas: torch.Tensor, **meta) -> Path:
    """Write a schedule file (JSON: betas and provenance), atomically, and beside it the same schedule in
    diffusers' format (:func:`save_diffusers_config`, ``scheduler_config.json`` in the same folder)."""
    betas = validate_betas(betas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps({"T": int(betas.shape[0]), "betas": betas.tolist(), **meta}))
    save_diffusers_config(path.parent, betas, schedule_file=path.name, **meta)
    return path


DIFFUSERS_CONFIG = "scheduler_config.json"


def diffusers_config(betas: torch.Tensor, **meta) -> dict:
    """The schedule as a diffusers scheduler config: ``trained_betas`` (float64 here; diffusers reads them as
    float32), ``num_train_timesteps`` = T and ``prediction_type`` epsilon (the project's networks predict
    the noise). Only keys that DPMSolverMultistep, UniPCMultistep, EulerDiscrete, HeunDiscrete and DDIM
    schedulers share, so each loads it without warnings; ``beta_schedule`` is diffusers' default and unused
    beside ``trained_betas``. ``timestep_spacing`` linspace starts DPM-Solver++, UniPC, Euler and Heun at
    pure noise (t = T - 1) for N >= 2 steps; give DDIMScheduler ``timestep_spacing="trailing"`` for that.
    Provenance goes under ``_akod`` (diffusers ignores keys that start with an underscore).
    """
    from importlib import metadata

    betas = validate_betas(betas)
    config = {"_class_name": "DPMSolverMultistepScheduler"}
    try:
        config["_diffusers_version"] = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        pass
    return {**config, "num_train_timesteps": int(betas.shape[0]), "trained_betas": betas.tolist(),
            "beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
            "_akod": meta}


def save_diffusers_config(folder: str | Path, betas: torch.Tensor, **meta) -> Path:
    """Write ``folder/scheduler_config.json`` (:func:`diffusers_config`) atomically, so that
    ``DPMSolverMultistepScheduler.from_pretrained(folder)`` (or UniPC, Euler, Heun, DDIM) loads the schedule."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DIFFUSERS_CONFIG
    _write_atomically(path, json.dumps(diffusers_config(betas, **meta), indent=1))
    return path


MAX_SCHEDULE_BYTES = 16 << 20  # betas of T = 100,000 steps (the config's limit) take about 2.5 MB as JSON


def load_schedule(path: str | Path, T: int | None = None) -> torch.Tensor:
    """Read a schedule file written by :func:`save_schedule` and validate it (a DataError naming the file)."""
    path = Path(path)
    where = f"schedule file {str(path)!r}"
    try:
        if path.stat().st_size > MAX_SCHEDULE_BYTES:
            raise DataError(f"{where} is larger than {MAX_SCHEDULE_BYTES:,} bytes; a schedule file holds T betas")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{where} does not exist") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise DataError(f"{where} cannot be read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply
        raise DataError(f"{where} is corrupt: {' '.join(str(e).split()) or type(e).__name__}") from None
    betas = data.get("betas") if isinstance(data, dict) else None
    if not isinstance(betas, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
        raise DataError(f"{where} is corrupt: it must be a JSON object whose 'betas' is a list of numbers")
    if len(betas) < 2:
        raise DataError(f"{where} is corrupt: it holds {len(betas)} betas, a schedule needs T >= 2")
    try:
        return validate_betas(torch.tensor(betas, dtype=torch.float64), T, name=where)
    except ValueError as e:
        raise DataError(str(e)) from None
