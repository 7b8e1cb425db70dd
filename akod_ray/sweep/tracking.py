"""A sweep in MLflow (run.tracking: mlflow): one MLflow run per trial, made on Tune's side by Ray's
MLflowLoggerCallback, and one run for the sweep's report and table (akod_ray/tracking.py says what is logged).

Ray's callback logs a trial's Tune config as params and every result at Tune's iteration; here a trial's run
gets the trial's resolved config as params, its arm, kernel size and seed (and a search's values) as tags, the
records its workers report at every log interval as metrics at their training step, and at its end the run
folder's schedule files, sample grids and PPO's iterations. A trial's run id is kept in its run folder, so a
resumed sweep goes on in the same MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from akod_ray.config import Config, config_from_dict, config_to_dict
from akod_ray.sweep.search import run_id_of, searched_values
from akod_ray.sweep.trial import trial_config
from akod_ray.tracking import (Unlogged, experiment_name, flat_params, log_metrics, log_params, log_report,
                               log_run_files, numeric, open_run, tracking_uri)

TUNE_KEYS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag"}


class SweepTracking(MLflowLoggerCallback):
    """MLflowLoggerCallback with the project's runs: see the module docstring."""

    def __init__(self, cfg: Config, runs_dir: Path, resume_ids: dict[str, str]):
        super().__init__(tracking_uri=tracking_uri(cfg), experiment_name=experiment_name(cfg, sweep=True))
        self.base, self.runs_dir, self.resume_ids = config_to_dict(cfg), Path(runs_dir), resume_ids
        self.run_dirs: dict = {}
        self.unlogged: dict = {}

    def setup(self, *args, **kwargs):
        from akod_ray.tracking import _client, experiment_id

        experiment_id(_client(self.tracking_uri), self.tracking_uri, self.experiment_name)  # with our artifact place
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:
            return
        point, searched = trial.config["trial"]["point"], searched_values(trial.config)
        cfg = trial_config(config_from_dict(self.base), point, str(self.runs_dir),
                           run_id_of(trial.config, trial.trial_id, self.resume_ids), searched)
        tags = {"arm": point["arm"], "kernel_size": point["kernel_size"] or "", "seed": point["seed"],
                "sweep": cfg.sweep.name, "trial_id": trial.trial_id, **searched}
        client = self.mlflow_util._get_client()
        saved = open_run(client, self.tracking_uri, cfg.run_dir, self.experiment_name, cfg.run.name, tags, "tune")
        self._trial_runs[trial], self.run_dirs[trial], self.unlogged[trial] = saved["run_id"], cfg.run_dir, Unlogged()
        log_params(client, saved["run_id"], flat_params(cfg))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = result.get("step")
        if trial not in self._trial_runs or not isinstance(step, int):
            return
        metrics = {k: v for k, v in numeric(result).items() if k not in TUNE_KEYS and "." not in k}  # "a.b": a param
        if new := self.unlogged[trial](metrics, step):
            log_metrics(self.mlflow_util._get_client(), self._trial_runs[trial], new, step)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial not in self._trial_runs:
            return
        client, run_id = self.mlflow_util._get_client(), self._trial_runs[trial]
        log_run_files(client, run_id, self.run_dirs[trial])
        client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def log_sweep(cfg: Config, sweep_dir: Path) -> None:
    """The sweep's own MLflow run: its report (with plots) and its table, as artifacts."""
    from akod_ray.tracking import _client

    uri = tracking_uri(cfg)
    client = _client(uri)
    saved = open_run(client, uri, sweep_dir, experiment_name(cfg, sweep=True), cfg.sweep.name,
                     {"akod.kind": "sweep", "sweep": cfg.sweep.name}, "sweep")
    for name in ("sweep_table.csv", "sweep_table.md"):
        if (sweep_dir / name).is_file():
            client.log_artifact(saved["run_id"], str(sweep_dir / name))
    log_report(client, saved["run_id"], sweep_dir)
    client.set_terminated(saved["run_id"], "FINISHED")
