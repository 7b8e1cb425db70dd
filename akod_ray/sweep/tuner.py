"""`akod sweep`: the Tune experiment, its resources, resume, and the sweep table.

Each trial takes one unit of the custom resource TRAIN_DRIVER and no CPU, so that its Ray
Train workers get the CPUs or GPUs; max_concurrent_trials is what the cluster can feed.

Resume never reads Tune's own state (``tuner.pkl``, ``experiment_state-*.json``, a trial's
``params.pkl``): those are pickles, and unpickling a file runs whatever code it names. A sweep
resumes from what this project writes and reads without running code: the sweep's
``config.yaml`` (safe YAML), each trial's run folder ``runs/<arm>[_k<k>]_s<seed>-<run id>/``
with its ``summary.json`` once the trial finished, and its Train checkpoints (safetensors and JSON,
:mod:`akod_ray.training.plain_state`). Finished trials are kept; every other trial runs again in a
fresh Tune experiment under its old run id, so its Train run resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import re
import secrets
import time
from pathlib import Path

import ray
from ray import tune

from akod_ray.config import Config, config_from_dict, config_to_dict, load_config, save_config, search_ranges, show
from akod_ray.errors import AkodError, ConfigError, one_line, root_cause
from akod_ray.sweep.search import (ProgressReportCallback, StoppedTrialSummaries, best_line, make_scheduler,
                                   make_searcher, plan_search, run_id_of, searched_values, values_key)
from akod_ray.sweep.trial import point_name, referee, search_space, summarize, trial_config
from akod_ray.training.trainer import data_dir_for, ensure_ray

TABLE_COLUMNS = ["trial", "arm", "kernel_size", "seed", "schedule", "msfi", "beta_modulation", "min_snr_gamma",
                 "adaptation", "frozen", "step", "wall_s", "ref_loss", "fid_c10", "fid_c10_n", "fid", "fid_n",
                 "time_to_ref_loss_s", "time_to_fid_c10_s", "fid_c10_final", "fid_c10_final_n"]
C10_COLUMNS, INCEPTION_COLUMNS = ("fid_c10", "fid_c10_n"), ("fid", "fid_n")
SUMMARY_FILE = "summary.json"  # a finished trial's final numbers, in its run folder
RUN_ID = re.compile(r"[A-Za-z0-9_]{1,40}")  # the run id after "<point name>-" in a run folder's name
# Fields a resume may change: where Ray runs, how many trials run at once and how many a search runs, not what a
# trial computes.
RESUMABLE_CHANGES = ("run.", "sweep.max_concurrent_trials", "sweep.num_samples")


def concurrent_trials(cfg: Config) -> int:
    if cfg.sweep.max_concurrent_trials is not None:
        return cfg.sweep.max_concurrent_trials
    res = ray.cluster_resources()
    tc = cfg.train
    if tc.use_gpu:
        return max(1, int(res.get("GPU", 0) // tc.num_workers))
    return max(1, int(res.get("CPU", 1) // (tc.num_workers * tc.cpus_per_worker)))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_columns(rows: list[dict], fid: str = "both", searched: tuple[str, ...] = ()) -> list[str]:
    """The table's columns: Inception FID (``fid``, ``fid_n``) when a trial recorded it, beside fid_c10 (or in
    its place with ``eval.fid: inception``); fid_c10 alone otherwise. A search's table has a column per searched
    field after the trial's name."""
    has_fid = any(isinstance(r.get("fid"), (int, float)) and math.isfinite(r["fid"]) for r in rows)
    drop = set() if has_fid else set(INCEPTION_COLUMNS)
    if has_fid and fid == "inception":
        drop |= set(C10_COLUMNS) | {"time_to_fid_c10_s"}
    columns = [c for c in TABLE_COLUMNS if c not in drop]
    return columns[:1] + list(searched) + columns[1:]


