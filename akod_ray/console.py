"""A console a person can read while Ray runs.

Ray forwards every line its processes print to the driver's stdout and stderr, prefixed with
the process (``(RayTrainWorker pid=123) ...``): worker group set-up, placement groups, and a
failing worker's whole traceback. :class:`RayConsole` keeps all of them, unchanged, in a log
file in the run (or sweep) folder and shows on the console only akod's own lines (``[akod]
step ...``), with the Ray prefix replaced by the trial's name (``(akod_k7_s0) [akod] step ...``)
in a sweep and dropped for a single run, and Ray Train's one-line restart decisions
(``[FailurePolicy] RETRY``). ``akod train|sweep --verbose`` shows everything.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, TextIO

from akod_ray import storage

# "(RayTrainWorker pid=12, ip=10.0.0.2) message", possibly wrapped in ANSI colour codes; Ray leaves out the ip of a
# process on the driver's own node
FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:(?P<name>[\w.:-]+) )?pid=(?P<pid>\d+)(?:, ip=(?P<ip>[^,)\s]+))?[^)]*\)"
                       r"(?:\x1b\[[0-9;]*m)* ?(?P<msg>.*)$", re.DOTALL)
RAY_PROCESS = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:raylet|gcs_server|autoscaler|monitor)[^)]*\)")
OWN_LINE = "[akod]"  # rank 0's progress, resume and fid_c10 lines (on the workers' stdout)
RESTART_LINE = "[FailurePolicy]"  # Ray Train's decision after a worker failure: RETRY is shown, RAISE only logged


class _Filter:
    """A text stream that passes the driver's own lines and sorts the lines Ray forwarded."""

    def __init__(self, console: "RayConsole", stream: TextIO, shows_own_lines: bool):
        self.console, self.stream, self.pending = console, stream, ""
        self.shows_own_lines = shows_own_lines

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            shown = self.console.route(line, self.shows_own_lines)
            if shown is not None:
                self.stream.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


class RayConsole:
    """Context manager: while active, sys.stdout and sys.stderr sort Ray's forwarded lines.

    ``log_path``: where every forwarded line goes (created at the first one). ``runs_dir``: a
    sweep's run folders, whose ``workers/rank<r>.pid`` and ``rank<r>.node`` files map a worker's
    (node, pid) to its trial: process ids repeat across nodes and containers, so a pid alone could
    credit a line to another trial; None for a single run (the prefix is dropped). ``local_node``:
    the driver's node, which Ray leaves out of its prefix (default: Ray's own answer)."""

    RESCAN_S = 5.0  # a pid is reused by a later trial on the same node: read the run folders again after this
    RESCAN_REMOTE_S = 10.0  # the same in an object store, where every listing is a request

    def __init__(self, log_path: Path, runs_dir: storage.StoragePath | None = None,
                 local_node: Callable[[], str | None] | None = None):
        self.log_path, self.runs_dir = Path(log_path), runs_dir
        self.local_node = local_node or _ray_node
        self.names: dict[tuple[str | None, str], str] = {}
        self.scanned = -math.inf
        self.log: TextIO | None = None
        self.forwarded = 0

    def __enter__(self) -> "RayConsole":
        self.saved = sys.stdout, sys.stderr
        # Ray Train echoes a worker's stdout on stderr too: akod's lines are shown from stdout only
        sys.stdout, sys.stderr = _Filter(self, sys.stdout, True), _Filter(self, sys.stderr, False)
        return self

    def __exit__(self, *exc) -> None:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Filter) and stream.pending:
                stream.write("\n")
        sys.stdout, sys.stderr = self.saved
        if self.log is not None:
            self.log.close()

    def route(self, line: str, show_own: bool = True) -> str | None:
        """The line to show for ``line`` (None: only logged)."""
        m = FORWARDED.match(line)
        if m is None and not RAY_PROCESS.match(line):
            return line  # the driver's own line
        self._keep(line)
        if m is None:
            return None
        msg = m.group("msg")
        if msg.startswith(RESTART_LINE):
            # RETRY is news (a worker group restarts); RAISE is followed by akod's own one-line error
            return None if "RAISE" in msg else msg
        if not show_own or not msg.startswith(OWN_LINE):
            return None
        name = self._trial(m.group("ip"), m.group("pid"))
        return f"({name}) {m.group('msg')}" if name else m.group("msg")

    def _keep(self, line: str) -> None:
        self.forwarded += 1
        try:
            if self.log is None:
                from akod_ray.config import make_dirs

                make_dirs(self.log_path.parent)
                self.log = self.log_path.open("a")
            self.log.write(line + "\n")
            self.log.flush()
        except OSError:
            pass  # the log is a convenience; never fail a run for it

    def _trial(self, ip: str | None, pid: str) -> str | None:
        """The trial of the worker (node, pid); a line without ``ip`` comes from the driver's node."""
        if self.runs_dir is None:
            return None
        node = ip or self.local_node()
        found = self.names.get((node, pid)) or self.names.get((None, pid))
        since = time.monotonic() - self.scanned
        if since > (self.RESCAN_REMOTE_S if storage.is_remote(self.runs_dir) else
                    (0.0 if found is None else self.RESCAN_S)):
            self._scan()
            found = self.names.get((node, pid)) or self.names.get((None, pid))
        return found

    def _scan(self) -> None:
        """(node, pid) -> trial name from every run folder's worker files; the newest file wins a (node, pid) that
        several name. A run folder without a node file (written before nodes were recorded) matches any node."""
        self.scanned = time.monotonic()
        found: dict[tuple[str | None, str], tuple[float, str]] = {}
        try:
            pid_files = _pid_files(self.runs_dir)
            folders = [e.path.name for e in storage.list_dir(self.runs_dir) if e.is_dir]
        except OSError:
            return  # a name is a convenience; never fail a run for it
        for path, mtime in pid_files:
            try:
                pid = storage.read_text(path).strip()
                node_file = path.with_name(path.name[:-len(".pid")] + ".node")
                node = storage.read_text(node_file).strip() if storage.exists(node_file) else None
            except OSError:
                continue
            if found.get((node, pid), (-math.inf,))[0] < mtime:
                found[(node, pid)] = (mtime, path.parent.parent.name)
        if not found:
            self.names = {}
            return
        # a trial is named by its point (akod_k7_s0), or by its whole folder where points repeat (a search's trials)
        points = Counter(_point(folder) for folder in folders)
        self.names = {key: _point(folder) if points[_point(folder)] == 1 else folder
                      for key, (_, folder) in found.items()}


def _pid_files(runs_dir) -> list[tuple[storage.StoragePath, float]]:
    """(path, mtime) of every ``<run>/workers/rank<r>.pid`` under a sweep's run folders."""
    if storage.is_remote(runs_dir):  # one LIST of the run folders and one of each workers/, not of every object
        return [(e.path, e.mtime or 0.0) for run in storage.list_dir(runs_dir) if run.is_dir
                for e in storage.list_dir(run.path / "workers") if re.fullmatch(r"rank\d+\.pid", e.path.name)]
    out = []
    for path in Path(runs_dir).glob("*/workers/rank*.pid"):
        try:
            out.append((path, path.stat().st_mtime))
        except OSError:
            continue
    return out


def _point(run_folder_name: str) -> str:
    return run_folder_name.rsplit("-", 1)[0]  # <point>-<run id>


def _ray_node() -> str | None:
    """The driver's node as Ray names it in a forwarded line's ``ip=`` (None before Ray started)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else None
