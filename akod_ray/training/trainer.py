"""The driver of one training run: a Ray Train TorchTrainer with N DDP workers.

Ray-specific and thin: it resolves the data folder, writes the resolved config, starts or
joins Ray, builds the TorchTrainer and turns worker failures back into clear errors.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from akod_ray import storage
from akod_ray.config import Config, config_to_dict, save_config
from akod_ray.data.parquet import check_schema, resolve_data_dir
from akod_ray.diffusion.schedules import save_schedule
from akod_ray.errors import AkodError, CheckpointError, ConfigError, DataError
from akod_ray.storage import StoragePath, location
from akod_ray.training.checkpoint import TRAIN_INDEX
from akod_ray.training.schedule_source import fixed_betas

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Ray Train's controller takes one report from each worker per poll, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), and the loop reports at every log interval: reports that come faster queue up, and the run waits for the
# queue at its next checkpoint. Poll every 0.5 s unless the variable is set (the driver's value reaches the controller).
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def check_ray_address(address: str, field: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming ``field``, when nothing listens at a ``host:port`` or ``ray://host:port``
    Ray address (ray.init itself retries an unreachable head for minutes before it gives up).
    IPv6 hosts come in brackets, as Ray writes them (``[fd00::1]:6379``); 'auto', 'local' and
    other client schemes (``<module>://...``) are left to ray.init."""
    if address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    if scheme in ("http", "https"):
        raise ConfigError(f"{field} {address!r} is a dashboard (Jobs API) URL; give the head's address host:port "
                          "(the GCS port, 6379 by default), ray://host:port or 'auto'")
    if scheme not in ("", "ray"):
        return
    parts = urllib.parse.urlsplit("//" + rest)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number or out of range
        host, port = None, None
    if not host or port is None:
        raise ConfigError(f"{field} must be 'auto', 'local', host:port or ray://host:port, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"{field} {address!r}: no Ray head answers there ({e.strerror or e})") from None


def ensure_ray(cfg: Config) -> None:
    """Join the cluster in run.ray_address or RAY_ADDRESS, else start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}}
    if address:
        check_ray_address(address, "run.ray_address" if cfg.run.ray_address else "RAY_ADDRESS")
        ray.init(address=address, runtime_env=runtime_env if address != "auto" else None)
        return
    ray.init(
        address="local",  # a new local Ray: never join another one that `ray start` left on this machine
        num_cpus=cfg.run.num_cpus,
        include_dashboard=cfg.run.dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        resources={"TRAIN_DRIVER": 8},
    )


def data_dir_for(cfg: Config, flag: str | None) -> str | None:
    if cfg.data.source != "cifar10":
        return None
    folder = resolve_data_dir(flag, cfg.data.data_dir).resolve()
    check_parquet_files(folder)
    return str(folder)


def check_parquet_files(folder: StoragePath) -> None:
    """Fail here, before Ray starts, on a missing or unreadable split: the workers would fail on it
    too, but only after Ray and the worker group are up, and with their tracebacks in the logs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        path = folder / f"{split}.parquet"
        if not storage.is_file(path):
            raise DataError(f"data file {str(path)!r} does not exist")
        try:
            fs, fs_path = storage.fs_and_path(path)
            schema = pq.read_schema(fs_path, filesystem=fs) if storage.is_remote(path) else pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"data file {str(path)!r} is not a readable Parquet file: {e}") from None
        check_schema(path, schema)




def _train_index_problem(path: StoragePath) -> str | None:
    """What Ray Train would fail on when it reads ``path`` at a resume, or None."""
    try:
        state = json.loads(storage.read_bytes(path).decode("utf-8"))
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (UnicodeDecodeError, RecursionError):
        return "is not valid JSON"
    except json.JSONDecodeError as e:
        return f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if not isinstance(state, dict):
        return f"holds a JSON {type(state).__name__}, not an object"
    if state.get("ray_version") != ray.__version__:
        return f"was written by Ray {state.get('ray_version')!r:.40}, this is Ray {ray.__version__} (Ray Train reads only its own)"
    try:  # Ray Train's own schema of the file, where this Ray version has it where we look
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
    except ImportError:
        _CheckpointManagerState = None
    if _CheckpointManagerState is not None:
        try:
            validate = getattr(_CheckpointManagerState, "model_validate", None) or _CheckpointManagerState.parse_obj
            validate(state)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, of either pydantic version
            return f"does not hold what Ray Train writes ({' '.join(str(e).split())[:200]})"
    results = state.get("checkpoint_results")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        return "has no list of checkpoint_results"
    names = [r.get("checkpoint_dir_name") for r in results]
    if len(state.get("checkpoint_report_indices") or []) != len(names):
        return "lists checkpoint_report_indices that do not match its checkpoint_results"
    latest = state.get("latest_checkpoint_result")
    if latest is not None and (not isinstance(latest, dict) or latest.get("checkpoint_dir_name") not in names):
        return "names a latest checkpoint that is not among its checkpoint_results"
    pending = state.get("pending_training_results") or []
    if len(pending) != len(state.get("pending_validation_specs") or []) or any(
            not isinstance(p, dict) or p.get("checkpoint_dir_name") not in names for p in pending):
        return "lists pending results that do not match its checkpoint_results"
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or not storage.is_dir(path.parent / name):
            return f"lists a checkpoint {str(name)!r:.60} that is not a folder beside it"
    return None


