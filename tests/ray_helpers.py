"""Helpers for the end-to-end tests: `akod` subprocesses with their own local Ray, run folders.

Each `akod train` runs as ``python -m akod_ray`` in a new session (its own process group),
so the local Ray it starts (GCS, raylet, Train controller and workers) shares its fate:
Ray's processes die with the driver on a normal exit, and :meth:`AkodRun.kill_group`
SIGKILLs the whole group for the driver-fault tests. Nothing here runs ``ray stop`` or
signals a process it did not start (or learn from a run's ``workers/rank<r>.pid``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
CIFAR_DIR = REPO.parent / "shared" / "data" / "cifar10"
TUNE_CONFIGS = REPO / "tune_configs"

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# a line Ray forwarded from one of its processes: "(RayTrainWorker pid=12, ip=...) ...", "(raylet) ..."
RAY_PREFIX = re.compile(r"^\((?:[\w.]+ )?pid=\d+[^)]*\)|^\((?:raylet|gcs_server|autoscaler|monitor)[^)]*\)")

# The smallest useful U-Net and CIFAR-10 subset; every Ray test starts from these.
TINY = {
    "run.dashboard": "false",
    "run.num_cpus": 2,
    "model.channels": "[8,8,16,16]",
    "model.bottleneck_channels": 16,
    "model.num_res_blocks": 1,
    "model.attention_resolutions": "[]",
    "model.dropout": 0.0,
    "data.train_subset": 256,
    "data.val_size": 16,
    "train.batch_size": 16,
    "train.lr": 0.002,
    "train.warmup_steps": 5,
    "train.ref_grid": 4,
    "eval.sampler_steps": 5,
    "eval.grid_size": 2,
    "eval.fid_samples": 16,  # the fid_c10 at the end of a run (when the classifier is shipped): keep it cheap
}


# The smallest config on procedural data (no files), as YAML sections: sweeps and searches of a few steps.
TINY_PROCEDURAL = {
    "run": {"num_cpus": 2, "dashboard": False},
    "diffusion": {"T": 100},
    "model": {"channels": [8, 8, 8, 8], "bottleneck_channels": 8, "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.0},
    "dko": {"bins": 4},
    "data": {"source": "procedural", "train_subset": 64, "val_size": 8},
    "train": {"batch_size": 8, "val_batch": 8, "ref_grid": 2, "cpus_per_worker": 1},
    "eval": {"sampler_steps": 4, "grid_size": 2, "fid_samples": 8},
}


def tiny_procedural(**sections: dict) -> dict:
    """:data:`TINY_PROCEDURAL` with ``sections`` merged into it, section by section."""
    return {name: {**TINY_PROCEDURAL.get(name, {}), **sections.get(name, {})}
            for name in {**TINY_PROCEDURAL, **sections}}


def require_cifar() -> Path:
    if not (CIFAR_DIR / "train.parquet").is_file() or not (CIFAR_DIR / "test.parquet").is_file():
        pytest.skip(f"CIFAR-10 Parquet copy not found at {CIFAR_DIR}")
    return CIFAR_DIR


def overrides(*layers: dict) -> list[str]:
    """``--set section.field=value`` arguments from dicts (later dicts win)."""
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    out: list[str] = []
    for key, value in merged.items():
        if isinstance(value, bool):
            value = str(value).lower()
        out += ["--set", f"{key}={value}"]
    return out


def akod_env(**extra: str) -> dict:
    """The environment of an `akod` subprocess: the repo's CIFAR-10 copy, never an outside Ray."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(AKOD_DATA_DIR=str(CIFAR_DIR), PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    env.update(extra)
    return env


