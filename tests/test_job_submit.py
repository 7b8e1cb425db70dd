"""`ray job submit` against a real local Ray head with token authentication (docs/cluster.md, step 5).

A module-scoped fixture starts a head the way the cluster configs do (`ray start --head`,
dashboard and jobs API on 127.0.0.1, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH pointing at a
token file), but with free ports, its own short temp dir, and a token written to a temp
file (the user's ~/.ray/auth_token is never read or written). `ray start --head` daemonizes,
so the fixture records the processes it started (by the temp dir in their command line, by
the session of the `ray start` process, and their descendants: workers, the job supervisor,
the job's driver) and kills exactly those at teardown, SIGTERM then SIGKILL. It never runs
`ray stop`, which would stop every Ray on the machine.

* test_jobs_api_refuses_requests_without_token: the CLI with no token or a wrong token, and
  plain HTTP without or with a wrong bearer token, are refused, and no job gets created.
* test_job_submit_runs_sweep: the README's cluster command on the local head: `--working-dir .`
  upload (checked: no .venv, .git or runs/ in it), the job's driver imports the uploaded
  copy of akod_ray, and a small smoke sweep (2 arms) finishes with its table and report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ray_cluster import OwnedRayProcesses, free_ports, proc_table, signal_pid, start_time_now

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# Environment variables of the caller that would change which cluster or token is used.
SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAY_OVERRIDE_JOB_RUNTIME_ENV", "PYTHONPATH")
# What the working_dir upload must never contain (.gitignore covers .venv and runs; the test
# passes these as runtime_env excludes as well, the way docs/cluster.md recommends).
UPLOAD_EXCLUDES = [".git", ".venv", "runs", "*.egg-info", "__pycache__", ".pytest_cache"]

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- the head


def _base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _http(url: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths max ~107 chars
    token = secrets.token_hex(32)
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(9)
    env = _base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    cmd = [RAY, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--num-cpus=2", "--resources=" + json.dumps({"TRAIN_DRIVER": 8}), f"--temp-dir={temp_dir}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--disable-usage-stats"]
    start_time = start_time_now()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    owned = OwnedRayProcesses(temp_dir, start_sid=proc.pid, start_time=start_time)
    address = f"http://127.0.0.1:{dash}"
    try:
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            signal_pid(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"`ray start --head` did not return in 180 s:\n{out[-3000:]}")
        owned.scan()
        assert proc.returncode == 0, f"`ray start --head` failed ({proc.returncode}):\n{out[-3000:]}"
        # `ray start` returns before the dashboard's HTTP server (and the job module) is up.
        deadline = time.monotonic() + 120
        status, body = 0, ""
        while time.monotonic() < deadline:
            try:
                status, body = _http(f"{address}/api/jobs/", token)
                if status == 200:
                    break
            except OSError as e:
                body = repr(e)
            time.sleep(1.0)
        assert status == 200, f"jobs API at {address} not ready: {status} {body[:500]}"
        owned.scan()
        yield {"address": address, "temp_dir": temp_dir, "token": token, "token_path": str(token_path),
               "env": env, "gcs_port": gcs}
    finally:
        survivors = owned.kill()
        if survivors:
            table = proc_table()
            left = {pid: table.get(pid, {}).get("cmd", "?")[:200] for pid in survivors}
            pytest.fail(f"Ray processes of the test head survived SIGKILL: {left}")
        shutil.rmtree(temp_dir, ignore_errors=True)  # session logs, sockets, unpacked working_dirs


def _ray_cli(args: list[str], env: dict[str, str], timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _job_ids(head) -> list[str]:
    status, body = _http(f"{head['address']}/api/jobs/", head["token"])
    assert status == 200, (status, body[:500])
    return sorted(j.get("submission_id") or j.get("job_id") for j in json.loads(body))


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(600, method="signal")  # signal: the fixture's teardown still runs
def test_jobs_api_refuses_requests_without_token(ray_head, tmp_path):
    head = ray_head
    address = head["address"]
    before = _job_ids(head)

    # Plain HTTP: no token -> 401, wrong token -> 403, the cluster's token -> 200.
    status, body = _http(f"{address}/api/jobs/")
    assert status == 401, (status, body[:300])
    assert "Missing authentication token" in body
    status, body = _http(f"{address}/api/jobs/", token="0" * 64)
    assert status == 403, (status, body[:300])
    assert "Invalid authentication token" in body
    assert _http(f"{address}/api/jobs/", head["token"])[0] == 200

    empty_home = tmp_path / "home"
    empty_home.mkdir()
    wrong_token = tmp_path / "wrong_token"
    wrong_token.write_text(secrets.token_hex(32))
    # name -> (client environment, what the refusal says). The first two are refused by the
    # client before any request; the last two by the server (401, 403).
    clients = {
        "token file missing": (_base_env(RAY_AUTH_MODE="token", HOME=str(empty_home),
                                         RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing_token")),
                               "RAY_AUTH_TOKEN_PATH is set but file cannot be opened"),
        "no token anywhere": (_base_env(RAY_AUTH_MODE="token", HOME=str(empty_home)),
                              "couldn't find an authentication token"),
        "no auth mode, no token": (_base_env(HOME=str(empty_home)), "Missing authentication token"),
        "wrong token": (_base_env(RAY_AUTH_MODE="token", HOME=str(empty_home), RAY_AUTH_TOKEN_PATH=str(wrong_token)),
                        "Invalid authentication token"),
    }
    for name, (env, expected) in clients.items():
        listed = _ray_cli(["job", "list", "--address", address], env)
        out = listed.stdout + listed.stderr
        assert listed.returncode != 0, f"{name}: `ray job list` succeeded:\n{out[-2000:]}"
        assert expected in out, f"{name}: expected {expected!r} in:\n{out[-2000:]}"
        submitted = _ray_cli(["job", "submit", "--address", address, "--no-wait",
                              "--submission-id", f"refused-{secrets.token_hex(4)}", "--",
                              "python", "-c", "print('should never run')"], env)
        out = submitted.stdout + submitted.stderr
        assert submitted.returncode != 0, f"{name}: `ray job submit` succeeded:\n{out[-2000:]}"
        assert expected in out, f"{name}: expected {expected!r} in:\n{out[-2000:]}"
    assert _job_ids(head) == before, "a job was created without a valid token"

    # The same CLI with the cluster's token works (the refusals above are about the token).
    ok = _ray_cli(["job", "list", "--address", address], head["env"])
    assert ok.returncode == 0, ok.stdout + ok.stderr


def _submit_and_wait(head, job_id: str, entrypoint: list[str], runtime_env: dict, timeout_s: float) -> tuple[str, str, float]:
    """`ray job submit --no-wait` from the repo root, then poll the job until it ends; (status, logs, seconds)."""
    address = head["address"]
    t0 = time.monotonic()
    submitted = _ray_cli(["job", "submit", "--address", address, "--working-dir", ".",
                          "--runtime-env-json", json.dumps(runtime_env), "--submission-id", job_id,
                          "--no-wait", "--", *entrypoint], head["env"], timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    status = None
    while time.monotonic() < t0 + timeout_s:
        code, body = _http(f"{address}/api/jobs/{job_id}", head["token"])
        assert code == 200, (code, body[:500])
        status = json.loads(body)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(5)
    elapsed = time.monotonic() - t0
    logs = _ray_cli(["job", "logs", "--address", address, job_id], head["env"])
    return status, logs.stdout + logs.stderr, elapsed


@pytest.mark.timeout(1500, method="signal")
def test_job_submit_runs_sweep(ray_head, cifar_dir, tmp_path):
    head = ray_head
    address = head["address"]
    runtime_env = {"env_vars": {"AKOD_DATA_DIR": str(cifar_dir.resolve())}, "excludes": UPLOAD_EXCLUDES}

    # 1. A probe job with the same working_dir: the driver runs in the unpacked upload, imports
    # that copy of akod_ray (not the editable install in .venv), and finds the `akod` command.
    # The probe is a script outside the working_dir, so that, as for the `akod` console script,
    # sys.path[0] is not the job's cwd: only PYTHONPATH can put the upload first.
    probe = tmp_path / "probe.py"
    probe.write_text("import os, shutil, sys\n"
                     "import akod_ray\n"
                     "print('PROBE_AKOD_RAY', akod_ray.__file__)\n"
                     "print('PROBE_AKOD_BIN', shutil.which('akod'))\n"
                     "print('PROBE_CWD', os.getcwd())\n"
                     "print('PROBE_DATA', os.environ.get('AKOD_DATA_DIR'))\n")
    status, log_text, elapsed = _submit_and_wait(head, f"probe-{secrets.token_hex(4)}", ["python", str(probe)],
                                                 runtime_env, timeout_s=300)
    assert status == "SUCCEEDED", f"probe job: {status} after {elapsed:.0f} s:\n{log_text[-4000:]}"
    probe_lines = dict(line.split(" ", 1) for line in log_text.splitlines() if line.startswith("PROBE_"))
    pkg_dir = Path(probe_lines["PROBE_CWD"])
    assert pkg_dir.is_relative_to(head["temp_dir"]) and "working_dir_files" in str(pkg_dir), probe_lines
    assert Path(probe_lines["PROBE_AKOD_RAY"]).is_relative_to(pkg_dir), probe_lines
    assert probe_lines["PROBE_AKOD_BIN"] not in ("None", ""), probe_lines
    assert probe_lines["PROBE_DATA"] == str(cifar_dir.resolve()), probe_lines
    # What was uploaded: the project, and nothing of .venv, .git or runs/.
    assert (pkg_dir / "akod_ray" / "cli.py").is_file() and (pkg_dir / "tune_configs" / "smoke.yaml").is_file()
    for name in (".venv", ".git", "runs"):
        assert not (pkg_dir / name).exists(), f"{name} was uploaded with the working_dir"
    size = sum(p.stat().st_size for p in pkg_dir.rglob("*") if p.is_file())
    assert size < 50 * 1024**2, f"working_dir upload is {size / 1024**2:.0f} MiB"
    print(f"\nprobe job SUCCEEDED in {elapsed:.0f} s; working_dir upload {size / 1024**2:.1f} MiB")

    # 2. The sweep, the way docs/cluster.md submits it (2 arms, 50 steps each).
    run_root = tmp_path / "runs"
    job_id = f"akod-sweep-{secrets.token_hex(4)}"
    sweep = ["akod", "sweep", "tune_configs/smoke.yaml", "--set", f"run.root={run_root}",
             "--set", "sweep.arms=[cosine,akod]", "--set", "sweep.budget=1600", "--set", "run.dashboard=false"]
    status, log_text, elapsed = _submit_and_wait(head, job_id, sweep, runtime_env, timeout_s=1200)
    assert status == "SUCCEEDED", f"job {job_id}: {status} after {elapsed:.0f} s:\n{log_text[-6000:]}"
    st = _ray_cli(["job", "status", "--address", address, job_id], head["env"])  # the CLI, with the token, agrees
    assert st.returncode == 0 and "succeeded" in (st.stdout + st.stderr).lower(), st.stdout + st.stderr
    print(f"sweep job {job_id} SUCCEEDED in {elapsed:.0f} s (submit to final status)")

    # The sweep's results, written by the job's driver under run.root.
    sweep_dir = run_root / "smoke"
    assert (sweep_dir / "report.md").is_file(), sorted(p.name for p in sweep_dir.iterdir())
    with (sweep_dir / "sweep_table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["arm"] for r in rows) == ["akod", "cosine"], rows
    for r in rows:
        assert math.isfinite(float(r["ref_loss"])), r
        assert int(r["step"]) == 1600 // 32, r
    metrics = sorted((sweep_dir / "runs").glob("*/metrics.jsonl"))
    assert len(metrics) == 2, metrics
