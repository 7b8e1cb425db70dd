"""`sweep.search: optuna` and `sweep.scheduler: asha`: what a user would do instead of AKOD, search a fixed
schedule's parameters (Tune + Optuna's TPE), and stop the worse trials early (Tune's ASHA).

A search has one point (one fixed arm, one seed) and ``sweep.num_samples`` trials, each with its values of
``sweep.search_space`` under ``config["search"]`` and its own run folder ``runs/<point>-<run id>``. Resume
reads what this project writes, never Tune's or Optuna's pickles: a finished trial's ``summary.json`` (its
values and result are told to Optuna again, so the search goes on from what it learned), and an unfinished
trial's ``config.yaml`` (its values are asked first, in its old run folder, so its Train run resumes from
its last checkpoint).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from akod_ray.config import Config, config_from_dict, parse_yaml, search_ranges
from akod_ray.sweep.trial import point_name, search_space, summarize, trial_config

SEARCH_PREFIX = "search/"  # Optuna's parameter names: unflattened by Tune into config["search"]


def searched_values(config: dict) -> dict:
    """A trial's values of the search space ({} in a grid sweep)."""
    return dict(config.get("search") or {})


def values_key(values: dict) -> str:
    """One string per point of the search space (exact floats), to find an unfinished trial's run id."""
    return json.dumps({k: float(v) for k, v in sorted(values.items())})


def run_id_of(config: dict, trial_id: str, resume_ids: dict[str, str]) -> str:
    """The run id of a trial: the grid's own (chosen by the sweep), an unfinished search trial's old one, or
    Tune's trial id."""
    return config["trial"].get("run_id") or resume_ids.get(values_key(searched_values(config))) or trial_id


def _values_in_folder(folder: Path, keys: list[str]) -> dict | None:
    """The searched fields as a trial's run folder holds them (its config.yaml, safe YAML), or None."""
    try:
        saved = parse_yaml((folder / "config.yaml").read_text())
        return {key: float(saved[key.split(".")[0]][key.split(".")[1]]) for key in keys}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def plan_search(cfg: Config, runs_dir: Path) -> tuple[list[dict], list[tuple[dict, str]]]:
    """From the run folders alone: (summaries of the finished trials, (values, run id) of the unfinished ones)."""
    from akod_ray.sweep.tuner import RUN_ID, read_summary

    name = point_name(search_space(cfg)[0])
    keys = list(search_ranges(cfg.sweep.search_space))
    done, pending = [], []
    for folder in sorted(runs_dir.glob(f"{name}-*")):
        run_id = folder.name[len(name) + 1:]
        if not folder.is_dir() or not RUN_ID.fullmatch(run_id):
            continue
        values = _values_in_folder(folder, keys)
        if values is None:  # never got as far as writing its config: nothing to resume
            continue
        summary = read_summary(folder)
        if summary is not None:
            done.append(dict(summary, trial=f"{name}-{run_id}", run_dir=str(folder), **values))
        else:
            pending.append((values, run_id))
    return done, pending


def make_searcher(cfg: Config, done: list[dict], pending: list[tuple[dict, str]]):
    """Optuna's TPE over sweep.search_space, told the finished trials' results, asking the unfinished ones first."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = {SEARCH_PREFIX + key: optuna.distributions.FloatDistribution(low, high, log=log)
             for key, (low, high, log) in search_ranges(cfg.sweep.search_space).items()}
    # a new seed for each attempt: the same one would draw the first attempt's points again
    seed = cfg.sweep.seeds[0] + len(done) + len(pending)
    searcher = OptunaSearch(space=space, metric=cfg.sweep.metric, mode="min", seed=seed,
                            points_to_evaluate=[{SEARCH_PREFIX + k: v for k, v in values.items()}
                                                for values, _ in pending] or None)
    for row in done:
        value = row.get(cfg.sweep.metric)
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        searcher.add_evaluated_point({SEARCH_PREFIX + k: float(row[k]) for k in search_ranges(cfg.sweep.search_space)},
                                     float(value) if ok else math.nan, error=not ok)
    return searcher


def make_scheduler(cfg: Config):
    """None, or Tune's ASHA on sweep.metric over the budget (steps, or budget seconds)."""
    if cfg.sweep.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    images = cfg.sweep.budget_kind == "images"
    max_t = max(1, int(cfg.sweep.budget // cfg.train.batch_size)) if images else float(cfg.sweep.budget)
    # stop_last_trials=False: a trial that passed every rung ends by itself, after its final evaluation and summary
    return ASHAScheduler(time_attr="step" if images else "budget_s", metric=cfg.sweep.metric, mode="min", max_t=max_t,
                         grace_period=max(cfg.sweep.asha_grace * max_t, 1e-9), reduction_factor=3,
                         stop_last_trials=False)


class ProgressReportCallback(TuneReportCallback):
    """TuneReportCallback whose every result carries ``keys`` (the search's metric): the latest value a worker
    reported, NaN before the first. Tune refuses a result without the metric that its searcher or scheduler
    uses, and fid_c10 is measured only every eval.fid_every steps, while Train reports at every log interval."""

    def __init__(self, keys: tuple[str, ...] = ()):
        super().__init__()
        self.latest = {key: math.nan for key in keys}

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0]
        self.latest.update({k: first[k] for k in self.latest if isinstance(first.get(k), (int, float))})
        super().after_report(run_context, [{**self.latest, **first}, *metrics[1:]], checkpoint)


class StoppedTrialSummaries(tune.Callback):
    """A trial that ASHA stopped ends without writing its summary.json; write it here, from its run folder, so that
    it counts as finished (in the table, and for a resume, which tells Optuna what it reached)."""

    def __init__(self, base_dict: dict, runs_dir: Path, resume_ids: dict[str, str]):
        self.base_dict, self.runs_dir, self.resume_ids = base_dict, Path(runs_dir), resume_ids

    def on_trial_complete(self, iteration, trials, trial, **info):
        from akod_ray.sweep.tuner import SUMMARY_FILE, write_summary

        point, searched = trial.config["trial"]["point"], searched_values(trial.config)
        run_id = run_id_of(trial.config, trial.trial_id, self.resume_ids)
        cfg = trial_config(config_from_dict(self.base_dict), point, str(self.runs_dir), run_id, searched)
        if (cfg.run_dir / SUMMARY_FILE).exists() or not (cfg.run_dir / "metrics.jsonl").is_file():
            return
        write_summary(cfg.run_dir, dict(summarize(cfg, point, searched), stopped_early=True))


def best_line(cfg: Config, rows: list[dict]) -> str | None:
    """One line naming the search's best trial so far, or None."""
    metric = cfg.sweep.metric
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return None
    best = min(scored, key=lambda r: r[metric])
    values = ", ".join(f"{k}={best[k]:.4g}" for k in search_ranges(cfg.sweep.search_space))
    return f"[akod] search: best of {len(scored)} trials: {values}, {metric} {best[metric]:.4g} ({best.get('trial')})"
