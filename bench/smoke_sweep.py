"""The smoke sweep as a benchmark: AKOD against linear, cosine and Min-SNR at an equal budget on
this CPU; writes the sweep table into BENCHMARKS.md's section and `akod_vs_cosine_fid_c10_ratio`
(fid_c10 of AKOD over cosine; < 1 means AKOD is better) into bench/results.json.

    AKOD_DATA_DIR=../shared/data/cifar10 .venv/bin/python bench/smoke_sweep.py [--set ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"


def arm_timers(sweep_dir: Path, trial: str) -> dict:
    """The trial run's own timers at its last metrics record: wall_s, train_s, other_<kind>_s
    and the non-train share of its wall-clock (1 - train_s / wall_s)."""
    runs = sorted((sweep_dir / "runs").glob(f"{trial}-*/metrics.jsonl"))
    if not runs:
        return {}
    records = [json.loads(x) for x in runs[-1].read_text().splitlines() if x.strip()]
    last = [r for r in records if "train_s" in r][-1]
    out = {k: round(v, 2) for k, v in last.items() if k in ("wall_s", "train_s") or k.startswith("other_")}
    out["non_train_share"] = round(1.0 - last["train_s"] / last["wall_s"], 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    root = Path(args.root)
    shutil.rmtree(root / "smoke", ignore_errors=True)
    cmd = [sys.executable, "-m", "akod_ray", "sweep", str(ROOT / "tune_configs" / "smoke.yaml"),
           "--set", f"run.root={root}", "--set", "run.dashboard=false"]
    for o in args.overrides:
        cmd += ["--set", o]
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    elapsed = time.time() - t
    rows = list(csv.DictReader((root / "smoke" / "sweep_table.csv").open()))
    by_arm = {r["arm"]: r for r in rows}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    fid = {a: float(r["fid_c10"]) for a, r in by_arm.items() if r.get("fid_c10") not in ("", None)}
    if "akod" in fid and "cosine" in fid:
        results["akod_vs_cosine_fid_c10_ratio"] = fid["akod"] / fid["cosine"]
    results["smoke_sweep"] = {"command": " ".join(["python", "bench/smoke_sweep.py", *sum((["--set", o] for o in args.overrides), [])]),
                              "sweep_wall_s": elapsed, "load_avg": os.getloadavg(), "rows": rows,
                              "timers": {r["trial"]: arm_timers(root / "smoke", r["trial"]) for r in rows}}
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print((root / "smoke" / "sweep_table.md").read_text())
    print(f"akod_vs_cosine_fid_c10_ratio = {results.get('akod_vs_cosine_fid_c10_ratio')}; sweep took {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
