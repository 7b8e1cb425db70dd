"""Experiment tracking (issue 22, items 2 and 3): MLflow for a run and for a sweep, read back through
MlflowClient from an MLflow server the test starts on 127.0.0.1; Tune's results at every log interval;
TensorBoard's sample grids and PPO's return; an unreachable tracking server is one clear error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from akod_ray.cli import main
from ray_helpers import REPO, akod_cmd, akod_env, assert_one_clear_error, read_jsonl, tiny_procedural

# A tiny run: 8 steps, a record every 2, fid_c10 and a sample grid every 4, a checkpoint every 4.
TINY = tiny_procedural(
    run={"name": "tracked", "tracking": "mlflow"},
    diffusion={"schedule": "cosine"},
    model={"msfi": False, "beta_modulation": False},
    train={"steps": 8, "log_every": 2, "ckpt_every": 4, "sample_every": 4},
    eval={"fid_every": 4},
    sweep={"name": "tracked_sweep", "arms": ["baseline", "cosine"], "budget": 64, "max_concurrent_trials": 1},
)
LOG_STEPS = [2, 4, 6, 8]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a temporary backend store and artifact root; its process group (the
    server and the workers it forks) is stopped at the end, nothing else."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (folder / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def jsonl_history(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in metrics.jsonl, once per step (a fid_c10 record repeats its step's wall_s)."""
    return sorted({(r["step"], r[key]) for r in records if key in r})


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def run_cli(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(akod_cmd(*args), cwd=REPO, env=akod_env(), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- without a server, without Ray


def test_an_unreachable_tracking_server_is_one_clear_error(capsys, tmp_path):
    port = free_port()  # nothing listens there
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    code = main(["train", str(cfg), "--set", f"run.root={tmp_path}", "--set",
                 f"run.tracking_uri=http://127.0.0.1:{port}"])
    assert code == 2
    assert_one_clear_error(capsys.readouterr().err,
                           rf"akod: error: run\.tracking_uri 'http://127\.0\.0\.1:{port}': no MLflow tracking server "
                           r"answers there \(.*\)")
    assert not (tmp_path / "tracked").exists()  # nothing started, nothing written


def test_a_tracking_uri_without_a_scheme_is_refused(capsys, tmp_path):
    code = main(["train", "--set", f"run.root={tmp_path}", "--set", "run.tracking=mlflow", "--set",
                 "run.tracking_uri=/tmp/mlruns"])
    assert code == 2
    assert_one_clear_error(capsys.readouterr().err, r"akod: error: run\.tracking_uri must be a URI with a scheme .*")


def test_the_default_tracking_store_lies_beside_the_runs(tmp_path):
    from akod_ray.config import load_config
    from akod_ray.tracking import check_tracking, tracking_uri

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.tracking=mlflow"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    check_tracking(cfg)  # a folder that can be created: no error


def test_a_file_store_or_a_relative_database_is_refused():
    from akod_ray.config import load_config
    from akod_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^run\.tracking_uri must not be a file store \(MLflow 3 refuses them\)"):
        load_config(None, ["run.tracking_uri=file:///tmp/mlruns"])
    with pytest.raises(ConfigError, match=r"^run\.tracking_uri must name an absolute path \(sqlite:////path"):
        load_config(None, ["run.tracking_uri=sqlite:///runs/mlflow.db"])


def test_a_run_in_the_default_file_store_and_its_resume(tmp_path):
    """The driver's and rank 0's sides without Ray, into the default store beside the runs: params, the records
    at their steps (each value once per step), the files at the end; a rerun of the run goes on in its run."""
    from akod_ray.config import load_config, save_config
    from akod_ray.diffusion.schedules import cosine_betas, save_schedule
    from akod_ray.tracking import RunTracking, WorkerMetrics, worker_settings

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=local", "run.tracking=mlflow", "train.batch_size=8"])
    tracking = RunTracking(cfg)
    save_config(cfg, cfg.run_dir)
    save_schedule(cfg.run_dir / "schedule.json", cosine_betas(100), source="cosine")
    metrics = WorkerMetrics(worker_settings(cfg.run_dir))
    records = [{"step": 2, "loss": 0.5, "wall_s": 1.0}, {"step": 4, "loss": 0.4, "wall_s": 2.0, "fid_c10_sampler": "heun"},
               {"step": 4, "wall_s": 2.0, "fid_c10": 30.0, "fid_c10_n": 8}]  # a step's fid record repeats its wall_s
    for r in records:
        metrics.log(r)
        with (cfg.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
    tracking.finish(failed=False)
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracking.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "8"
    assert history(client, run.info.run_id, "wall_s") == [(2, 1.0), (4, 2.0)]
    assert history(client, run.info.run_id, "fid_c10") == [(4, 30.0)] and "fid_c10_n" not in run.data.metrics
    assert {"schedule/schedule.json", "report/report.md"} <= artifacts(client, run.info.run_id)
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not in this process's folder
    again = RunTracking(cfg)  # the same command again: a resume
    assert again.run_id == tracking.run_id and client.get_run(again.run_id).info.status == "RUNNING"


def test_ppo_iterations_and_sample_grids_reach_tensorboard(tmp_path):
    """PPO's return per iteration (RUN/rl/iterations.jsonl, written by the AKOD driver) and the loop's sample
    grids land in TensorBoard's event files."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from akod_ray.reporting.grids import save_grid
    from akod_ray.tracking import ppo_to_tensorboard
    from akod_ray.training.loop import MetricsLog

    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "iterations.jsonl").write_text("".join(
        json.dumps({"iteration": i, "episode_return_mean": 10.0 - i, "num_episodes": 8, "wall_s": 1.0}) + "\n"
        for i in (1, 2, 3)) + '{"iteration": 4, "episode_ret')  # a half-written last line is skipped
    ppo_to_tensorboard(tmp_path)
    ppo_to_tensorboard(tmp_path)  # rewritten, not appended: one value per iteration
    acc = EventAccumulator(str(tmp_path / "tb" / "ppo")).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("ppo/episode_return_mean")] == [(1, 9.0), (2, 8.0), (3, 7.0)]

    log = MetricsLog(tmp_path, 0)
    grid = save_grid(torch.zeros(4, 3, 32, 32), tmp_path / "samples" / "grid_00000004.png", 2)
    log.image(grid, 4)
    log.close()
    images = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload().Images("samples")
    assert [(e.step, e.width, e.height) for e in images] == [(4, 70, 70)]  # 2 x 2 tiles of 32 px, 2 px padding


# --------------------------------------------------------------------------- against a started MLflow server


def test_run_files_and_ppo_iterations_are_logged(mlflow_server, tmp_path):
    """What the end of a run logs (akod_ray.tracking.log_run_files), read back: the schedule files and grids as
    artifacts, PPO's iterations as metrics at their iteration."""
    from akod_ray.diffusion.schedules import cosine_betas, save_schedule
    from akod_ray.tracking import log_run_files

    save_schedule(tmp_path / "schedule.json", cosine_betas(100), source="cosine")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "grid_00000002.png").write_bytes(b"png")
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "iterations.jsonl").write_text("".join(
        json.dumps({"iteration": i, "episode_return_mean": 0.5 * i, "samples_trained": 120}) + "\n" for i in (1, 2)))
    client = client_for(mlflow_server)
    run_id = client.create_run(client.create_experiment("files")).info.run_id
    log_run_files(client, run_id, tmp_path)
    assert history(client, run_id, "ppo/episode_return_mean") == [(1, 0.5), (2, 1.0)]
    assert history(client, run_id, "ppo/samples_trained") == [(1, 120.0), (2, 120.0)]
    assert artifacts(client, run_id) == {"schedule/schedule.json", "schedule/scheduler_config.json",
                                         "samples/grid_00000002.png"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_is_tracked_in_mlflow(mlflow_server, tmp_path):
    """`akod train` with run.tracking=mlflow: the resolved config as params, every metrics.jsonl record as metrics
    at its step (rank 0, through setup_mlflow), the schedule files, sample grids and report as artifacts."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = run_cli(["train", str(cfg), "--set", f"run.root={tmp_path}", "--set", f"run.tracking_uri={mlflow_server}"],
                  tmp_path, 500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "tracked"
    client = client_for(mlflow_server)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    params = run.data.params
    assert (params["train.batch_size"], params["diffusion.schedule"], params["run.tracking"]) == ("8", "cosine", "mlflow")
    assert params["model.channels"] == "[8, 8, 8, 8]" and len(params) > 100  # the whole resolved config
    records = read_jsonl(run_dir / "metrics.jsonl")
    for key in ("loss", "ref_loss", "lr", "wall_s"):
        assert history(client, run.info.run_id, key) == jsonl_history(records, key), key
    assert [s for s, _ in history(client, run.info.run_id, "loss")] == LOG_STEPS
    assert [s for s, _ in history(client, run.info.run_id, "fid_c10")] == [4, 8]
    assert artifacts(client, run.info.run_id) >= {"schedule/schedule.json", "schedule/scheduler_config.json",
                                                   "samples/grid_00000004.png", "samples/grid_00000008.png",
                                                   "report/report.md"}
    assert not (run_dir / "report.md").exists()  # the report for MLflow is written elsewhere


@pytest.fixture(scope="module")
def tracked_sweep(mlflow_server, tmp_path_factory):
    """A two-trial sweep (baseline and cosine, 8 steps each) with run.tracking=mlflow, run once for the tests below."""
    root = tmp_path_factory.mktemp("sweep")
    cfg = root / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = run_cli(["sweep", str(cfg), "--set", f"run.root={root}", "--set", f"run.tracking_uri={mlflow_server}"],
                  root, 800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "tracked_sweep"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweeps_trials_are_mlflow_runs_tagged_with_their_arm_kernel_size_and_seed(mlflow_server, tracked_sweep):
    client = client_for(mlflow_server)
    experiment = client.get_experiment_by_name("tracked_sweep")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    trials = {name: r for name, r in runs.items() if r.data.tags.get("akod.kind") != "sweep"}
    assert sorted(r.data.tags["arm"] for r in trials.values()) == ["baseline", "cosine"]
    for name, run in trials.items():
        run_dir = tracked_sweep / "runs" / name
        tags = run.data.tags
        assert (tags["kernel_size"], tags["seed"], run.info.status) == ("", "0", "FINISHED")
        assert run.data.params["diffusion.schedule"] == {"baseline": "linear", "cosine": "cosine"}[tags["arm"]]
        assert run.data.params["run.name"] == name and run.data.params["train.steps"] == "8"
        records = read_jsonl(run_dir / "metrics.jsonl")
        for key in ("loss", "ref_loss", "wall_s"):
            assert history(client, run.info.run_id, key) == jsonl_history(records, key), key
        assert [s for s, _ in history(client, run.info.run_id, "fid_c10")] == [4, 8]
        assert artifacts(client, run.info.run_id) >= {"schedule/schedule.json", "schedule/scheduler_config.json",
                                                       "samples/grid_00000004.png", "samples/grid_00000008.png"}
    (sweep,) = [r for r in runs.values() if r.data.tags.get("akod.kind") == "sweep"]
    assert artifacts(client, sweep.info.run_id) >= {"sweep_table.csv", "sweep_table.md", "report/report.md"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tune_gets_a_result_at_every_log_interval(tracked_sweep):
    """Each trial's Tune results (result.json in its Tune folder): one per log interval (2, 4, 6, 8; the
    checkpoints at 4 and 8 ride on the same reports), then the trial's summary."""
    trial_dirs = sorted(p for p in tracked_sweep.iterdir() if (p / "result.json").is_file())
    assert len(trial_dirs) == 2
    for folder in trial_dirs:
        results = read_jsonl(folder / "result.json")
        assert [r["step"] for r in results] == LOG_STEPS + [8], folder.name
        assert [r["training_iteration"] for r in results] == [1, 2, 3, 4, 5]
        assert all("ref_loss" in r for r in results[:4]) and "fid_c10" in results[1] and "arm" in results[-1]
