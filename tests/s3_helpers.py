"""A real S3 API server for the tests: moto's server mode (``python -m moto.server``), one HTTP process per
test session on a free port of 127.0.0.1, stopped by its own PID at the end (nothing else is signalled).

The tests reach it the way every AWS tool does: ``AWS_ENDPOINT_URL`` and the ``AWS_*`` credentials, set in
this process for one test (monkeypatch) and handed to child processes (``s3.env``: the `akod` CLI, `ray start`,
and so Ray's workers). Each test gets a bucket of its own.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "akod-test", "AWS_SECRET_ACCESS_KEY": "akod-test-secret",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
# Variables of the caller that would point the tests at another store or other credentials.
SCRUBBED = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    url: str
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> MotoServer:
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pyproject's test extra)")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start on {url}:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield MotoServer(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


@dataclass
class Bucket:
    """One test's bucket on the server; ``env``: the variables a child process needs to reach it."""

    name: str
    endpoint: str
    env: dict

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    def child_env(self, base: dict | None = None) -> dict:
        env = {k: v for k, v in (base if base is not None else os.environ).items() if k not in SCRUBBED}
        env.update(self.env)
        return env


@pytest.fixture
def s3(moto_server, monkeypatch) -> Bucket:
    """A fresh bucket, and this process's AWS variables pointing at the server for the test."""
    import pyarrow.fs as pafs

    for name in SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    env = {"AWS_ENDPOINT_URL": moto_server.url, **CREDENTIALS}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    name = f"akod-{secrets.token_hex(4)}"
    pafs.S3FileSystem(endpoint_override=moto_server.url.split("://")[1], scheme="http", region="us-east-1",
                      access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                      allow_bucket_creation=True).create_dir(name)
    return Bucket(name, moto_server.url, env)


def settled(read, pause: float = 1.0, timeout: float = 30.0):
    """``read()`` once two reads ``pause`` seconds apart agree. A PUT that a killed writer had sent still lands
    after the kill (the S3 server completes it), so the bucket's state is read when nothing changes it any more."""
    last, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(pause)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"the bucket still changed {timeout:.0f} s after the kill")
