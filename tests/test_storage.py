"""The storage layer (akod_ray/storage.py) against a local folder and a real S3 API server (moto's server mode,
over HTTP, through pyarrow's S3 client), and the rules a bucket run depends on: whole objects, checkpoints that
exist only with their manifest (a killed writer leaves none), data read from a bucket, nothing unpickled, and
one clear line for an endpoint or bucket that cannot be used.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from akod_ray import storage
from akod_ray.config import ConfigError, load_config
from akod_ray.errors import CheckpointError, DataError
from akod_ray.storage import ObjectPath, StorageError
from akod_ray.training.checkpoint import (checkpoint_dir_name, latest_checkpoint, load_state, resolve_checkpoint,
                                          write_checkpoint)
from checkpoint_helpers import checkpoint_state, tiny_config
from ray_helpers import REPO, assert_one_clear_error, akod_cmd
from s3_helpers import free_port, moto_server, s3  # noqa: F401  (fixtures)

# --------------------------------------------------------------------------- paths and config (no server)


def test_object_paths_behave_as_pure_paths():
    p = ObjectPath("s3://bucket//runs/akod/")
    assert str(p) == "s3://bucket/runs/akod" and p.bucket == "bucket" and p.key == "bucket/runs/akod"
    q = p / "checkpoint_00000004" / "state.safetensors"
    assert q.name == "state.safetensors" and q.suffix == ".safetensors" and q.parent.parent == p
    assert str(q.relative_to(p)) == "checkpoint_00000004/state.safetensors"
    assert q.with_name("manifest.json") == p / "checkpoint_00000004/manifest.json"
    assert storage.location("gs://b/x") == ObjectPath("gs://b/x") and storage.location("runs") == Path("runs")
    with pytest.raises(TypeError):  # never a local folder named "s3:"
        Path(q)
    for bad in ("s3://", "s3://b/../x", "s3://b/x?endpoint_override=h", "ftp://b/x"):
        with pytest.raises(StorageError):
            ObjectPath(bad)


def test_run_root_takes_a_bucket_and_refuses_other_uris(tmp_path):
    cfg = load_config(None, ["run.root=s3://bucket/akod", "run.name=r1", "sweep.name=sw"])
    assert cfg.run_dir == ObjectPath("s3://bucket/akod/r1") and cfg.sweep_dir == ObjectPath("s3://bucket/akod/sw")
    assert load_config(None, [f"run.root={tmp_path}"]).run_dir == tmp_path / "akod"
    with pytest.raises(ConfigError, match=r"^run.root must be a folder path .* or an s3:// or gs:// URI, got 'http"):
        load_config(None, ["run.root=http://host/akod"])
    with pytest.raises(ConfigError, match=r"^run.root 's3://' names no bucket$"):
        load_config(None, ["run.root=s3://"])


def test_the_endpoint_comes_from_the_aws_variables(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9/")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    opts = storage._s3_options()
    assert (opts["scheme"], opts["endpoint_override"], opts["region"]) == ("http", "127.0.0.1:9", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example:9000")
    assert storage._s3_options()["endpoint_override"] == "minio.example:9000"
    assert storage.ray_storage("s3://b/akod")["storage_path"] == "b/akod"


# --------------------------------------------------------------------------- the same calls on both kinds


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return tmp_path / "root"
    bucket = request.getfixturevalue("s3")
    return storage.location(bucket.uri("root"))


def test_files_round_trip_on_a_folder_and_a_bucket(root):
    f = root / "a" / "b.txt"
    assert not storage.exists(f) and storage.list_dir(root) == []
    storage.write_text(f, "hello")
    assert storage.read_text(f) == "hello" and storage.is_file(f) and storage.is_dir(root / "a")
    assert storage.size(f) == 5 and storage.size(root / "missing") is None
    storage.write_bytes(f, b"again")  # published whole over the old content
    assert storage.read_bytes(f) == b"again"
    for i in range(3):
        storage.append_jsonl(root / "log.jsonl", {"i": i})
    assert [json.loads(x)["i"] for x in storage.read_text(root / "log.jsonl").splitlines()] == [0, 1, 2]
    assert [e.path.name for e in storage.list_dir(root)] == ["a", "log.jsonl"]
    assert [e.path.name for e in storage.walk_files(root)] == ["b.txt", "log.jsonl"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(root / "missing")
    storage.delete_tree(root / "a")
    assert not storage.exists(f)
    if isinstance(root, Path):  # nothing left under a temporary name
        assert sorted(p.name for p in root.iterdir()) == ["log.jsonl"]


def test_a_checkpoint_published_to_a_bucket_loads_and_is_found(s3, tmp_path):
    run = storage.location(s3.uri("runs", "r"))
    cfg = tiny_config(tmp_path)
    for step in (2, 4):
        staging = tmp_path / f"stage{step}"
        staging.mkdir()
        write_checkpoint(staging, checkpoint_state(cfg, step))
        storage.publish_folder(staging, run / checkpoint_dir_name(step))
    assert sorted(storage.read_manifest(run / checkpoint_dir_name(4))) == ["state.safetensors"]
    assert latest_checkpoint(run) == run / "checkpoint_00000004" == resolve_checkpoint(str(run))
    assert load_state(resolve_checkpoint(str(run)))["step"] == 4


# --------------------------------------------------------------------------- torn uploads


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from akod_ray import storage
    from akod_ray.training import checkpoint
    from checkpoint_helpers import checkpoint_state, tiny_config

    run, step, stage = storage.location(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    real = storage.write_manifest

    def stalled_manifest(folder):  # the checkpoint's state is written; hang before its manifest
        print("state written", flush=True)
        time.sleep(600)

    if sys.argv[4] == "before-manifest":
        storage.write_manifest = stalled_manifest
        checkpoint.write_checkpoint(stage, checkpoint_state(tiny_config(stage), step))
    else:  # publishing: the state file uploaded, then killed before the manifest goes up
        checkpoint.write_checkpoint(stage, checkpoint_state(tiny_config(stage), step))
        real_upload = storage.upload_file
        def upload(f, dest):
            if f.name == storage.MANIFEST:
                print("state written", flush=True)
                time.sleep(600)
            return real_upload(f, dest)
        storage.upload_file = upload
        storage.publish_folder(stage, run / checkpoint.checkpoint_dir_name(step))
""")

