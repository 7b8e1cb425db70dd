"""Fixed schedules for the loop: linear, cosine, loglinear or a schedule file (the DKO's source lives in akod_ray.rl)."""

from __future__ import annotations

from akod_ray.config import Config
from akod_ray.diffusion.dko import uniform_logsnr_betas
from akod_ray.diffusion.schedules import fixed_schedule, load_schedule
from akod_ray.training.loop import FixedSchedule


def fixed_betas(cfg: Config):
    d = cfg.diffusion
    if d.schedule == "file":
        return load_schedule(d.schedule_file, d.T)
    if d.schedule == "loglinear":  # uniform in log-SNR between the DKO's endpoints: the DKO's starting point
        return uniform_logsnr_betas(d.T, cfg.dko.logsnr_max, cfg.dko.logsnr_min)
    return fixed_schedule(d.schedule, d.T)


def fixed_source(cfg: Config, env=None, loop_config: dict | None = None) -> FixedSchedule:
    """The schedule source of a fixed arm (the signature of a loop_config ``source_factory``)."""
    return FixedSchedule(fixed_betas(cfg))