def write_table(rows: list[dict], sweep_dir: Path, fid: str = "both", searched: tuple[str, ...] = (),
                metric: str = "fid_c10") -> tuple[Path, Path]:
    """The sweep table, one row per trial, as CSV and Markdown (each written to a temporary name and renamed);
    ``fid``: eval.fid (:func:`table_columns`). A search's table lists its trials best first (lowest ``metric``)."""
    if searched:
        rows = sorted(rows, key=lambda r: (not _finite(r.get(metric)), r.get(metric) if _finite(r.get(metric)) else 0))
    else:
        rows = sorted(rows, key=lambda r: (str(r.get("arm")), r.get("kernel_size") or 0, r.get("seed") or 0))
    columns = table_columns(rows, fid, searched)
    csv_path, md_path = sweep_dir / "sweep_table.csv", sweep_dir / "sweep_table.md"
    csv_tmp = csv_path.with_name(csv_path.name + ".tmp")
    with csv_tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    csv_tmp.replace(csv_path)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_tmp = md_path.with_name(md_path.name + ".tmp")
    md_tmp.write_text("\n".join(lines) + "\n")
    md_tmp.replace(md_path)
    return csv_path, md_path


# --------------------------------------------------------------------------- progress


class SweepProgress(tune.Callback):
    """One console line each time a trial ends: how many of the sweep's trials are done and about how
    long the rest will take ("[akod] sweep: 3/7 trials done, about 6 min left").

    The estimate: the mean duration of the trials that ended in this session, for each trial still
    to start and for what the running ones have left, spread over ``concurrency`` trials at a time."""

    def __init__(self, total: int, done: int, concurrency: int, clock=time.monotonic, out=print):
        self.total, self.done, self.concurrency = total, done, max(1, concurrency)
        self.clock, self.out = clock, out
        self.started: dict[str, float] = {}
        self.durations: list[float] = []
        self.failed = 0

    def setup(self, **info):
        self.out(f"[akod] sweep: {self.total - self.done} of {self.total} trials to run, {self.concurrency} at a time",
                 flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, self.clock())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        self._ended(trial)

    def _ended(self, trial) -> None:
        now = self.clock()
        start = self.started.pop(trial.trial_id, None)
        if start is not None:
            self.durations.append(now - start)
        self.done += 1
        failed = f" ({self.failed} failed)" if self.failed else ""
        line = f"[akod] sweep: {self.done}/{self.total} trials done{failed}"
        left = self.total - self.done
        if left > 0 and self.durations:
            mean = sum(self.durations) / len(self.durations)
            running = [now - t for t in self.started.values()]
            work = sum(max(mean - elapsed, 0.0) for elapsed in running) + (left - len(running)) * mean
            line += f", about {max(1, math.ceil(work / min(self.concurrency, left) / 60))} min left"
        self.out(line, flush=True)


# --------------------------------------------------------------------------- trials


def sweep_trial_fn(base_dict: dict, run_root: str, data_dir: str | None, resume_ids: dict[str, str] | None = None,
                   carry: tuple[str, ...] = ()):
    """The Tune trainable: one arm (with a search's values), in the run folder named by the trial's run id
    (:func:`run_id_of`: chosen by the sweep or kept from an unfinished search trial, so that a resumed sweep finds
    it); a finished trial leaves ``summary.json``. Every Train report reaches Tune, with ``carry``'s latest values."""

    def akod_trial(config: dict) -> None:
        from akod_ray.run import train

        point, searched = config["trial"]["point"], searched_values(config)
        run_id = run_id_of(config, tune.get_context().get_trial_id(), resume_ids or {})
        cfg = trial_config(config_from_dict(base_dict), point, run_root, run_id, searched)
        train(cfg, data_dir, run_id=run_id, callbacks=[ProgressReportCallback(carry)], track=False)  # the sweep tracks
        summary = summarize(cfg, point, searched)
        if cfg.sweep.referee_samples:
            summary.update(referee(cfg, cfg.sweep.referee_samples))
        write_summary(cfg.run_dir, summary)
        tune.report(summary)

    return akod_trial


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary))
    tmp.replace(path)
    return path


