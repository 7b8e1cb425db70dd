"""Runs and sweeps whose run.root is a bucket (issue 22), end to end through a real local Ray and a real S3 API
server (moto's server mode over HTTP; tests/s3_helpers.py). The `akod` subprocesses, their Ray and its
workers reach the bucket through AWS_ENDPOINT_URL and the AWS credentials in their environment, and nothing
of the run is written to a local folder but ray.log (in $TMPDIR/akod/s3/...).

* a fixed run with its data in the bucket: trains, checkpoints, is SIGKILLed (driver and its Ray) after a
  checkpoint, resumes from it when rerun; then `akod report`, `akod sample`, `akod fid` and `akod export` read
  the bucket;
* an AKOD run: the same kill and resume (broker state, PPO policy and posted results in the bucket);
* a sweep: finishes, one trial is marked unfinished and payloads are planted in the Tune state in the bucket;
  `--resume` keeps the finished trial, reruns the other, and runs no payload.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import re

import pytest
import yaml

from akod_ray import storage
from akod_ray.training.checkpoint import load_state
from ray_helpers import (  # noqa: F401 - akod_runs is a fixture
    TINY,
    TUNE_CONFIGS,
    akod_cmd,
    akod_env,
    akod_runs,
    interval_records,
    overrides,
    read_jsonl,
    registered_checkpoints,
    require_cifar,
    wait_for_registered_checkpoint,
)
from s3_helpers import moto_server, s3, settled  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

RESUMED = re.compile(r"\[akod\] resumed from the checkpoint at step (\d+)")


def bucket_env(s3, **extra) -> dict:
    return s3.child_env(akod_env(**extra))


def kill_and_rerun(akod_runs, args, env, run_dir, steps: int, every: int) -> tuple[int, list[dict], object]:
    """Start `akod`, SIGKILL it (its whole process group: the driver and its Ray) once a checkpoint is registered
    in the bucket, rerun the same command; returns (the step the rerun resumed from, the records before, rerun)."""
    first = akod_runs(args, "first", env)
    wait_for_registered_checkpoint(run_dir, first, 300, interval=0.5)
    first.kill_group()
    registered, before = settled(lambda: (registered_checkpoints(run_dir), interval_records(run_dir)))
    assert registered and registered[-1] < steps and registered[-1] % every == 0
    second = akod_runs(args, "second", env)
    rc = second.wait(420)
    assert rc == 0, second.tail()
    resumed = [int(s) for s in RESUMED.findall(second.stdout)]
    assert resumed == [registered[-1]], second.stdout[-3000:]
    return registered[-1], before, second


@pytest.mark.timeout(900)
def test_a_fixed_run_in_a_bucket_resumes_after_a_kill_and_reads_back(s3, akod_runs, tmp_path, capsys):
    cifar = require_cifar()
    for split in ("train", "test"):  # the training data comes from the bucket too
        storage.upload_file(cifar / f"{split}.parquet", s3.uri("data", "cifar10", f"{split}.parquet"))
    env = bucket_env(s3, AKOD_DATA_DIR=s3.uri("data", "cifar10"))
    steps, every = 60, 10  # room for a kill mid-run on a loaded machine (the check and the kill take a while)
    run_uri = s3.uri("runs", "fixed")
    run_dir = storage.location(run_uri)
    args = ["train", str(TUNE_CONFIGS / "tiny.yaml"), *overrides(TINY, {
        "run.root": s3.uri("runs"), "run.name": "fixed", "train.num_workers": 1, "train.cpus_per_worker": 1,
        "train.steps": steps, "train.log_every": 5, "train.ckpt_every": every, "train.sample_every": steps})]
    start, before, second = kill_and_rerun(akod_runs, args, env, run_dir, steps, every)

    after = interval_records(run_dir)
    assert [r["step"] for r in after] == list(range(5, steps + 1, 5))
    assert [r for r in after if r["step"] <= start] == [r for r in before if r["step"] <= start]
    assert next(r for r in after if r["step"] > start)["step"] == start + 5  # not rerun from step 0
    names = {e.path.name for e in storage.list_dir(run_dir)}
    assert {"config.yaml", "metrics.jsonl", "schedule.json", "scheduler_config.json", "tb", "samples",
            f"checkpoint_{steps:08d}", "checkpoint_manager_snapshot.json"} <= names, names
    assert sorted(storage.read_manifest(run_dir / f"checkpoint_{steps:08d}")) == ["state.safetensors"]
    assert load_state(run_dir / f"checkpoint_{steps:08d}")["step"] == steps
    assert any(e.path.name.startswith("events.out.tfevents") for e in storage.list_dir(run_dir / "tb"))
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # no local folder named after the URI

    # the commands that read a run, on the bucket
    from akod_ray.cli import main
    from akod_ray.evaluation.feature_net import DEFAULT_C10_REFERENCE

    capsys.readouterr()
    assert main(["report", run_uri]) == 0, capsys.readouterr().err
    assert f"[akod] report: {run_uri}/report.md" in capsys.readouterr().out
    report = storage.read_text(run_dir / "report.md")
    assert "](report_files/ref_loss_vs_time.png)" in report
    assert storage.is_file(run_dir / "report_files" / "ref_loss_vs_time.png")
    out = tmp_path / "grid.png"
    assert main(["sample", run_uri, "--out", str(out), "--n", "4", "--steps", "3"]) == 0, capsys.readouterr().err
    assert out.is_file()
    capsys.readouterr()
    assert main(["fid", run_uri, "--ref", str(DEFAULT_C10_REFERENCE), "--n", "4", "--steps", "3"]) == 0, \
        capsys.readouterr().err
    assert capsys.readouterr().out.splitlines()[-1].startswith("[akod] fid_c10 = ")
    assert main(["export", run_uri, "--out", str(tmp_path / "pipeline")]) == 0, capsys.readouterr().err
    assert {"model_index.json", "scheduler"} <= {p.name for p in (tmp_path / "pipeline").iterdir()}


@pytest.mark.timeout(900)
def test_an_akod_run_in_a_bucket_resumes_after_a_kill(s3, akod_runs):
    """The whole driver killed (its PPO learner and broker with it), not only a Train worker (tests/test_akod_ray.py):
    the trunk resumes from the checkpoint Train registered, PPO's policy from the same one, and the broker keeps
    the answered windows to replay, not the dead learner's requests (tests/test_broker.py)."""
    require_cifar()
    steps, every = 60, 20
    root = s3.uri("runs")
    run_dir = storage.location(root) / "akod"
    args = ["train", str(TUNE_CONFIGS / "tiny_akod.yaml"), *overrides(TINY, {
        "run.root": root, "run.name": "akod", "train.num_workers": 1, "train.cpus_per_worker": 1,
        "train.steps": steps, "train.log_every": 10, "train.ckpt_every": every, "train.sample_every": steps,
        "rl.segment_steps": 10, "rl.train_batch": 2, "rl.broker_timeout_s": 300})]
    start, _, _ = kill_and_rerun(akod_runs, args, bucket_env(s3), run_dir, steps, every)

    assert [r["step"] for r in interval_records(run_dir)] == list(range(10, steps + 1, 10))
    state = load_state(run_dir / f"checkpoint_{steps:08d}")
    assert state["step"] == steps and state["schedule_source"]["dko"]
    posted = read_jsonl(run_dir / "rl" / "posted.jsonl")
    assert posted and posted[-1]["step"] == steps
    assert read_jsonl(run_dir / "rl" / "iterations.jsonl")
    assert storage.is_file(run_dir / "rl" / "broker_state.pt") and storage.is_file(run_dir / "schedule.json")


