"""Train one arm: the top-level dispatcher between the fixed-schedule and the AKOD driver.

``training/`` knows nothing of RL and ``rl/`` builds on ``training/``; this module is the
one place that chooses between them, so neither imports the other's driver.
"""

from __future__ import annotations

from akod_ray.config import Config


def train(cfg: Config, data_dir_flag: str | None = None, run_id: str | None = None, callbacks: list | None = None,
          track: bool = True) -> dict:
    """Train one arm on Ray Train; returns the last metrics record. ``run_id`` (a Tune trial id) names the AKOD broker.

    With run.tracking=mlflow and ``track`` (a sweep's trials are tracked by the sweep instead), the run has its
    MLflow run (akod_ray.tracking); PPO's iterations go to TensorBoard either way."""
    from akod_ray.tracking import RunTracking, ppo_to_tensorboard
    from akod_ray.training.trainer import check_train_index

    check_train_index(cfg.run_dir)  # a sweep's trial resumes here; `akod train` checked it before Ray started
    tracking = RunTracking(cfg) if track and cfg.run.tracking == "mlflow" else None
    try:
        last = _train(cfg, data_dir_flag, run_id, callbacks)
    except Exception:
        if tracking is not None:
            tracking.finish(failed=True)
        raise
    ppo_to_tensorboard(cfg.run_dir)
    if tracking is not None:
        tracking.finish(failed=False)
    return last


def _train(cfg: Config, data_dir_flag: str | None, run_id: str | None, callbacks: list | None) -> dict:
    if cfg.diffusion.schedule == "akod":
        from akod_ray.rl.driver import train_akod
        from akod_ray.training.trainer import data_dir_for

        return train_akod(cfg, data_dir_for(cfg, data_dir_flag), run_id, callbacks)
    from akod_ray.training.trainer import train_fixed

    return train_fixed(cfg, data_dir_flag, callbacks)
