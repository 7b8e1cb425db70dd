"""What reporting to Ray Train at every log interval costs the training (issue 22, item 3).

Ray Train V2 puts a worker's report into a queue that holds one, and its controller takes it every
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a synchronous report blocks until the previous one was
taken. The project reports without a checkpoint asynchronously (``CheckpointUploadMode.ASYNC``: the worker
only waits for the ranks to agree on the report) and with a checkpoint synchronously.

1. ``ray.train.report`` itself: one worker reports every ``gap`` seconds (0.2 s: faster than the controller
   polls; 3 s: slower), synchronously and asynchronously; the seconds spent inside each call.
2. The project's loop: a tiny run (procedural data) through Ray Train that logs (and so reports) every 2
   steps, about every 0.1 s, with the controller polling every 2 s (Ray's default) and every 0.5 s (the
   project's, akod_ray/training/trainer.py); ``other_report_s`` of metrics.jsonl is the time the loop spent in
   its interval reports, and the run's wall-clock beside the loop's shows what waiting for the queue cost
   at the checkpoint that ends it. A run whose reports come at least one poll apart waits for nothing.

    .venv/bin/python bench/report_cost.py          # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, loadavg, write_figures  # noqa: E402


def report_loop(config: dict) -> None:
    """A Train worker that reports ``n`` times, ``gap`` seconds apart, and records the seconds inside each call."""
    import json

    import ray.train

    mode = ray.train.CheckpointUploadMode[config["mode"]]
    inside = []
    for i in range(config["n"]):
        time.sleep(config["gap"])
        t = time.perf_counter()
        ray.train.report({"i": i}, checkpoint_upload_mode=mode)
        inside.append(time.perf_counter() - t)
    Path(config["out"]).write_text(json.dumps(inside))


def time_reports(mode: str, gap: float, n: int, storage: Path) -> list[float]:
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    out = storage / f"{mode}_{gap}.json"
    TorchTrainer(report_loop, train_loop_config={"mode": mode, "gap": gap, "n": n, "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=f"{mode}_{gap}", storage_path=str(storage))).fit()
    return json.loads(out.read_text())


def loop_cost(storage: Path, steps: int, poll_s: str) -> dict:
    """A tiny run through the project's loop on Ray Train, logging every 2 steps, the controller polling every ``poll_s``."""
    import os

    from akod_ray.config import load_config
    from akod_ray.training.trainer import TRAIN_POLL_ENV, train_fixed

    os.environ[TRAIN_POLL_ENV] = poll_s
    cfg = load_config(None, [
        f"run.root={storage}", f"run.name=loop_{poll_s}", "diffusion.T=100", "diffusion.schedule=cosine",
        "model.channels=[8,8,8,8]", "model.bottleneck_channels=8", "model.num_res_blocks=1",
        "model.attention_resolutions=[]", "model.dropout=0.0", "model.msfi=false", "model.beta_modulation=false",
        "dko.bins=4", "data.source=procedural", "data.train_subset=64", "data.val_size=8",
        f"train.steps={steps}", "train.batch_size=8", "train.log_every=2", f"train.ckpt_every={steps}",
        "train.sample_every=100000", "train.val_batch=8", "train.ref_grid=2", "train.warmup_steps=0",
        "eval.sampler_steps=4", "eval.fid_samples=8"])
    t = time.perf_counter()
    last = train_fixed(cfg)
    wall = time.perf_counter() - t
    reports = steps // 2 - 1  # the last interval's report carries the checkpoint (counted under other_checkpoint_s)
    return {"steps": last["step"], "interval_reports": reports, "report_s_total": last["other_report_s"],
            "report_s_mean": last["other_report_s"] / reports, "loop_wall_s": last["wall_s"],
            "seconds_between_reports": last["wall_s"] / (steps // 2), "fit_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", type=int, default=10, help="reports per variant of part 1")
    ap.add_argument("--steps", type=int, default=200, help="steps of the loop in part 2 (a report every 2)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write bench/results.json")
    args = ap.parse_args()
    import ray

    load_start = loadavg()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=False)
    results, details = {}, {}
    try:
        with tempfile.TemporaryDirectory(prefix="akod_report_cost_") as tmp:
            for gap in (0.2, 3.0):
                for mode in ("SYNC", "ASYNC"):
                    inside = time_reports(mode, gap, args.reports, Path(tmp))
                    key = f"train_report_{mode.lower()}_gap{str(gap).replace('.', 'p')}"
                    details[key] = inside
                    results[f"{key}_median_s"] = statistics.median(inside[1:])  # the first waits for the controller's start
                    results[f"{key}_max_s"] = max(inside[1:])
                    print(f"[bench] report every {gap:g} s, {mode}: median {results[f'{key}_median_s'] * 1e3:.1f} ms, "
                          f"max {results[f'{key}_max_s'] * 1e3:.1f} ms inside ray.train.report", flush=True)
            for poll_s in ("2.0", "0.5"):
                loop = loop_cost(Path(tmp), args.steps, poll_s)
                key = f"loop_poll{poll_s.replace('.', 'p')}"
                details[key] = loop
                results[f"{key}_interval_report_mean_s"] = loop["report_s_mean"]
                results[f"{key}_loop_wall_s"], results[f"{key}_run_wall_s"] = loop["loop_wall_s"], loop["fit_wall_s"]
                print(f"[bench] the loop, poll {poll_s} s, a report every {loop['seconds_between_reports']:.2f} s "
                      f"({loop['interval_reports']} reports): {loop['report_s_mean'] * 1e3:.1f} ms per report in the "
                      f"loop ({loop['report_s_total'] / loop['loop_wall_s']:.2%} of its {loop['loop_wall_s']:.1f} s); "
                      f"the whole run {loop['fit_wall_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
    write_figures("report_cost", results, details, load_start, write=not args.no_write)


if __name__ == "__main__":
    main()