def check_train_index(run_dir: str | StoragePath) -> None:
    """Ray Train reads its index of a run's checkpoints (:data:`TRAIN_INDEX`) when the run resumes; a file it
    cannot use fails inside its controller, as an ActorDiedError that names neither the file nor a way out.
    Check it first, naming it."""
    path = location(run_dir) / TRAIN_INDEX
    if not storage.exists(path):
        return
    why = _train_index_problem(path)
    if why is not None:
        raise CheckpointError(f"Ray Train's checkpoint index {str(path)!r} {why}; restore it, or delete it to train "
                              "the run again from step 0 (its checkpoint folders are then replaced)")


def unwrap_worker_error(err: BaseException) -> BaseException:
    """The user-facing error behind a Train failure (e.g. a NaN loss on a worker), if there is one."""
    failures = getattr(err, "worker_failures", None) or {}
    for exc in list(failures.values()) + [err]:
        e: BaseException | None = exc
        while e is not None:
            if isinstance(e, AkodError):
                return e
            cause = getattr(e, "cause", None)
            e = cause if isinstance(cause, BaseException) else e.__cause__
    return err


def build_trainer(cfg: Config, loop_config: dict, callbacks: list | None = None) -> TorchTrainer:
    from akod_ray.training.worker_loop import train_worker

    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    tc = cfg.train
    scaling = ray.train.ScalingConfig(
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker=None if tc.use_gpu else {"CPU": tc.cpus_per_worker},
    )
    run_config = ray.train.RunConfig(
        name=cfg.run.name,  # deterministic: rerunning the same command resumes the same run
        **storage.ray_storage(cfg.run.root),  # a folder, or a bucket through the pyarrow filesystem the project uses
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.num_to_keep),
        callbacks=callbacks or [],
    )
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=run_config,
    )


def loop_config_for(cfg: Config, data_dir: str | None, run_dir: StoragePath, **extra) -> dict:
    """The workers' settings; ``tracking``: the MLflow run rank 0 logs its metrics into, when the driver opened one."""
    from akod_ray.tracking import worker_settings

    tracking = worker_settings(run_dir) if cfg.run.tracking == "mlflow" else None
    return {"config": config_to_dict(cfg), "data_dir": data_dir, "run_dir": str(run_dir.resolve()),
            "cpus_per_worker": cfg.train.cpus_per_worker, "tracking": tracking, **extra}


def read_metrics(run_dir: StoragePath) -> list[dict]:
    path = location(run_dir) / "metrics.jsonl"
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def last_record(records: list[dict]) -> dict:
    """The last step's metrics: its interval record merged with the FID record of the same step, if any."""
    if not records:
        return {}
    step = records[-1].get("step")
    out: dict = {}
    for r in records:
        if r.get("step") == step:
            out.update(r)
    return out


def fit(trainer: TorchTrainer):
    try:
        result = trainer.fit()
    except Exception as e:  # Train wraps worker errors; surface ours as themselves
        inner = unwrap_worker_error(e)
        if inner is not e:
            raise inner from None
        raise
    if result.error is not None:
        raise unwrap_worker_error(result.error)
    return result


def train_fixed(cfg: Config, data_dir_flag: str | None = None, callbacks: list | None = None) -> dict:
    """Train an arm with a fixed schedule (linear, cosine, loglinear, a file); returns the last metrics record."""
    betas = fixed_betas(cfg)  # fail before starting anything if the schedule file is bad
    data_dir = data_dir_for(cfg, data_dir_flag)
    run_dir = cfg.run_dir
    save_config(cfg, run_dir)
    # the schedule as every run exports it: schedule.json and, beside it, diffusers' scheduler_config.json
    save_schedule(run_dir / "schedule.json", betas, source=cfg.diffusion.schedule, final=True)
    ensure_ray(cfg)
    fit(build_trainer(cfg, loop_config_for(cfg, data_dir, run_dir), callbacks))
    return last_record(read_metrics(run_dir))
