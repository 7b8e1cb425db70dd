"""End to end through a real local Ray: `akod train` with Ray Train workers on CIFAR-10 (issue 3).

Every test runs `python -m akod_ray train` as a subprocess that starts its own local Ray
on 2 CPUs (see ray_helpers), trains a U-Net of width 8-16 for a few dozen steps, and
checks the run folder: metrics.jsonl, checkpoints, sample grids, TensorBoard events.
The fault tests SIGKILL a Train worker (its PID from RUN/workers/rank0.pid) or the whole
driver process group, and check that the run resumes from its last checkpoint.
"""

from __future__ import annotations

import re

import pytest
import torch

from akod_ray.storage import MANIFEST, read_manifest
from akod_ray.training.checkpoint import STATE_FILE, load_state
from ray_helpers import (  # noqa: F401 - akod_runs is a fixture
    TINY,
    TUNE_CONFIGS,
    akod_runs,
    assert_one_clear_error,
    interval_records,
    kill_pid,
    overrides,
    pid_alive,
    read_pid,
    registered_checkpoints,
    require_cifar,
    run_akod,
    wait_for_registered_checkpoint,
    wait_until,
)

pytestmark = pytest.mark.slow

CONFIG = str(TUNE_CONFIGS / "tiny.yaml")
TWO_WORKERS = {"train.num_workers": 2, "train.cpus_per_worker": 1}
ONE_WORKER = {"train.num_workers": 1, "train.cpus_per_worker": 1}
RESUMED = re.compile(r"\[akod\] resumed from the checkpoint at step (\d+)")


@pytest.fixture(autouse=True)
def _cifar():
    require_cifar()


def train_args(root, name: str, *layers: dict) -> list[str]:
    return ["train", CONFIG, *overrides(TINY, {"run.root": str(root), "run.name": name}, *layers)]


def steps_of(run_dir) -> list[int]:
    return [r["step"] for r in interval_records(run_dir)]


def resumed_steps(output: str) -> list[int]:
    return [int(s) for s in RESUMED.findall(output)]


@pytest.mark.timeout(420)
def test_two_workers_train_a_unet_through_ray_train(tmp_path, akod_runs):
    run_dir = tmp_path / "e2e"
    run, rc = run_akod(akod_runs, train_args(tmp_path, "e2e", TWO_WORKERS, {
        "train.steps": 40, "train.log_every": 10, "train.ckpt_every": 20, "train.sample_every": 40}), 360)
    assert rc == 0, run.tail()
    assert re.search(r"\[akod\] run finished: \S+  \(step 40, ref_loss 0\.\d+\)", run.stdout), run.stdout[-2000:]

    # two workers really trained (DDP): two PIDs, both gone now
    pids = [read_pid(run_dir / "workers" / f"rank{r}.pid") for r in (0, 1)]
    assert None not in pids and pids[0] != pids[1]
    assert not any(pid_alive(p) for p in pids)

    records = interval_records(run_dir)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    ref = [r["ref_loss"] for r in records]
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
    assert ref[-1] < 0.8 * ref[0], f"reference loss did not fall: {ref}"

    # checkpoints: plain tensors and data, in safetensors (the tensors) and JSON (the rest)
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000020", "checkpoint_00000040"]
    # Ray Train uploads the folder file by file: its manifest (sizes, sha256) says when it is whole (akod_ray/storage.py)
    assert sorted(p.name for p in (run_dir / "checkpoint_00000040").iterdir()) == [MANIFEST, STATE_FILE]
    assert list(read_manifest(run_dir / "checkpoint_00000040")) == [STATE_FILE]
    state = load_state(run_dir / "checkpoint_00000040")
    assert state["step"] == 40
    assert state["data"] == {"epoch": 2, "offset": 128}  # 256 images / 16 per step = 16 steps an epoch
    assert state["config"]["train"]["num_workers"] == 2
    assert state["betas"].shape == (1000,)
    from akod_ray.training.checkpoint import load_for_sampling

    model, process, cfg = load_for_sampling(run_dir / "checkpoint_00000040")
    assert cfg.model.channels == (8, 8, 16, 16) and process.T == 1000

    # the EMA sample grid: 2 x 2 images of 32 px with 2 px padding
    from PIL import Image

    with Image.open(run_dir / "samples" / "grid_00000040.png") as im:
        assert im.format == "PNG" and im.size == (70, 70)

    # TensorBoard events with the logged scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("ref_loss")] == [10, 20, 30, 40]
    assert [round(e.value, 5) for e in acc.Scalars("ref_loss")] == [round(v, 5) for v in ref]


