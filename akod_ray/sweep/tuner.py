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
import io
import json
import math
import re
import secrets
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from akod_ray import storage
from akod_ray.config import Config, config_from_dict, config_to_dict, load_config, save_config, show
from akod_ray.errors import AkodError, ConfigError, one_line, root_cause
from akod_ray.storage import StoragePath, location
from akod_ray.sweep.trial import point_name, search_space, summarize, trial_config
from akod_ray.training.trainer import data_dir_for, ensure_ray

TABLE_COLUMNS = ["trial", "arm", "kernel_size", "seed", "schedule", "msfi", "beta_modulation", "min_snr_gamma",
                 "adaptation", "frozen", "step", "wall_s", "ref_loss", "fid_c10", "fid_c10_n", "fid", "fid_n",
                 "time_to_ref_loss_s", "time_to_fid_c10_s"]
C10_COLUMNS, INCEPTION_COLUMNS = ("fid_c10", "fid_c10_n"), ("fid", "fid_n")
SUMMARY_FILE = "summary.json"  # a finished trial's final numbers, in its run folder
RUN_ID = re.compile(r"[A-Za-z0-9_]{1,40}")  # the run id after "<point name>-" in a run folder's name
# Fields a resume may change: where Ray runs and how many trials run at once, not what a trial computes.
RESUMABLE_CHANGES = ("run.", "sweep.max_concurrent_trials")


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


def table_columns(rows: list[dict], fid: str = "both") -> list[str]:
    """The table's columns: Inception FID (``fid``, ``fid_n``) when a trial recorded it, beside fid_c10 (or in
    its place with ``eval.fid: inception``); fid_c10 alone otherwise."""
    has_fid = any(isinstance(r.get("fid"), (int, float)) and math.isfinite(r["fid"]) for r in rows)
    drop = set() if has_fid else set(INCEPTION_COLUMNS)
    if has_fid and fid == "inception":
        drop |= set(C10_COLUMNS) | {"time_to_fid_c10_s"}
    return [c for c in TABLE_COLUMNS if c not in drop]


