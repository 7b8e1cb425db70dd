"""Train one arm: the top-level dispatcher between the fixed-schedule and the AKOD driver.

``training/`` knows nothing of RL and ``rl/`` builds on ``training/``; this module is the
one place that chooses between them, so neither imports the other's driver.
"""

from __future__ import annotations

from akod_ray.config import Config


def train(cfg: Config, data_dir_flag: str | None = None, run_id: str | None = None, callbacks: list | None = None) -> dict:
    """Train one arm on Ray Train; returns the last metrics record. ``run_id`` (a Tune trial id) names the AKOD broker."""
    from akod_ray.training.trainer import check_train_index

    check_train_index(cfg.run_dir)  # a sweep's trial resumes here; `akod train` checked it before Ray started
    if cfg.diffusion.schedule == "akod":
        from akod_ray.rl.driver import train_akod
        from akod_ray.training.trainer import data_dir_for

        return train_akod(cfg, data_dir_for(cfg, data_dir_flag), run_id, callbacks)
    from akod_ray.training.trainer import train_fixed

    return train_fixed(cfg, data_dir_flag, callbacks)
