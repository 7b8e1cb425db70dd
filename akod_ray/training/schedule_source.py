"""Fixed schedules for the loop: linear, cosine, loglinear, edm, laplace or a schedule file (the DKO's source lives in akod_ray.rl)."""

from __future__ import annotations

from akod_ray.config import Config
from akod_ray.diffusion.schedules import edm_betas, fixed_schedule, laplace_betas, load_schedule, uniform_logsnr_betas
from akod_ray.training.loop import FixedSchedule


def fixed_betas(cfg: Config):
    d = cfg.diffusion
    if d.schedule == "file":
        return load_schedule(d.schedule_file, d.T)
    ends = (cfg.dko.logsnr_max, cfg.dko.logsnr_min)  # the range loglinear, edm, laplace and the DKO share
    if d.schedule == "loglinear":  # uniform in log-SNR: the DKO's starting point
        return uniform_logsnr_betas(d.T, *ends)
    if d.schedule == "edm":
        return edm_betas(d.T, *ends)
    if d.schedule == "laplace":
        return laplace_betas(d.T, *ends, d.laplace_scale, d.laplace_loc)
    return fixed_schedule(d.schedule, d.T)


def fixed_source(cfg: Config, env=None, loop_config: dict | None = None) -> FixedSchedule:
    """The schedule source of a fixed arm (the signature of a loop_config ``source_factory``); with
    ``diffusion.adaptation=importance`` its steps come from the importance sampler."""
    d = cfg.diffusion
    sampler = None
    if d.adaptation == "importance":
        from akod_ray.training.adaptation import ImportanceSampler

        sampler = ImportanceSampler(d.T, d.adaptation_bins, d.adaptation_floor, d.adaptation_decay,
                                    env.device if env is not None else "cpu")
    return FixedSchedule(fixed_betas(cfg), sampler)
