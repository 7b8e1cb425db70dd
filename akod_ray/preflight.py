"""Checks that need more than the config: the data files, a schedule file, the run folder and the
machine. The command line runs them before Ray starts, so a value that cannot work fails in one
line naming the field or file, and nothing has been written yet.

What the config alone can check (ranges, limits between fields) is in :mod:`akod_ray.config`.
"""

from __future__ import annotations

import os
from pathlib import Path

from akod_ray.config import Config, ConfigError
from akod_ray.data.parquet import inspect_split
from akod_ray.errors import AkodError


def _blocked(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written by this process, or None (nothing is created here)."""
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{str(p)!r} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"no write permission on {str(p)!r}"
    return None


def check_writable_folder(folder: str | Path, what: str) -> None:
    """``folder`` is a folder this process may write, or can be created as one."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AkodError(f"{what} {str(folder)!r} exists and is not a folder")
    why = _blocked(folder)
    if why is not None:
        raise AkodError(f"{what} {str(folder)!r} cannot be created or written: {why}")


def check_output_file(path: str | Path, flag: str) -> Path:
    """An output file given on the command line: not a folder, in a folder this process may write."""
    path = Path(path)
    if path.is_dir():
        raise AkodError(f"{flag} {str(path)!r} is a folder; give a file name")
    why = f"no write permission on {str(path)!r}" if path.exists() and not os.access(path, os.W_OK) else _blocked(path.parent)
    if why is not None:
        raise AkodError(f"{flag} {str(path)!r} cannot be written: {why}")
    return path


def check_data(cfg: Config, data_dir: str | None) -> None:
    """The data files as training will read them: schema, row counts against the config, and the size
    of every image it will load (from the image headers, without decoding)."""
    d, tc = cfg.data, cfg.train
    if d.source != "cifar10" or data_dir is None:
        return
    # the akod arm's driver draws its probes from the whole training split: check all of it then
    train_count = None if cfg.diffusion.schedule == "akod" else d.train_subset
    train_rows = inspect_split(data_dir, "train", train_count, d.seed)
    test_rows = inspect_split(data_dir, "test", d.val_size, d.seed + 1)
    train_file, test_file = Path(data_dir) / "train.parquet", Path(data_dir) / "test.parquet"
    if d.train_subset is not None and d.train_subset > train_rows:
        raise ConfigError(f"data.train_subset must be <= the {train_rows:,} rows of {str(train_file)!r}, "
                          f"got {d.train_subset}")
    if tc.batch_size > train_rows:
        raise ConfigError(f"train.batch_size must be <= the {train_rows:,} rows of {str(train_file)!r} (one batch "
                          f"of training images), got {tc.batch_size}")
    if d.val_size > test_rows:
        raise ConfigError(f"data.val_size must be <= the {test_rows:,} rows of {str(test_file)!r}, got {d.val_size}")


def check_schedule_file(cfg: Config) -> None:
    if cfg.diffusion.schedule == "file":
        from akod_ray.diffusion.schedules import load_schedule

        load_schedule(cfg.diffusion.schedule_file, cfg.diffusion.T)


def starts_local_ray(cfg: Config) -> bool:
    import ray

    return not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def check_local_resources(cfg: Config) -> None:
    """A local Ray must be able to place the worker group, or Ray Train waits for it for ever."""
    if not starts_local_ray(cfg):
        return  # a cluster's capacity is the autoscaler's business
    tc = cfg.train
    if tc.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if tc.num_workers > gpus:
            raise ConfigError(f"train.num_workers must be <= the {gpus} GPU(s) of this machine with train.use_gpu=true "
                              f"(one GPU per worker; the workers would wait for ever), got {tc.num_workers}")
        return
    cpus = cfg.run.num_cpus or os.cpu_count() or 1
    need = tc.num_workers * tc.cpus_per_worker
    if need > cpus:
        where = f"run.num_cpus={cfg.run.num_cpus}" if cfg.run.num_cpus else f"this machine's {cpus} CPUs"
        raise ConfigError(f"train.num_workers * train.cpus_per_worker = {need} CPUs must fit the local Ray's {where} "
                          "(the workers would wait for ever)")


def preflight_train(cfg: Config, data_dir_flag: str | None) -> None:
    """Everything `akod train` can check before it writes anything or starts Ray."""
    from akod_ray.training.trainer import check_train_index, data_dir_for

    from akod_ray.tracking import check_tracking

    check_writable_folder(cfg.run_dir, "run folder (run.root/run.name)")
    check_train_index(cfg.run_dir)
    check_tracking(cfg)
    check_schedule_file(cfg)
    check_data(cfg, data_dir_for(cfg, data_dir_flag))
    check_local_resources(cfg)


def sweep_trial_configs(cfg: Config) -> list[tuple[str, Config]]:
    """The config of every trial of the sweep, built as the trials will build them; a point whose config
    is invalid (the akod arm with train.ckpt_every off the segment grid, ...) fails here, named."""
    from akod_ray.sweep.trial import point_name, search_space, trial_config

    from akod_ray.config import search_ranges

    out = []
    root = str(Path(cfg.run.root) / cfg.sweep.name / "runs")
    # a search's trials differ only in the searched fields, and every corner of its box is valid (config.py)
    searched = {key: low for key, (low, _, _) in search_ranges(cfg.sweep.search_space).items()} \
        if cfg.sweep.search == "optuna" else None
    for point in search_space(cfg):
        name = point_name(point)
        try:
            out.append((name, trial_config(cfg, point, root, "preflight", searched)))
        except AkodError as e:
            raise ConfigError(f"sweep trial {name}: {e}") from None
    return out


def preflight_sweep(cfg: Config, data_dir_flag: str | None) -> None:
    """Everything `akod sweep` can check before it writes anything or starts Ray."""
    from akod_ray.training.trainer import TRAIN_INDEX, check_train_index, data_dir_for

    from akod_ray.tracking import check_tracking

    check_writable_folder(Path(cfg.run.root) / cfg.sweep.name, "sweep folder (run.root/sweep.name)")
    check_tracking(cfg)
    for index in sorted((Path(cfg.run.root) / cfg.sweep.name / "runs").glob(f"*/{TRAIN_INDEX}")):  # trials that resume
        check_train_index(index.parent)
    trials = sweep_trial_configs(cfg)
    data_dir = data_dir_for(cfg, data_dir_flag)
    checked = set()
    for name, trial in trials:
        key = (trial.data.seed, trial.diffusion.schedule == "akod", trial.train.batch_size)
        try:
            if key not in checked:
                check_data(trial, data_dir)
                checked.add(key)
            check_local_resources(trial)
        except ConfigError as e:
            raise ConfigError(f"sweep trial {name}: {e}") from None
