"""Which schedule a run trains with: fixed (linear, cosine, a file) or the DKO's proposals."""

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


def make_schedule_source(cfg: Config, env, loop_config: dict):
    if cfg.diffusion.schedule == "akod":
        from akod_ray.training.akod_source import BrokerSchedule

        return BrokerSchedule(cfg, env, loop_config["broker_name"], loop_config.get("run_dir"))
    return FixedSchedule(fixed_betas(cfg))
