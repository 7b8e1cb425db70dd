"""Every benchmark of the project, in sequence (``make bench``):

    .venv/bin/python bench/run_all.py [--skip NAME ...] [--only NAME ...]

1. bench/train_step.py     paper-width training step: speedup over naive fp32, GFLOP/s, MSFI cost
2. bench/ray_train.py      Ray Train vs plain PyTorch, 2 workers vs 1, data-path headroom
                           (after train_step.py: the headroom divides by its images/s)
3. bench/akod_overhead.py  where an AKOD run's wall-clock goes
4. bench/fid_c10.py        the offline FID's classifier accuracy and fid_c10's floor (test vs train)

The smoke sweep (bench/smoke_sweep.py, the AKOD-vs-baselines table) is not part of it: run it
on its own (BENCHMARKS.md).

Each script merges its figures into bench/results.json and prints the command line that made
them; BENCHMARKS.md lists them. A failing script is reported and the others still run; the
exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCRIPTS = ["train_step", "ray_train", "akod_overhead", "fid_c10"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip", nargs="*", default=[], choices=SCRIPTS)
    p.add_argument("--only", nargs="*", default=None, choices=SCRIPTS)
    args = p.parse_args(argv)
    todo = [s for s in (args.only or SCRIPTS) if s not in args.skip]
    failed = []
    for name in todo:
        script = BENCH / f"{name}.py"
        if not script.is_file():
            print(f"[run_all] {script.relative_to(ROOT)} is missing: skipped", flush=True)
            continue
        cmd = [sys.executable, str(script.relative_to(ROOT))]
        print(f"[run_all] {' '.join(cmd)}   (load {[round(x, 2) for x in os.getloadavg()]})", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"[run_all] {name}: exit {rc} after {time.perf_counter() - t:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", flush=True)
        return 1
    print("[run_all] all done; figures in bench/results.json, described in BENCHMARKS.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
