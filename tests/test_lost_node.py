"""A lost node, as on spot instances (issue 22, item 5): a sweep on a two-node Ray cluster, its run.root in a
bucket, loses the node its Train worker runs on mid-trial; the trial resumes from the last checkpoint in the
bucket on a node that joins afterwards, with nothing lost and nothing rerun from step 0.

The cluster is two `ray start`s on this machine, both bound to 127.0.0.1, each with its own temp dir, ports
and session (tests/ray_cluster.py): a head with no CPUs and the trial drivers' TRAIN_DRIVER resource (so the
Tune trial and the Train controller, which Ray Train places on the driver's node, live on the head), and a
worker node with the one CPU the Train worker needs (so the worker can only run there). Every process of the
worker node is SIGKILLed by PID (the raylet, its agents and its workers: the processes of that `ray start`'s
session and their descendants); a replacement node then brings the CPU back. Teardown kills by PID what the
test started, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from akod_ray import storage
from ray_cluster import OwnedRayProcesses, free_ports, start_time_now
from ray_helpers import REPO, akod_cmd, interval_records, read_pid, registered_checkpoints, wait_until
from s3_helpers import moto_server, s3, settled  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
RESUMED = re.compile(r"\[akod\] resumed from the checkpoint at step (\d+)")
STEPS, LOG_EVERY, CKPT_EVERY = 48, 4, 8
SWEEP = {
    "run": {"dashboard": False},
    "diffusion": {"T": 100},
    "model": {"channels": [8, 8, 8, 8], "bottleneck_channels": 8, "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.0},
    "data": {"source": "procedural", "train_subset": 64, "val_size": 8},
    "train": {"batch_size": 8, "log_every": LOG_EVERY, "ckpt_every": CKPT_EVERY, "sample_every": STEPS, "val_batch": 8,
              "ref_grid": 2, "num_workers": 1, "cpus_per_worker": 1, "max_failures": 5},
    "eval": {"sampler_steps": 4, "grid_size": 2, "fid_samples": 8},
    "sweep": {"name": "spot", "arms": ["baseline"], "budget": 8 * STEPS, "max_concurrent_trials": 1},
}


class Cluster:
    """`ray start` processes of one test: ``head(...)``, ``node(...)``; each node's processes killed by PID."""

    def __init__(self, env: dict, log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.nodes: dict[str, OwnedRayProcesses] = {}
        self.temp_dirs: list[str] = []
        self.gcs = None

    def _start(self, name: str, args: list[str]) -> OwnedRayProcesses:
        temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths max ~107 chars
        self.temp_dirs.append(temp_dir)
        metrics, agent_http, agent_grpc, env_agent, node_mgr, obj_mgr = free_ports(6)
        start_time = start_time_now()
        log = (self.log_dir / f"ray_start_{name}.log").open("w")
        proc = subprocess.Popen([RAY, "start", *args, "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                                 f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
                                 f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
                                 f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
                                 "--disable-usage-stats"],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        owned = OwnedRayProcesses(temp_dir, start_sid=proc.pid, start_time=start_time)
        self.nodes[name] = owned
        rc = proc.wait(180)
        owned.scan()
        assert rc == 0, f"`ray start` ({name}) failed:\n{(self.log_dir / f'ray_start_{name}.log').read_text()[-3000:]}"
        return owned

    def head(self, resources: dict) -> str:
        self.gcs, client = free_ports(2)
        self._start("head", ["--head", f"--port={self.gcs}", "--num-cpus=0", "--resources=" + json.dumps(resources),
                             "--include-dashboard=false", f"--ray-client-server-port={client}"])
        return f"127.0.0.1:{self.gcs}"

    def node(self, name: str, cpus: int) -> OwnedRayProcesses:
        return self._start(name, [f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={cpus}"])

    def kill_node(self, name: str) -> set[int]:
        """SIGKILL every process of one node at once, as a lost machine; returns the PIDs killed."""
        return self.nodes[name].sigkill()

    def close(self) -> dict[str, set[int]]:
        survivors = {name: owned.kill() for name, owned in reversed(self.nodes.items())}
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        return {k: v for k, v in survivors.items() if v}


@pytest.mark.timeout(900)
def test_a_sweep_resumes_its_trial_from_the_bucket_after_losing_its_worker_node(s3, tmp_path):
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = s3.child_env()
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    cluster = Cluster(env, tmp_path)
    sweep = None
    try:
        address = cluster.head({"TRAIN_DRIVER": 1})
        cluster.node("worker", cpus=1)
        cfg_path = tmp_path / "spot.yaml"
        cfg_path.write_text(yaml.safe_dump(SWEEP))
        out = (tmp_path / "sweep.out").open("w")
        sweep = subprocess.Popen(akod_cmd("sweep", cfg_path, "--set", f"run.root={s3.uri('sweeps')}",
                                          "--set", f"run.ray_address={address}"),
                                 cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        runs = storage.location(s3.uri("sweeps", "spot", "runs"))

        def trial_mid_run():
            folders = [e.path for e in storage.list_dir(runs) if e.is_dir]
            if sweep.poll() is not None:
                pytest.fail(f"the sweep ended before the node was lost:\n{(tmp_path / 'sweep.out').read_text()[-4000:]}")
            if len(folders) != 1:
                return None
            ckpts, logged = registered_checkpoints(folders[0]), [r["step"] for r in interval_records(folders[0])]
            pid = read_pid(folders[0] / "workers" / "rank0.pid")
            return (folders[0], ckpts[-1], pid) if ckpts and logged and logged[-1] > ckpts[-1] and pid else None

        run_dir, ckpt_seen, worker = wait_until(trial_mid_run, 400, "a checkpoint in the bucket, mid-trial", interval=0.5)

        killed = cluster.kill_node("worker")  # the node is lost: its raylet, agents and the Train worker
        # what the bucket holds once the lost node's last PUTs landed (older checkpoints are pruned later: num_to_keep)
        registered, before = settled(lambda: (registered_checkpoints(run_dir), interval_records(run_dir)))
        assert worker in killed, f"the Train worker {worker} did not run on the worker node ({sorted(killed)})"
        assert ckpt_seen < STEPS
        replacement = cluster.node("replacement", cpus=1)
        new_worker = wait_until(lambda: (pid := read_pid(run_dir / "workers" / "rank0.pid")) != worker and pid,
                                300, "a new Train worker", interval=0.5)
        assert new_worker in replacement.scan() | set(replacement.seen), "the resumed worker runs elsewhere"

        rc = sweep.wait(600)
        text = (tmp_path / "sweep.out").read_text()
        assert rc == 0, text[-5000:]
        resumed = [int(s) for s in RESUMED.findall(text)]
        # from the latest checkpoint registered when the node was lost
        assert resumed == [registered[-1]] and registered[-1] >= ckpt_seen, (resumed, registered, text[-4000:])
        start = resumed[0]
        assert 0 < start < STEPS  # resumed from a checkpoint in the bucket, not rerun from step 0

        after = interval_records(run_dir)
        assert [r["step"] for r in after] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        assert [r for r in after if r["step"] <= start] == [r for r in before if r["step"] <= start]
        assert next(r for r in after if r["step"] > start)["step"] == start + LOG_EVERY
        summary = json.loads(storage.read_text(run_dir / "summary.json"))
        assert summary["step"] == STEPS
        assert [e.path for e in storage.list_dir(runs) if e.is_dir] == [run_dir]  # one trial, one run folder
    finally:
        if sweep is not None and sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait(30)
        survivors = cluster.close()
        assert not survivors, f"Ray processes of the test cluster survived SIGKILL: {survivors}"
