"""Shared helpers of the benchmark scripts: results file, machine description, load average,
interleaved timing.

Every script merges its figures into bench/results.json (read-modify-write, keeping the keys
other scripts wrote) together with a ``_meta`` entry per figure: the command line that
produced it, the date, the machine and the load average around the measurement.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
DATA_DIR = ROOT.parent / "shared" / "data" / "cifar10"  # the offline CIFAR-10 copy beside the checkout
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def command_line() -> str:
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, ROOT)
    except ValueError:
        pass
    script = sys.argv[0]
    try:
        script = os.path.relpath(os.path.abspath(script), ROOT)
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [exe, script, *sys.argv[1:]])


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def merge_results(values: dict, meta: dict | None = None, path: Path = RESULTS, retire: tuple[str, ...] = ()) -> dict:
    """Read-modify-write ``path`` atomically: ``values`` at the top level, ``meta`` under
    ``_meta[key]`` for every key of ``values``; the keys in ``retire`` (figures whose meaning changed and that no
    script writes any more) are removed with their ``_meta``; other keys are kept as they are."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    for k in retire:
        data.pop(k, None)
        data.get("_meta", {}).pop(k, None)
    data.update(values)
    if meta is not None:
        m = data.setdefault("_meta", {})
        for k in values:
            m[k] = meta
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return data


def meta_record(**extra) -> dict:
    return {"command": command_line(), "date": today(), "machine": machine(), **extra}


def write_figures(name: str, results: dict, details: dict, load_start: list[float], write: bool = True) -> None:
    """The end of every benchmark script: print the load average, merge ``results`` (with their
    ``_meta``) and ``details`` (under ``_details_<name>``) into results.json, print the command."""
    load_end = loadavg()
    print(f"[bench] load average: start {load_start}, end {load_end}", flush=True)
    if write and results:
        merge_results(results, meta_record(loadavg=load_end, loadavg_start=load_start))
        merge_results({f"_details_{name}": details})
    print(f"[bench] command: {command_line()}", flush=True)


def median(xs):
    return statistics.median(xs)


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    """num[i] / den[i]: the two were timed next to each other in round i (same load)."""
    return [a / b for a, b in zip(num, den)]


def interleaved(fns: dict, warmup: int, reps: int, log=print, between=None) -> dict[str, list[float]]:
    """Run every callable ``warmup`` times (interleaved), then ``reps`` timed rounds A B C, C B A, ...;
    returns the seconds of each call per name. Each callable must finish its own work (no async).
    ``between`` (optional) runs after every timed round, outside the timings."""
    names = list(fns)
    for i in range(warmup):
        for n in names:
            t = time.perf_counter()
            fns[n]()
            log(f"  warm-up {i + 1}/{warmup} {n}: {time.perf_counter() - t:.3f}s load {loadavg()[0]}")
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        order = names if i % 2 == 0 else names[::-1]  # A B, B A: no variant always runs first
        for n in order:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
            log(f"  rep {i + 1}/{reps} {n}: {times[n][-1]:.3f}s load {loadavg()[0]}")
        if between is not None:
            between()
    return times


def run_workers(script: str, args, worker) -> None:
    """In a worker process (``--worker-index i``): ``worker(i, args.workers, args)``. Otherwise create
    ``args.out`` and run ``script`` again as ``args.workers`` processes with this process's arguments
    plus ``--worker-index i``, one torch thread each (runs side by side, one a core); raise SystemExit if
    any fails."""
    if args.worker_index is not None:
        worker(args.worker_index, args.workers, args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, script, *sys.argv[1:], "--worker-index", str(i)],
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for i in range(args.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