def check_resumed(resumed: list[int], ckpt_seen: int, before: list[dict], registered: list[int], every: int) -> int:
    """The run resumed once, from the latest checkpoint Ray Train had registered when the worker died
    (``before`` and ``registered``: the metrics and registered checkpoints right after the kill)."""
    logged_at_kill = before[-1]["step"]
    assert len(resumed) == 1, resumed
    start = resumed[0]
    assert max(ckpt_seen, registered[-1]) <= start <= logged_at_kill, (resumed, ckpt_seen, registered, logged_at_kill)
    # lost: the interval in progress, plus at most one checkpoint still queued for the controller (a
    # worker's next report blocks while one waits in Ray Train's queue of size 1)
    assert logged_at_kill - start <= 2 * every, (start, logged_at_kill)
    return start


@pytest.mark.timeout(540)
def test_a_killed_worker_is_replaced_and_the_run_resumes_from_its_checkpoint(tmp_path, akod_runs):
    run_dir = tmp_path / "wfault"
    steps, every = 40, 10
    run = akod_runs(train_args(tmp_path, "wfault", TWO_WORKERS, {
        "train.steps": steps, "train.log_every": 5, "train.ckpt_every": every, "train.sample_every": steps,
        "train.max_failures": 2}), "wfault")
    ckpt_seen, _, killed = wait_for_registered_checkpoint(run_dir, run, 300)
    kill_pid(killed, run)
    before = interval_records(run_dir)
    registered = registered_checkpoints(run_dir)

    rc = run.wait(420)
    out = run.stdout + run.stderr
    assert rc == 0, run.tail()
    assert "[FailurePolicy] RETRY" in out, "Ray Train did not report a restart"
    assert registered[-1] < steps
    start = check_resumed(resumed_steps(run.stdout), ckpt_seen, before, registered, every)
    new_pid = read_pid(run_dir / "workers" / "rank0.pid")
    assert new_pid is not None and new_pid != killed and not pid_alive(killed)
    # each logged step exactly once, in order, to the end (records after the resumed step were rewritten)
    after = interval_records(run_dir)
    assert [r["step"] for r in after] == list(range(5, steps + 1, 5))
    assert [r for r in after if r["step"] <= start] == [r for r in before if r["step"] <= start]
    state = load_state(run_dir / f"checkpoint_{steps:08d}")
    assert state["step"] == steps and state["data"] == {"epoch": 2, "offset": 128}  # 16 steps an epoch


@pytest.mark.timeout(540)
def test_after_the_driver_is_killed_rerunning_the_command_resumes_the_run(tmp_path, akod_runs):
    run_dir = tmp_path / "dfault"
    steps, every = 40, 10
    args = train_args(tmp_path, "dfault", ONE_WORKER, {
        "train.steps": steps, "train.log_every": 5, "train.ckpt_every": every, "train.sample_every": steps})
    first = akod_runs(args, "first")
    ckpt_seen, _, worker = wait_for_registered_checkpoint(run_dir, first, 300)
    first.kill_group()  # the driver and the local Ray it started, Train controller and worker included
    assert not first.group_alive()
    wait_until(lambda: not pid_alive(worker), 30, f"the worker {worker} to exit with its driver")
    before = interval_records(run_dir)
    registered = registered_checkpoints(run_dir)
    assert registered[-1] < steps

    second = akod_runs(args, "second")
    rc = second.wait(420)
    assert rc == 0, second.tail()
    start = check_resumed(resumed_steps(second.stdout), ckpt_seen, before, registered, every)
    assert start == registered[-1]  # the rerun's controller read the registered checkpoints from the run folder
    after = interval_records(run_dir)
    assert [r["step"] for r in after] == list(range(5, steps + 1, 5))
    # records up to the checkpoint are kept as they were; the first new one follows the checkpoint step
    kept = [r for r in after if r["step"] <= start]
    assert kept == [r for r in before if r["step"] <= start]
    first_new = next(r for r in after if r["step"] > start)
    assert first_new["step"] == start + 5
    assert first_new["wall_s"] > kept[-1]["wall_s"]  # wall time continues from the checkpoint's
    assert read_pid(run_dir / "workers" / "rank0.pid") != worker


@pytest.mark.timeout(300)
def test_a_nan_loss_stops_the_run_with_one_clear_error_and_keeps_the_last_checkpoint(tmp_path, akod_runs):
    run_dir = tmp_path / "nan"
    run, rc = run_akod(akod_runs, train_args(tmp_path, "nan", ONE_WORKER, {
        "train.steps": 6, "train.lr": 1e30, "train.grad_clip": 0, "train.warmup_steps": 0,
        "train.log_every": 1, "train.ckpt_every": 1, "train.sample_every": 100}), 240)
    assert rc == 2, run.tail()
    m = assert_one_clear_error(run.stderr, r"akod: error: training diverged: loss is (nan|inf) at step (\d+)")
    bad = int(m.group(2))
    assert 2 <= bad <= 6
    assert steps_of(run_dir)[-1] == bad - 1
    state = load_state(run_dir / f"checkpoint_{bad - 1:08d}")
    assert state["step"] == bad - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