SWEEP = {
    "run": {"num_cpus": 2, "dashboard": False},
    "diffusion": {"T": 100},
    "model": {"channels": [8, 8, 8, 8], "bottleneck_channels": 8, "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.0},
    "data": {"source": "procedural", "train_subset": 64, "val_size": 8},
    "train": {"batch_size": 8, "log_every": 4, "ckpt_every": 4, "sample_every": 8, "val_batch": 8, "ref_grid": 2,
              "cpus_per_worker": 1},
    "eval": {"sampler_steps": 4, "grid_size": 2, "fid_samples": 8},
    "sweep": {"name": "sw", "arms": ["baseline", "cosine"], "budget": 64, "max_concurrent_trials": 1},
}


class Payload:
    """Unpickling this creates ``marker``: proof that a resume ran code from an object in the bucket."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.timeout(900)
def test_a_sweep_in_a_bucket_resumes_and_never_runs_a_planted_payload(s3, tmp_path):
    import subprocess

    from ray_helpers import REPO

    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(SWEEP))
    cmd = akod_cmd("sweep", cfg_path, "--set", f"run.root={s3.uri('sweeps')}")
    env = bucket_env(s3)
    sweep_dir = storage.location(s3.uri("sweeps", "sw"))
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    kept, redo = sorted(e.path for e in storage.list_dir(sweep_dir / "runs"))  # baseline_s0-<id>, cosine_s0-<id>
    kept_metrics = storage.read_text(kept / "metrics.jsonl")

    # the cosine trial counts as unfinished again; every Tune file a restore would unpickle holds a payload
    storage.delete(redo / "summary.json")
    marker = tmp_path / "payload_ran"
    blob = pickle.dumps(Payload(marker))
    planted = [sweep_dir / "tuner.pkl", sweep_dir / "experiment_state-2099-01-01_00-00-00.json"]
    storage.write_bytes(planted[0], blob)
    storage.write_text(planted[1], json.dumps({"trial_data": [[{"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}, {}]],
                                               "runner_data": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}}))
    for e in storage.walk_files(sweep_dir):
        if e.path.name == "params.pkl":
            storage.write_bytes(e.path, blob)
            planted.append(e.path)
    assert len(planted) >= 4  # tuner.pkl, the experiment state, and both trials' params.pkl

    second = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert not marker.exists(), "a payload planted in the bucket ran on resume"
    assert storage.read_text(kept / "metrics.jsonl") == kept_metrics, "a finished trial was rerun"
    assert storage.is_file(redo / "summary.json")
    assert sorted(e.path for e in storage.list_dir(sweep_dir / "runs")) == [kept, redo]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(sweep_dir / "sweep_table.csv"))))
    assert sorted((r["arm"], r["step"]) for r in rows) == [("baseline", "8"), ("cosine", "8")]
    assert "cosine" in storage.read_text(sweep_dir / "report.md")
    assert f"report: {s3.uri('sweeps', 'sw')}/report.md" in second.stdout