BIG_WRITER = textwrap.dedent("""
    import sys, time
    from akod_ray import storage
    p = storage.location(sys.argv[1])
    fs = storage.filesystem(p.scheme)
    with fs.open_output_stream(p.key) as f:  # a multipart upload: 5 MiB parts, then stalled mid-object
        for i in range(3):
            f.write(b"x" * (6 << 20))
            f.flush()
        print("parts uploaded", flush=True)
        time.sleep(600)
""")


def _killed_writer(script: str, args: list[str], s3, tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO / "tests", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=s3.child_env(), start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() in ("state written", "parts uploaded"), proc.stderr.read()
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def test_a_writer_killed_before_the_manifest_leaves_no_checkpoint(s3, tmp_path):
    run = storage.location(s3.uri("runs", "r"))
    cfg = tiny_config(tmp_path)
    good = tmp_path / "good"
    good.mkdir()
    write_checkpoint(good, checkpoint_state(cfg, 2))
    storage.publish_folder(good, run / checkpoint_dir_name(2))
    stage = tmp_path / "stage"
    stage.mkdir()
    _killed_writer(WRITER, [str(run), "6", str(stage), "publishing"], s3, tmp_path)
    torn = run / checkpoint_dir_name(6)
    assert storage.is_file(torn / "state.safetensors") and not storage.exists(torn / storage.MANIFEST)
    assert latest_checkpoint(run) == run / checkpoint_dir_name(2)  # the torn one does not exist
    with pytest.raises(CheckpointError, match=r"has no manifest\.json beside it: its upload did not finish"):
        load_state(torn)
    # a state file whose content does not match its manifest (a part lost, a file replaced) is never loaded
    storage.upload_file(good / storage.MANIFEST, torn / storage.MANIFEST)
    storage.write_bytes(torn / "state.safetensors", storage.read_bytes(torn / "state.safetensors")[:-10])
    assert latest_checkpoint(run) == run / checkpoint_dir_name(2)
    with pytest.raises(CheckpointError, match=r"is corrupt or truncated: it holds .* bytes, its folder's manifest"):
        load_state(torn)


def test_an_object_killed_mid_upload_does_not_exist(s3, tmp_path):
    target = s3.uri("big.bin")
    _killed_writer(BIG_WRITER, [target], s3, tmp_path)
    assert not storage.exists(target)


# --------------------------------------------------------------------------- data, payloads, errors


def test_training_data_loads_from_a_bucket(s3, cifar_dir, monkeypatch):
    from akod_ray.data.parquet import load_images, resolve_data_dir
    from akod_ray.training.trainer import check_parquet_files

    for split in ("train", "test"):
        storage.upload_file(cifar_dir / f"{split}.parquet", s3.uri("cifar10", f"{split}.parquet"))
    monkeypatch.setenv("AKOD_DATA_DIR", s3.uri("cifar10"))
    folder = resolve_data_dir()
    assert folder == ObjectPath(s3.uri("cifar10"))
    check_parquet_files(folder)
    assert torch.equal(load_images(folder, "test", count=32, seed=3), load_images(cifar_dir, "test", count=32, seed=3))
    monkeypatch.setenv("AKOD_DATA_DIR", s3.uri("nothing"))
    with pytest.raises(DataError, match=r"has no train\.parquet"):
        resolve_data_dir()


class Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_payload_in_the_bucket_never_runs(s3, tmp_path):
    from akod_ray.rl.driver import load_broker_state, read_jsonl

    marker = tmp_path / "payload_ran"
    run = storage.location(s3.uri("runs", "r"))
    cfg = tiny_config(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    import io

    buf = io.BytesIO()
    torch.save(dict(checkpoint_state(cfg, 4), extra=Payload(marker)), buf)
    (stage / "state.pt").write_bytes(buf.getvalue())  # an earlier version's name, with a whole manifest
    storage.write_manifest(stage)
    storage.publish_folder(stage, run / checkpoint_dir_name(4))
    storage.write_bytes(run / "rl" / "broker_state.pt", pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(CheckpointError, match=r"holds Python objects other than tensors and plain data"):
        load_state(latest_checkpoint(run))
    with pytest.raises(CheckpointError, match=r"^broker state 's3://.*/rl/broker_state\.pt' is not plain data"):
        load_broker_state(run / "rl" / "broker_state.pt")
    assert read_jsonl(run / "rl" / "iterations.jsonl") == []
    assert not marker.exists()


def _akod(args, env, timeout=120):
    return subprocess.run(akod_cmd(*args), capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_an_unreachable_endpoint_or_a_missing_bucket_is_one_line_exit_2(s3, tmp_path):
    tiny = ["--set", "data.source=procedural", "--set", "run.num_cpus=1", "--set", "train.steps=2"]
    missing = _akod(["train", *tiny, "--set", "run.root=s3://no-such-bucket/akod"], s3.child_env())
    assert missing.returncode == 2, missing.stderr
    assert_one_clear_error(missing.stderr, r"akod: error: run folder \(run\.root/run\.name\) 's3://no-such-bucket/akod/akod': "
                                           r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+")
    env = s3.child_env()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    refused = _akod(["sweep", *tiny, "--set", f"run.root={s3.uri('akod')}"], env)
    assert refused.returncode == 2, refused.stderr
    assert_one_clear_error(refused.stderr, r"akod: error: sweep folder \(run\.root/sweep\.name\) 's3://akod-\w+/akod/sweep': "
                                           r"cannot use the object store at http://127\.0\.0\.1:\d+: .*")
    assert time.monotonic() - t0 < 60
    data = _akod(["train", "--set", "run.num_cpus=1", "--set", f"run.root={tmp_path}"],
                 dict(env, AKOD_DATA_DIR="s3://somewhere/cifar10"))
    assert data.returncode == 2, data.stderr
    assert_one_clear_error(data.stderr, r"akod: error: data folder \(from AKOD_DATA_DIR\) 's3://somewhere/cifar10': "
                                        r"cannot use the object store at .*")


def test_the_console_names_a_workers_lines_from_a_sweep_in_a_bucket(s3, capsys):
    """A sweep in a bucket: the console finds each trial's worker files (rank0.pid, rank0.node) by listing the run
    folders and their workers/ (not every object of the sweep) and credits a line by node and pid."""
    from akod_ray.console import RayConsole, _pid_files

    runs = storage.location(s3.uri("sweep", "runs"))
    for folder, node in (("baseline_s0-aaaa1111", "10.0.0.1"), ("cosine_s0-bbbb2222", "10.0.0.2")):
        storage.write_text(runs / folder / "workers" / "rank0.pid", "4242")
        storage.write_text(runs / folder / "workers" / "rank0.node", node)
        storage.write_text(runs / folder / "checkpoint_00000004" / "rank0.pid", "4242")  # no worker file
    assert sorted(str(p) for p, _ in _pid_files(runs)) == [
        str(runs / f / "workers" / "rank0.pid") for f in ("baseline_s0-aaaa1111", "cosine_s0-bbbb2222")]
    with RayConsole(Path(storage.local_folder(runs)) / "ray.log", runs, local_node=lambda: "10.0.0.1"):
        print("(RayTrainWorker pid=4242) [akod] step 2/8 loss 0.5")
        print("(RayTrainWorker pid=4242, ip=10.0.0.2) [akod] step 4/8 loss 0.4")
    assert capsys.readouterr().out.splitlines() == ["(baseline_s0) [akod] step 2/8 loss 0.5",
                                                    "(cosine_s0) [akod] step 4/8 loss 0.4"]
