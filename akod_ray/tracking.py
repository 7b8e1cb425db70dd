"""Experiment tracking: MLflow when ``run.tracking: mlflow``, and what TensorBoard gets besides the loop's scalars.

One MLflow run per training run, in the experiment ``run.tracking_experiment`` (default: the run's or the
sweep's name), at ``run.tracking_uri`` (default: a local store beside the runs, ``<run.root>/mlflow.db`` with the
artifacts in ``<run.root>/mlartifacts``; MLflow 3 refuses plain file stores):

- params: the resolved config, flattened (``train.batch_size``, ...);
- metrics: every metrics.jsonl record at its step (loss, ref_loss, fid_c10, ...), PPO's iterations
  (``ppo/episode_return_mean``, ``ppo/prior_kl``, ... at the iteration) from ``RUN/rl/iterations.jsonl``;
- artifacts: ``schedule.json`` and ``scheduler_config.json`` (``schedule/``), the sample grids (``samples/``) and
  the run's report (``report/``).

Who writes what, through Ray's own integration: for ``akod train`` the driver (:class:`RunTracking`) makes the
run, logs the params and, at the end, the artifacts and PPO's iterations; rank 0 logs the metrics as it
reports them (``setup_mlflow``, :class:`WorkerMetrics`). In a sweep, Tune's side (:class:`SweepTracking`, an
``MLflowLoggerCallback``) makes one run per trial, tagged with its arm, kernel size and seed, and logs the
results that reach Tune at every log interval; a final run named after the sweep holds its report and table.
The run's id is kept in the run folder (``mlflow_run.json``), so a resumed run or trial goes on in its run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from akod_ray import storage
from akod_ray.config import Config, config_to_dict
from akod_ray.errors import AkodError, ConfigError
from akod_ray.storage import StoragePath, location

RUN_FILE = "mlflow_run.json"  # {"run_id", "experiment_id", "tracking_uri", "writer": "train" | "tune"}
# of RUN/rl/iterations.jsonl (v3's driver: the return is of rewards centred in their window, so about 0; the
# learner's KL to the prior, entropy and value-function fit say more)
PPO_KEYS = ("episode_return_mean", "num_episodes", "samples_trained", "sample_updates", "prior_kl", "entropy",
            "vf_explained_var")
# identities and sample counts, not curves
SKIP_METRICS = {"step", "kernel_size", "seed", "fid_c10_n", "fid_n", "fid_c10_final_n"}
MAX_BATCH = 100  # params (and metrics) per MLflow log_batch call: the REST API's limit for params


def tracking_uri(cfg: Config) -> str:
    """run.tracking_uri, or the local store beside the runs (absolute: Ray's workers run in other folders). A run.root
    in an object store has no such default (an SQLite database cannot live in a bucket): :func:`check_tracking`."""
    if cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    if storage.is_remote(cfg.run.root):
        raise ConfigError(f"run.tracking_uri must be set with run.tracking=mlflow when run.root is in an object store "
                          f"({cfg.run.root!r}): the default SQLite store beside the runs cannot live in a bucket; "
                          "use a tracking server (http://host:5000) or sqlite:////local/path/mlflow.db")
    return f"sqlite:///{Path(cfg.run.root).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where the artifacts of an experiment made here go: beside a local database (MLflow would put them under the
    creating process's folder), else where the tracking server says."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(urllib.parse.unquote(uri[len("sqlite:///"):])).parent / "mlartifacts").as_uri()


def experiment_name(cfg: Config, sweep: bool = False) -> str:
    return cfg.run.tracking_experiment or (cfg.sweep.name if sweep else cfg.run.name)


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: ``section.field`` -> its value as text."""
    return {f"{section}.{name}": str(value) for section, fields in config_to_dict(cfg).items()
            for name, value in fields.items()}


def numeric(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record (strings, flags, identities and NaN left out)."""
    return {k: float(v) for k, v in record.items() if k not in SKIP_METRICS and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Unlogged:
    """The metrics of a record not yet logged at its step: a step's fid_c10 record, a checkpoint's report and a
    trial's summary repeat values of records already logged, which MLflow would keep twice."""

    def __init__(self):
        self.logged: dict[str, tuple[int, float]] = {}

    def __call__(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        new = {k: v for k, v in metrics.items() if self.logged.get(k) != (step, v)}
        self.logged.update({k: (step, v) for k, v in new.items()})
        return new


# --------------------------------------------------------------------------- before anything starts


def check_tracking(cfg: Config, timeout_s: float = 10.0) -> None:
    """With run.tracking=mlflow: mlflow is installed and the tracking URI can be written or answers; else one
    line naming run.tracking_uri (MLflow's own client retries an unreachable server for minutes)."""
    if cfg.run.tracking != "mlflow":
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("run.tracking=mlflow needs the mlflow package (pip install -r requirements.txt)") from None
    from akod_ray.preflight import check_writable_folder

    uri = tracking_uri(cfg)
    field = "run.tracking_uri" if cfg.run.tracking_uri else "run.tracking_uri (default: beside run.root)"
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "sqlite":
        check_writable_folder(Path(urllib.parse.unquote(uri[len("sqlite:///"):])).parent, field)
    elif scheme in ("http", "https"):
        _check_server(uri, field, timeout_s)


def _check_server(uri: str, field: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConfigError(f"{field} {uri!r}: the MLflow server refused access (HTTP {e.code}); set "
                              "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD") from None
        if e.code == 404 and b"RESOURCE_DOES_NOT_EXIST" in e.read()[:2000]:
            return  # an MLflow server without a Default experiment
        raise ConfigError(f"{field} {uri!r} answers, but not as an MLflow tracking server (HTTP {e.code})") from None
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"{field} {uri!r}: no MLflow tracking server answers there "
                          f"({getattr(reason, 'strerror', None) or reason})") from None


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


# --------------------------------------------------------------------------- a run's MLflow run


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment ``name``, made if missing (its artifacts beside a local database: :func:`artifact_location`)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # noqa: BLE001 - created meanwhile by another process (MLflow raises its own RestException)
        return client.get_experiment_by_name(name).experiment_id


def read_run_file(run_dir: StoragePath, uri: str, writer: str) -> dict | None:
    """The MLflow run a run folder already logs to (same URI and writer), or None."""
    try:
        saved = json.loads(storage.read_text(location(run_dir) / RUN_FILE))
    except (OSError, ValueError):
        return None
    ok = isinstance(saved, dict) and saved.get("tracking_uri") == uri and saved.get("writer") == writer
    return saved if ok and isinstance(saved.get("run_id"), str) else None


def open_run(client, uri: str, run_dir: StoragePath, experiment: str, run_name: str, tags: dict, writer: str) -> dict:
    """The run folder's MLflow run: the one it already has (a resume), else a new one, recorded in the folder."""
    from mlflow.entities import LifecycleStage

    saved = read_run_file(run_dir, uri, writer)
    if saved is not None:
        try:
            if client.get_run(saved["run_id"]).info.lifecycle_stage == LifecycleStage.ACTIVE:
                client.update_run(saved["run_id"], status="RUNNING")
                return saved
        except Exception:  # noqa: BLE001 - deleted, or another store: start a new run
            pass
    exp_id = experiment_id(client, uri, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    saved = {"run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": uri, "writer": writer}
    storage.write_text(location(run_dir) / RUN_FILE, json.dumps(saved))
    return saved


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_BATCH])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, int(step)) for k, v in metrics.items()]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, metrics=items[i:i + MAX_BATCH])


