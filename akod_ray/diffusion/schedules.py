"""Noise schedules: every schedule is float64 betas of shape [T], checked by one validator.

Fixed baselines are pure functions of T; learned schedules (``dko.py``) and schedule files
pass through the same :func:`validate_betas`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

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


def save_schedule(path: str | Path, betas: torch.Tensor, **meta) -> Path:
    """Write a schedule file (JSON: betas and provenance), atomically."""
    betas = validate_betas(betas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"T": int(betas.shape[0]), "betas": betas.tolist(), **meta}))
    tmp.replace(path)
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
