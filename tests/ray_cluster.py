"""Processes of a Ray that a test started with `ray start` (a head, or a worker node), found without psutil and
killed by PID: the `ray start` process runs in a session of its own, and what it starts (GCS, raylet, agents,
and the raylet's workers) keeps that session or descends from it. Nothing here runs `ray stop`, which would stop
every Ray on the machine, or signals a process by name.
"""

from __future__ import annotations

import os
import signal
import socket
import time


def proc_table() -> dict[int, dict]:
    """pid -> {ppid, sid, start, cmd} for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
        table[pid] = {"ppid": int(fields[1]), "sid": int(fields[3]), "start": int(fields[19]), "cmd": cmd,
                      "zombie": fields[0] == "Z"}
    return table


def descendants(table: dict[int, dict], roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info["ppid"], []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


class OwnedRayProcesses:
    """The processes of one `ray start` (``--head`` or a worker node), found without psutil and killed by PID."""

    def __init__(self, temp_dir: str, start_sid: int, start_time: int):
        self.temp_dir = temp_dir
        self.start_sid = start_sid  # the `ray start` process ran in its own session
        self.start_time = start_time
        self.seen: dict[int, int] = {}  # pid -> start time, every process ever recorded

    def scan(self) -> set[int]:
        table = proc_table()
        me = os.getpid()
        roots = {pid for pid, p in table.items()
                 if p["start"] >= self.start_time
                 and (self.temp_dir in p["cmd"] or p["sid"] == self.start_sid
                      or self.seen.get(pid) == p["start"])}
        owned = descendants(table, roots) - {me, os.getppid()}
        for pid in owned:
            self.seen[pid] = table[pid]["start"]
        return {pid for pid in owned if not table[pid]["zombie"]}

    def sigkill(self) -> set[int]:
        """SIGKILL every owned process at once, as when a machine is lost; returns the PIDs signalled."""
        pids = self.scan()
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
        return pids

    def kill(self, grace_s: float = 10.0) -> set[int]:
        """SIGTERM every owned process, SIGKILL what is left after grace_s; returns survivors."""
        pids = self.scan()
        for pid in pids:
            signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            pids = self.scan()
            if not pids:
                return set()
            time.sleep(0.5)
        table = proc_table()
        print(f"SIGKILL after {grace_s:.0f} s: " + "; ".join(f"{pid} {table.get(pid, {}).get('cmd', '?')[:80]}" for pid in pids))
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
        time.sleep(1.0)
        return self.scan()


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def start_time_now() -> int:
    """Now, less a second, in /proc's start-time units (clock ticks since boot)."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return int((uptime - 1.0) * os.sysconf("SC_CLK_TCK"))


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