def read_summary(run_dir: Path) -> dict | None:
    """A finished trial's summary, or None (not finished, or unreadable: the trial then runs again)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return summary if isinstance(summary, dict) else None


def _latest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_*") if p.name.split("_")[1].isdigit()]
    return max(steps, default=-1)


def plan_trials(cfg: Config, runs_dir: Path) -> tuple[list[dict], list[dict]]:
    """From the run folders alone: (rows of the finished trials, Tune params of the trials still to run).

    A point whose run folder holds a summary is finished; otherwise it runs under the run id of its
    folder with the latest checkpoint (its Train run resumes there), or under a new id."""
    done, todo = [], []
    for point in search_space(cfg):
        name = point_name(point)
        folders = [p for p in runs_dir.glob(f"{name}-*") if p.is_dir() and RUN_ID.fullmatch(p.name[len(name) + 1:])]
        summaries = [(p, s) for p in sorted(folders) if (s := read_summary(p)) is not None]
        if summaries:
            folder, summary = summaries[0]
            done.append(dict(summary, trial=name, run_dir=str(folder)))
            continue
        folders.sort(key=lambda p: (_latest_step(p), p.stat().st_mtime))
        run_id = folders[-1].name[len(name) + 1:] if folders else secrets.token_hex(4)
        todo.append({"point": point, "run_id": run_id})
    return done, todo


# --------------------------------------------------------------------------- resume


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def resume_config(cfg: Config, sweep_dir: Path) -> Config:
    """The config the sweep was started with (its config.yaml, safe YAML), after checking that ``cfg``
    asks for the same trials; run.* and sweep.max_concurrent_trials may change between attempts."""
    saved_path = sweep_dir / "config.yaml"
    if not saved_path.is_file():
        raise AkodError(f"no sweep to resume in {str(sweep_dir)!r} (it has no config.yaml); run without --resume first")
    try:
        saved = load_config(saved_path)
    except ConfigError as e:
        raise AkodError(f"cannot resume the sweep in {str(sweep_dir)!r}: {e}") from None
    now, then = _flat(config_to_dict(cfg)), _flat(config_to_dict(saved))
    for key in sorted(set(now) | set(then)):
        if now.get(key) != then.get(key) and not key.startswith(RESUMABLE_CHANGES):
            raise ConfigError(f"{key} is {show(now.get(key))} but the sweep in {str(sweep_dir)!r} was started with "
                              f"{show(then.get(key))}; resume with the same config, or set sweep.name to start another")
    d = config_to_dict(saved)
    d["run"] = config_to_dict(cfg)["run"]
    d["sweep"]["max_concurrent_trials"] = cfg.sweep.max_concurrent_trials
    d["sweep"]["num_samples"] = cfg.sweep.num_samples
    return config_from_dict(d)


def run_sweep(config_path: str | None, overrides: list[str], data_dir_flag: str | None = None, resume: bool = False,
              start_ray=ensure_ray, verbose: bool = True) -> Path:
    """Run (or resume) the sweep; returns the path of its Markdown report. ``start_ray(cfg)`` starts or
    joins Ray once it is needed (not when a resume finds every trial finished); without ``verbose``
    Tune prints no status tables (the trials' own progress lines say enough)."""
    cfg = load_config(config_path, overrides)
    data_dir = data_dir_for(cfg, data_dir_flag)
    root = Path(cfg.run.root).resolve()
    sweep_dir = root / cfg.sweep.name
    runs_dir = sweep_dir / "runs"
    if resume:
        cfg = resume_config(cfg, sweep_dir)
    elif (sweep_dir / "config.yaml").exists() or tune.Tuner.can_restore(str(sweep_dir)):
        raise AkodError(f"sweep folder {str(sweep_dir)!r} already holds a sweep; pass --resume to continue it "
                        "or set sweep.name to start another")
    search = cfg.sweep.search == "optuna"
    done, to_run, resume_ids, tune_args = plan(cfg, runs_dir)
    if not resume:
        save_config(cfg, sweep_dir)
    rows = list(done)
    if to_run:
        from akod_ray.evaluation.fid_run import prepare_inception_reference

        trial_base = prepare_inception_reference(cfg, data_dir, sweep_dir)  # the sweep's config.yaml keeps eval.fid as asked
        start_ray(cfg)
        carry = (cfg.sweep.metric,) if search else ()  # Tune refuses a result without its searcher's metric
        trainable = tune.with_resources(sweep_trial_fn(config_to_dict(trial_base), str(runs_dir), data_dir, resume_ids,
                                                       carry),
                                        {"CPU": 0, "TRAIN_DRIVER": 1})
        concurrency = concurrent_trials(cfg)
        name, dirname = trial_namers(resume_ids)
        param_space = tune_args.pop("param_space")
        tuner = tune.Tuner(  # always a fresh experiment: Tune's pickled state of an earlier attempt is never read
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_name_creator=name,
                                        trial_dirname_creator=dirname, **tune_args),
            run_config=tune.RunConfig(name=cfg.sweep.name, storage_path=str(root), verbose=None if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=sweep_callbacks(trial_base, runs_dir, resume_ids, len(done), to_run,
                                                                concurrency)),
        )
        results = [_row(result) for result in tuner.fit()]
        # a search's finished trials, stopped ones included, from their summaries; failed ones from Tune
        rows = plan_search(cfg, runs_dir)[0] + [r for r in results if "error" in r] if search else rows + results
    return finish_sweep(cfg, sweep_dir, rows)