def akod_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "akod_ray", *map(str, args)]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a half-written last line (the file is being appended) is skipped."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def interval_records(run_dir: Path) -> list[dict]:
    """The records metrics.jsonl gets every train.log_every steps (not the fid_c10 records beside them)."""
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def registered_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoints the Ray Train controller has registered (its snapshot file)."""
    path = Path(run_dir) / "checkpoint_manager_snapshot.json"
    try:
        snap = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return sorted(int(r["checkpoint_dir_name"].split("_")[1]) for r in snap.get("checkpoint_results", []))


def checkpoints_on_disk(run_dir: Path) -> list[int]:
    """Steps of the checkpoint folders with a state file in the run folder."""
    from akod_ray.training.checkpoint import CHECKPOINT_RE, state_file

    return sorted(int(p.name.split("_")[1]) for p in Path(run_dir).glob("checkpoint_*")
                  if CHECKPOINT_RE.match(p.name) and state_file(p))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def read_pid(path: Path) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def driver_lines(text: str) -> list[str]:
    """The lines the `akod` process printed itself (not forwarded by Ray from its actors), ANSI-free."""
    return [line for line in ANSI.sub("", text).splitlines() if not RAY_PREFIX.match(line)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in driver_lines(stderr) if line.startswith("akod: error:")]


def assert_one_clear_error(stderr: str, pattern: str) -> re.Match:
    """Exactly one ``akod: error:`` line, matching ``pattern``, and no traceback from the driver itself."""
    lines = error_lines(stderr)
    assert len(lines) == 1, f"expected one 'akod: error:' line, got {lines}\n--- stderr ---\n{stderr[-4000:]}"
    m = re.fullmatch(pattern, lines[0])
    assert m, f"{lines[0]!r} does not match {pattern!r}"
    own = driver_lines(stderr)
    assert not any("Traceback" in line for line in own), "the akod process printed a traceback:\n" + "\n".join(own[-60:])
    return m


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.2,
               run: "AkodRun | None" = None):
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` (with the run's output)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if run is not None and run.proc.poll() is not None and not run.relaunch_if_ray_failed_to_start():
            pytest.fail(f"the akod run exited ({run.proc.returncode}) before {what}\n{run.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{run.tail()}" if run else ""))
        time.sleep(interval)


# ray.init gives the raylet a fixed 30 s to register; on a machine shared with other jobs it
# sometimes needs longer. That is the machine, not the code under test: start once more.
RAY_START_FAILURES = ("The current node timed out during startup",)


class AkodRun:
    """One `akod` subprocess in its own session; stdout and stderr go to files in ``log_dir``."""

    def __init__(self, args: list[str], log_dir: Path, env: dict | None = None, relaunches: int = 1):
        self.args, self.log_dir, self.env = list(args), log_dir, env or akod_env()
        self.relaunches_left = relaunches
        self._launch(log_dir)

    def _launch(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(akod_cmd(*self.args), stdout=out, stderr=err, env=self.env, cwd=REPO,
                                         start_new_session=True)
        self.pgid = self.proc.pid  # the session leader's group
        self.started = time.monotonic()

    def relaunch_if_ray_failed_to_start(self) -> bool:
        """If the process exited because the local Ray did not come up in time, start it again (once)."""
        if self.proc.poll() is None or self.proc.returncode == 0 or self.relaunches_left <= 0:
            return False
        if not any(marker in self.stderr for marker in RAY_START_FAILURES):
            return False
        self.reap_group()
        self.relaunches_left -= 1
        print(f"[ray_helpers] the local Ray did not start in time; starting akod again\n{self.stderr[-1500:]}")
        self._launch(self.log_dir.with_name(self.log_dir.name + "_again"))
        return True

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return f"--- stdout ---\n{self.stdout[-n:]}\n--- stderr ---\n{self.stderr[-n:]}"

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                rc = self.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill_group()
                pytest.fail(f"akod did not finish within {timeout:.0f} s\n{self.tail()}")
            if not self.relaunch_if_ray_failed_to_start():
                break
        self.reap_group()
        return rc

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def kill_group(self, timeout: float = 60.0) -> None:
        """SIGKILL the driver and every process of its group (the local Ray it started), and wait for them."""
        if self.group_alive():
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)

    def reap_group(self, grace: float = 20.0) -> None:
        """After the driver exited: give its Ray processes ``grace`` seconds to exit, then SIGKILL the rest."""
        deadline = time.monotonic() + grace
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.group_alive():
            self.kill_group()

    def close(self) -> None:
        if self.proc.poll() is None or self.group_alive():
            self.kill_group()


@pytest.fixture
def akod_runs(tmp_path):
    """Start `akod` subprocesses: ``start(args, name)``; every one still running is killed at teardown."""
    started: list[AkodRun] = []

    def start(args: list[str], name: str = "run", env: dict | None = None) -> AkodRun:
        run = AkodRun(args, tmp_path / "logs" / f"{len(started):02d}_{name}", env)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


def run_akod(start, args: list[str], timeout: float, name: str = "run") -> tuple[AkodRun, int]:
    run = start(args, name)
    return run, run.wait(timeout)


def wait_for_registered_checkpoint(run_dir: Path, run: AkodRun, timeout: float,
                                   mid: Callable[[int], bool] = lambda step: True,
                                   beyond: int = 0) -> tuple[int, int, int]:
    """Wait until the Train controller registered a checkpoint and rank 0 logged a step more than
    ``beyond`` steps later, for which ``mid`` holds.

    Returns (latest registered checkpoint step, last logged step, rank 0's worker PID).
    A checkpoint counts once registered: the controller takes a worker's report from its
    queue of size 1 at its next poll (every 2 s), and a restarted group gets the latest
    checkpoint the controller registered; one still queued on a killed worker is lost. As a
    worker's next report blocks while its previous one waits in the queue, at the first
    registration the worker is at most two checkpoint intervals further.
    """
    def ready():
        ckpts = registered_checkpoints(run_dir)
        logged = [r["step"] for r in interval_records(run_dir)]
        pid = read_pid(Path(run_dir) / "workers" / "rank0.pid")
        if ckpts and logged and pid and ckpts[-1] + beyond < logged[-1] and mid(logged[-1]) and pid_alive(pid):
            return ckpts[-1], logged[-1], pid
        return None

    return wait_until(ready, timeout, "a registered checkpoint followed by a logged step", interval=0.05, run=run)


def check_ray_worker(pid: int, run: AkodRun) -> None:
    """Refuse to signal anything but a live Ray worker that is not this process or the driver."""
    assert pid not in (os.getpid(), run.proc.pid), pid
    assert pid_alive(pid), f"worker {pid} is not running"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    assert "ray" in cmdline.lower(), f"PID {pid} is not a Ray worker: {cmdline!r}"


def kill_pid(pid: int, run: AkodRun, timeout: float = 30) -> None:
    check_ray_worker(pid, run)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), timeout, f"worker {pid} to die")


class FakeRank0(threading.Thread):
    """Rank 0 of the workers without training: posts a window's decision slots (seeded log sigma_local-like
    features), takes each window's decisions from the broker and posts one reward per decision,
    ``rewards(decisions, slots, step)``, at once, stepping by 10 per window."""

    def __init__(self, handle, rewards, slots: int = 8, seed: int = 0):
        super().__init__(daemon=True)
        import numpy as np

        from akod_ray.rl.broker import BrokerClient

        self.client = BrokerClient(handle, timeout_s=30.0)
        self.rewards, self.n = rewards, slots
        self.rng = np.random.default_rng(seed)
        self.posted: list[list[float]] = []
        self.requests: list[dict] = []

    def _slots(self) -> list[float]:
        return self.rng.uniform(-3.0, -1.0, self.n).tolist()

    def run(self):
        from akod_ray.rl.broker import BrokerClosedError

        slots, step = self._slots(), 0
        try:
            self.client.post_state({"kind": "state", "step": 0, "slots": slots,
                                    "context": {"progress": 0.0, "probe_loss": 0.5}})
        except BrokerClosedError:
            return
        first = True
        while True:
            try:
                req = self.client.next_request(0.5, resume=first)
            except BrokerClosedError:
                return
            first = False
            if req is None:
                continue
            rid, request = req
            self.requests.append(request)
            step += 10
            rewards = [float(r) for r in self.rewards(request["decisions"], slots, step)]
            self.posted.append(rewards)
            slots = self._slots()
            self.client.post_result(rid, {"kind": "trunk", "step": step, "rewards": rewards, "slots": slots,
                                          "context": {"progress": step / 1000, "probe_loss": 0.5}})