def write_table(rows: list[dict], sweep_dir: StoragePath, fid: str = "both") -> tuple[StoragePath, StoragePath]:
    """The sweep table, one row per trial, as CSV and Markdown (each published whole: akod_ray/storage.py);
    ``fid``: eval.fid (:func:`table_columns`)."""
    rows = sorted(rows, key=lambda r: (str(r.get("arm")), r.get("kernel_size") or 0, r.get("seed") or 0))
    columns = table_columns(rows, fid)
    csv_path, md_path = sweep_dir / "sweep_table.csv", sweep_dir / "sweep_table.md"
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    storage.write_text(csv_path, text.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    storage.write_text(md_path, "\n".join(lines) + "\n")
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


def sweep_trial_fn(base_dict: dict, run_root: str, data_dir: str | None):
    """The Tune trainable: one arm, in the run folder named by the trial's ``run_id`` (chosen by the
    sweep, not by Tune, so that a resumed sweep finds it); a finished trial leaves ``summary.json``."""

    def akod_trial(config: dict) -> None:
        from akod_ray.run import train

        point, run_id = config["trial"]["point"], config["trial"]["run_id"]
        cfg = trial_config(config_from_dict(base_dict), point, run_root, run_id)
        train(cfg, data_dir, run_id=run_id, callbacks=[TuneReportCallback()])
        summary = summarize(cfg, point)
        write_summary(cfg.run_dir, summary)
        tune.report(summary)

    return akod_trial


def write_summary(run_dir: StoragePath, summary: dict) -> StoragePath:
    return storage.write_text(location(run_dir) / SUMMARY_FILE, json.dumps(summary))


def read_summary(run_dir: StoragePath) -> dict | None:
    """A finished trial's summary, or None (not finished, or unreadable: the trial then runs again)."""
    try:
        summary = json.loads(storage.read_text(location(run_dir) / SUMMARY_FILE))
    except (OSError, ValueError, RecursionError):
        return None
    return summary if isinstance(summary, dict) else None


def _latest_step(run_dir: StoragePath) -> int:
    steps = [int(e.path.name.split("_")[1]) for e in storage.list_dir(run_dir)
             if e.path.name.startswith("checkpoint_") and e.path.name.split("_")[1].isdigit()]
    return max(steps, default=-1)


def plan_trials(cfg: Config, runs_dir: StoragePath) -> tuple[list[dict], list[dict]]:
    """From the run folders alone: (rows of the finished trials, Tune params of the trials still to run).

    A point whose run folder holds a summary is finished; otherwise it runs under the run id of its
    folder with the latest checkpoint (its Train run resumes there), or under a new id."""
    done, todo = [], []
    children = storage.list_dir(runs_dir)
    for point in search_space(cfg):
        name = point_name(point)
        folders = [e for e in children if e.is_dir and e.path.name.startswith(f"{name}-")
                   and RUN_ID.fullmatch(e.path.name[len(name) + 1:])]
        summaries = [(e.path, s) for e in folders if (s := read_summary(e.path)) is not None]
        if summaries:
            folder, summary = summaries[0]
            done.append(dict(summary, trial=name, run_dir=str(folder)))
            continue
        folders.sort(key=lambda e: (_latest_step(e.path), e.mtime or 0.0, e.path.name))
        run_id = folders[-1].path.name[len(name) + 1:] if folders else secrets.token_hex(4)
        todo.append({"point": point, "run_id": run_id})
    return done, todo


# --------------------------------------------------------------------------- resume


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def resume_config(cfg: Config, sweep_dir: StoragePath) -> Config:
    """The config the sweep was started with (its config.yaml, safe YAML), after checking that ``cfg``
    asks for the same trials; run.* and sweep.max_concurrent_trials may change between attempts."""
    saved_path = sweep_dir / "config.yaml"
    if not storage.is_file(saved_path):
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
    return config_from_dict(d)


def run_sweep(config_path: str | None, overrides: list[str], data_dir_flag: str | None = None, resume: bool = False,
              start_ray=ensure_ray, verbose: bool = True) -> StoragePath:
    """Run (or resume) the sweep; returns the path of its Markdown report. ``start_ray(cfg)`` starts or
    joins Ray once it is needed (not when a resume finds every trial finished); without ``verbose``
    Tune prints no status tables (the trials' own progress lines say enough)."""
    cfg = load_config(config_path, overrides)
    data_dir = data_dir_for(cfg, data_dir_flag)
    root = location(cfg.run.root).resolve()
    sweep_dir = root / cfg.sweep.name
    runs_dir = sweep_dir / "runs"
    if resume:
        cfg = resume_config(cfg, sweep_dir)
    elif storage.exists(sweep_dir / "config.yaml") or any(e.path.name.startswith("experiment_state")
                                                         for e in storage.list_dir(sweep_dir)):
        raise AkodError(f"sweep folder {str(sweep_dir)!r} already holds a sweep; pass --resume to continue it "
                        "or set sweep.name to start another")
    done, todo = plan_trials(cfg, runs_dir)
    if not resume:
        save_config(cfg, sweep_dir)
    rows = list(done)
    if todo:
        from akod_ray.evaluation.fid_run import prepare_inception_reference

        trial_base = prepare_inception_reference(cfg, data_dir, sweep_dir)  # the sweep's config.yaml keeps eval.fid as asked
        start_ray(cfg)
        trainable = tune.with_resources(sweep_trial_fn(config_to_dict(trial_base), str(runs_dir), data_dir),
                                        {"CPU": 0, "TRAIN_DRIVER": 1})
        concurrency = concurrent_trials(cfg)
        tuner = tune.Tuner(  # always a fresh experiment: Tune's pickled state of an earlier attempt is never read
            trainable,
            param_space={"trial": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=cfg.sweep.name, **storage.ray_storage(root), verbose=None if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[SweepProgress(len(done) + len(todo), len(done), concurrency)]),
        )
        rows += [_row(result) for result in tuner.fit()]
    write_table(rows, sweep_dir, cfg.eval.fid)
    from akod_ray.reporting.report import write_report

    errors = [r for r in rows if "error" in r]
    report = write_report(sweep_dir)
    if errors:
        raise AkodError(f"{len(errors)} of {len(rows)} trials failed (first: {errors[0]['trial']}: {errors[0]['error']}); "
                        f"table and report in {sweep_dir}")
    return report


def trial_name(trial) -> str:
    """Tune's name of a trial: its point (akod_k7_s0), as in the run folders and the table."""
    return point_name(trial.config["trial"]["point"])


def trial_dirname(trial) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"


def _row(result) -> dict:
    """A table row from a Tune result: the trial's summary, or its error in one line."""
    m = dict(result.metrics or {})
    point = ((result.config or {}).get("trial") or {}).get("point") or {}
    m.setdefault("arm", point.get("arm"))
    m["trial"] = point_name(point) if point else m.get("trial_id")
    if result.error is not None:
        cause = root_cause(result.error)
        m["error"] = (str(cause) if isinstance(cause, AkodError) else f"{type(cause).__name__}: {one_line(cause)}")[:300]
    return m