def log_run_files(client, run_id: str, run_dir: StoragePath) -> None:
    """The run folder's artifacts (schedule files, sample grids) and PPO's iterations as metrics at their iteration;
    files in an object store go through a local copy under their own name."""
    run_dir = location(run_dir)

    def log(path: StoragePath, folder: str) -> None:
        with storage.local_copy(path) as local:
            client.log_artifact(run_id, str(local), folder)

    for name in ("schedule.json", "scheduler_config.json"):
        if storage.is_file(run_dir / name):
            log(run_dir / name, "schedule")
    for grid in storage.list_dir(run_dir / "samples"):
        if not grid.is_dir and grid.path.suffix == ".png":
            log(grid.path, "samples")
    for it in ppo_iterations(run_dir):
        log_metrics(client, run_id, {f"ppo/{k}": v for k, v in numeric(it).items() if k in PPO_KEYS},
                    int(it["iteration"]))


def log_report(client, run_id: str, folder: StoragePath) -> None:
    """The Markdown report of a run or sweep folder, written to a temporary folder (the run folder is left as it is)."""
    from akod_ray.reporting.report import write_report

    with tempfile.TemporaryDirectory(prefix="akod_report_") as tmp:
        write_report(folder, Path(tmp) / "report.md")
        client.log_artifacts(run_id, tmp, "report")


