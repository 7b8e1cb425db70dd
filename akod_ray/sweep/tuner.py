"""`akod sweep`: the Tune experiment, its resources, resume, and the sweep table.

Each trial takes one unit of the custom resource TRAIN_DRIVER and no CPU, so that its Ray
Train workers get the CPUs or GPUs; max_concurrent_trials is what the cluster can feed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import ray
from ray import tune

from akod_ray.config import Config, config_to_dict, load_config, save_config
from akod_ray.errors import AkodError
from akod_ray.sweep.trial import make_trial_fn, point_name, search_space
from akod_ray.training.trainer import data_dir_for, ensure_ray

TABLE_COLUMNS = ["trial", "arm", "kernel_size", "seed", "step", "wall_s", "ref_loss", "fid_c10", "fid_c10_n",
                 "time_to_ref_loss_s", "time_to_fid_c10_s"]


def concurrent_trials(cfg: Config) -> int:
    if cfg.sweep.max_concurrent_trials is not None:
        return cfg.sweep.max_concurrent_trials
    res = ray.cluster_resources()
    tc = cfg.train
    if tc.use_gpu:
        return max(1, int(res.get("GPU", 0) // tc.num_workers))
    return max(1, int(res.get("CPU", 1) // (tc.num_workers * tc.cpus_per_worker)))


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], sweep_dir: Path) -> tuple[Path, Path]:
    """The sweep table, one row per trial, as CSV and Markdown."""
    rows = sorted(rows, key=lambda r: (str(r.get("arm")), r.get("kernel_size") or 0, r.get("seed") or 0))
    csv_path, md_path = sweep_dir / "sweep_table.csv", sweep_dir / "sweep_table.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in TABLE_COLUMNS) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def run_sweep(config_path: str | None, overrides: list[str], data_dir_flag: str | None = None, resume: bool = False) -> Path:
    """Run (or resume) the sweep; returns the path of its Markdown report."""
    cfg = load_config(config_path, overrides)
    data_dir = data_dir_for(cfg, data_dir_flag)
    root = Path(cfg.run.root).resolve()
    sweep_dir = root / cfg.sweep.name
    run_root = str(sweep_dir / "runs")
    ensure_ray(cfg)
    trainable = tune.with_resources(make_trial_fn(config_to_dict(cfg), run_root, data_dir), {"CPU": 0, "TRAIN_DRIVER": 1})
    if resume:
        if not tune.Tuner.can_restore(str(sweep_dir)):
            raise AkodError(f"no sweep to resume in {str(sweep_dir)!r}; run without --resume first")
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=True, restart_errored=False)
    else:
        if tune.Tuner.can_restore(str(sweep_dir)):
            raise AkodError(f"sweep folder {str(sweep_dir)!r} already holds a sweep; pass --resume to continue it "
                            "or set sweep.name to start another")
        save_config(cfg, sweep_dir)
        points = search_space(cfg)
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(cfg)),
            run_config=tune.RunConfig(name=cfg.sweep.name, storage_path=str(root),
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    grid = tuner.fit()
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        point = (result.config or {}).get("point", {})
        m.setdefault("arm", point.get("arm"))
        m["trial"] = point_name(point) if point else m.get("trial_id")
        if result.error is not None:
            m["error"] = str(result.error).splitlines()[0][:200]
        rows.append(m)
    write_table(rows, sweep_dir)
    from akod_ray.reporting.report import write_report

    errors = [r for r in rows if "error" in r]
    report = write_report(sweep_dir)
    if errors:
        raise AkodError(f"{len(errors)} of {len(rows)} trials failed (first: {errors[0]['trial']}: {errors[0]['error']}); "
                        f"table and report in {sweep_dir}")
    return report