def plan(cfg: Config, runs_dir: Path) -> tuple[list[dict], int, dict[str, str], dict]:
    """(rows of the finished trials, how many trials to run, the run ids of unfinished search trials by their values,
    the Tuner's param_space and TuneConfig arguments)."""
    if cfg.sweep.search == "grid":
        done, todo = plan_trials(cfg, runs_dir)
        return done, len(todo), {}, {"param_space": {"trial": tune.grid_search(todo)}}
    done, pending = plan_search(cfg, runs_dir)
    to_run = max(0, cfg.sweep.num_samples - len(done))
    pending = pending[:to_run]
    args = {"param_space": {"trial": {"point": search_space(cfg)[0]}}, "num_samples": to_run,
            "scheduler": make_scheduler(cfg)}
    if to_run:
        args["search_alg"] = make_searcher(cfg, done, pending)
    return done, to_run, {values_key(v): run_id for v, run_id in pending}, args


def sweep_callbacks(cfg: Config, runs_dir: Path, resume_ids: dict[str, str], done: int, to_run: int,
                    concurrency: int) -> list:
    """Progress lines; with a scheduler, the summaries of the trials it stopped; with MLflow, the trials' runs."""
    callbacks = [SweepProgress(done + to_run, done, concurrency)]
    if cfg.sweep.scheduler != "none":
        callbacks.append(StoppedTrialSummaries(config_to_dict(cfg), runs_dir, resume_ids))
    if cfg.run.tracking == "mlflow":
        from akod_ray.sweep.tracking import SweepTracking

        callbacks.append(SweepTracking(cfg, runs_dir, resume_ids))
    return callbacks


def finish_sweep(cfg: Config, sweep_dir: Path, rows: list[dict]) -> Path:
    """The table, a search's best trial, the report (and the sweep's MLflow run); one error for failed trials."""
    from akod_ray.reporting.report import write_report

    search = cfg.sweep.search == "optuna"
    write_table(rows, sweep_dir, cfg.eval.fid, tuple(search_ranges(cfg.sweep.search_space)) if search else (),
                cfg.sweep.metric)
    if search and (line := best_line(cfg, rows)):
        print(line, flush=True)
    errors = [r for r in rows if "error" in r]
    report = write_report(sweep_dir)
    if cfg.run.tracking == "mlflow":
        from akod_ray.sweep.tracking import log_sweep

        log_sweep(cfg, sweep_dir)
    if errors:
        raise AkodError(f"{len(errors)} of {len(rows)} trials failed (first: {errors[0]['trial']}: {errors[0]['error']}); "
                        f"table and report in {sweep_dir}")
    return report


def trial_namers(resume_ids: dict[str, str]):
    """Tune's (trial_name_creator, trial_dirname_creator): a grid trial is named by its point (akod_k7_s0), a
    search trial by its run folder (laplace_s0-<run id>), as in the run folders and the table."""

    def name(trial) -> str:
        point = point_name(trial.config["trial"]["point"])
        if "search" not in trial.config:
            return point
        return f"{point}-{run_id_of(trial.config, trial.trial_id, resume_ids)}"

    def dirname(trial) -> str:
        return f"{name(trial)}_{trial.trial_id}" if "search" not in trial.config else name(trial)

    return name, dirname


def _row(result) -> dict:
    """A table row from a Tune result: the trial's summary, or its error in one line."""
    m = dict(result.metrics or {})
    point = ((result.config or {}).get("trial") or {}).get("point") or {}
    m.setdefault("arm", point.get("arm"))
    m["trial"] = point_name(point) if point else m.get("trial_id")
    if "search" in (result.config or {}):  # a search trial: its run folder's name, and the values it was given
        m["trial"] = Path(m["run_dir"]).name if m.get("run_dir") else f"{m['trial']}-{m.get('trial_id')}"
        m.update(searched_values(result.config))
    if result.error is not None:
        cause = root_cause(result.error)
        m["error"] = (str(cause) if isinstance(cause, AkodError) else f"{type(cause).__name__}: {one_line(cause)}")[:300]
    return m