def ppo_iterations(run_dir: StoragePath) -> list[dict]:
    """PPO's iterations as the AKOD driver writes them (RUN/rl/iterations.jsonl); a half-written last line is skipped."""
    path = location(run_dir) / "rl" / "iterations.jsonl"
    out = []
    if storage.is_file(path):
        for line in storage.read_text(path).splitlines():
            try:
                it = json.loads(line)
            except ValueError:
                continue
            if isinstance(it, dict) and isinstance(it.get("iteration"), int):
                out.append(it)
    return out


def ppo_to_tensorboard(run_dir: StoragePath) -> None:
    """PPO's iterations (return, sample counts, KL to the prior, ...) into TensorBoard, ``RUN/tb/ppo`` (rewritten whole
    each time; in an object store written locally, then uploaded file by file)."""
    iterations = ppo_iterations(run_dir)
    if not iterations:
        return
    from torch.utils.tensorboard import SummaryWriter

    target = location(run_dir) / "tb" / "ppo"
    with tempfile.TemporaryDirectory(prefix="akod_tb_ppo_") as tmp:
        folder = Path(tmp) if storage.is_remote(target) else target
        shutil.rmtree(folder, ignore_errors=True)
        writer = SummaryWriter(str(folder))
        try:
            for it in iterations:
                for k, v in numeric(it).items():
                    if k in PPO_KEYS:
                        writer.add_scalar(f"ppo/{k}", v, it["iteration"])
        finally:
            writer.close()
        if storage.is_remote(target):
            storage.delete_tree(target)
            for f in sorted(folder.iterdir()):
                storage.upload_file(f, target / f.name)


class RunTracking:
    """The driver's side of one run's MLflow run (``akod train``): params first, artifacts and PPO at the end."""

    def __init__(self, cfg: Config):
        self.uri, self.run_dir = tracking_uri(cfg), cfg.run_dir.resolve()
        self.client = _client(self.uri)
        tags = {"akod.run_dir": str(self.run_dir), "akod.schedule": cfg.diffusion.schedule}
        self.run_id = open_run(self.client, self.uri, self.run_dir, experiment_name(cfg), cfg.run.name, tags,
                               "train")["run_id"]
        log_params(self.client, self.run_id, flat_params(cfg))

    def finish(self, failed: bool) -> None:
        """The run's files, its report (if it finished) and its status. A tracking server lost at the end costs
        one printed line, not the finished training (nor the error that ended it)."""
        try:
            log_run_files(self.client, self.run_id, self.run_dir)
            if not failed:
                try:
                    log_report(self.client, self.run_id, self.run_dir)
                except AkodError as e:  # a run folder the report cannot read: the run is still finished
                    print(f"[akod] MLflow: no report logged: {e}", flush=True)
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        except Exception as e:  # noqa: BLE001 - MLflow's own exceptions, network errors
            print(f"[akod] MLflow: the run's files and status were not logged: {type(e).__name__}: "
                  f"{' '.join(str(e).split())[:300]}", flush=True)


def worker_settings(run_dir: StoragePath) -> dict | None:
    """The tracking settings of a run whose driver opened an MLflow run for rank 0 to log into, else None."""
    try:
        saved = json.loads(storage.read_text(location(run_dir) / RUN_FILE))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("writer") != "train":
        return None
    return {"tracking_uri": saved["tracking_uri"], "experiment_id": saved["experiment_id"], "run_id": saved["run_id"],
            "run_name": location(run_dir).name}


class WorkerMetrics:
    """Rank 0's side: the records it reports, logged as MLflow metrics at their step (Ray's ``setup_mlflow``,
    attached to the driver's run through MLFLOW_RUN_ID); every value is logged once per step."""

    def __init__(self, settings: dict):
        from ray.air.integrations.mlflow import setup_mlflow

        os.environ["MLFLOW_RUN_ID"] = settings["run_id"]  # setup_mlflow's start_run then resumes the driver's run
        self.mlflow = setup_mlflow(tracking_uri=settings["tracking_uri"], experiment_id=settings["experiment_id"],
                                   run_name=settings["run_name"], rank_zero_only=True)
        self.unlogged = Unlogged()

    def log(self, record: dict) -> None:
        step = record.get("step")
        if isinstance(step, int) and (new := self.unlogged(numeric(record), step)):
            self.mlflow.log_metrics(new, step=step)
