"""Where an AKOD run's wall-clock goes on this CPU (issue "AKOD").

    .venv/bin/python bench/akod_overhead.py [--steps 1000] [--segment-steps 200 ...] [--no-write]

Runs the AKOD arm end to end in this process (a local Ray with 2 CPUs, the ScheduleBroker,
1 Ray Train worker with both CPUs, PPO with the DKO as policy), from tune_configs/tiny_akod.yaml
scaled up to a CPU-sized run: a U-Net of channels (32,32,64,64), batch 32 of real CIFAR-10
images, the DKO over 32 bins of the laplace prior, 8 decision images every 4 steps of a window,
PPO iterations of 2 windows, the probe gradient on 32 (image, level) pairs per window, a metrics
record at every window end, a Train checkpoint every 2 windows, and at the end a 2x2 DDIM-10 sample
grid and fid_c10 of 256 samples. The default run: 1000 steps in windows of rl.segment_steps = 200
(the shipped default is 500). Several --segment-steps values run one after the other (the figure is
the first one's).

Definitions (the run's own timers; metrics.jsonl records train_s, other_<kind>_s and wall_s):
  akod_non_training_wall_fraction = 1 - train_s / wall_s of the worker's loop, where wall_s is
  the whole call of akod_ray.training.loop.run_training on rank 0 (setup, every step, the
  end-of-run evaluation and the last checkpoint) and train_s the time inside denoiser train
  steps. Kinds: credit (the decision images' finite differences inside the steps), reward (the
  window's end: the probe gradient for the next window, the next window's slots, the post),
  schedule_wait (rank 0 waiting for PPO's next decisions: PPO update, broker round trips), metrics,
  checkpoint (Train reports), fid and samples (end of run).
  Also reported: the fraction without the end-of-run evaluation (every arm pays it alike) and
  end to end (train_s over the whole train_akod call plus ray.init: Ray, Train and RLlib start).
To get the timers of the end of the run (the last metrics record is written before the final
fid/samples/checkpoint), the worker entry point is wrapped (in this file only) so that rank 0
writes run_training's returned record, which holds the complete timers, to
RUN/bench_worker_timers.json. The driver side (RUN/rl/driver_timing.jsonl and the wrapped
algo.train calls) gives PPO's time.

Figure: akod_non_training_wall_fraction (target <= 0.05), with its breakdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, ROOT, loadavg, write_figures  # noqa: E402

BASE = [
    "model.channels=[32,32,64,64]", "model.bottleneck_channels=64", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "model.dropout=0.0",
    "data.train_subset=4096", "data.val_size=64",
    "train.batch_size=32", "train.cpus_per_worker=2", "train.num_workers=1", "train.bf16=true",
    "train.channels_last=true", "train.warmup_steps=20", "train.ref_grid=8", "train.val_batch=64",
    "rl.train_batch=2", "rl.minibatch_size=64", "rl.num_epochs=4", "rl.broker_timeout_s=600",
    "rl.decision_every=4", "rl.decision_images=8", "dko.bins=32", "dko.probe_pool=512",
    "eval.fid_samples=256", "eval.sampler_steps=10", "eval.grid_size=2",
    "run.num_cpus=2", "run.dashboard=false",
]
END_OF_RUN = ("fid", "samples")


def bench_train_worker(loop_config: dict) -> None:
    """akod_ray.training.worker_loop.train_worker, with rank 0 writing run_training's returned
    record (complete timers, the end of the run included) next to metrics.jsonl."""
    import json as _json
    import time as _time
    from pathlib import Path as _Path

    import akod_ray.training.worker_loop as wl

    original = wl.run_training

    def timed_run_training(cfg, data, env, run_dir, schedules):
        t = _time.perf_counter()
        record = original(cfg, data, env, run_dir, schedules)
        if env.rank == 0:
            out = dict(record, loop_call_s=_time.perf_counter() - t)
            (_Path(run_dir) / "bench_worker_timers.json").write_text(_json.dumps(out, indent=1))
        return record

    wl.run_training = timed_run_training
    try:
        wl.train_worker(loop_config)
    finally:
        wl.run_training = original


def run_akod(root: Path, name: str, steps: int, segment_steps: int) -> dict:
    """One AKOD run in this process; returns the measured breakdown."""
    import ray

    import akod_ray.rl.driver as driver
    import akod_ray.training.worker_loop as wl
    from akod_ray.config import load_config

    sets = [f"run.name={name}", f"run.root={root}", f"train.steps={steps}", f"rl.segment_steps={segment_steps}",
            f"train.log_every={segment_steps}", f"train.ckpt_every={2 * segment_steps}", f"train.sample_every={steps}",
            *BASE]
    if (DATA_DIR / "train.parquet").is_file():
        sets.append(f"data.data_dir={DATA_DIR}")
    else:
        sets.append("data.source=procedural")
    cfg = load_config(ROOT / "tune_configs" / "tiny_akod.yaml", sets)

    # PPO's own time: wrap algo.train (it includes waiting for the workers' rewards) and keep
    # RLlib's timers of each iteration.
    ppo_calls: list[dict] = []
    build_ppo = driver.build_ppo

    def wrap(algo):
        train = algo.train

        def timed_train():
            t = time.perf_counter()
            result = train()
            ppo_calls.append({"train_call_s": time.perf_counter() - t, "timers": _flat_timers(result)})
            return result

        algo.train = timed_train
        return algo

    driver.build_ppo = lambda *a, **k: wrap(build_ppo(*a, **k))
    original_worker = wl.train_worker
    wl.train_worker = bench_train_worker  # build_trainer imports it at call time
    t0 = time.perf_counter()
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        ray_init_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        from akod_ray.training.trainer import data_dir_for

        last = driver.train_akod(cfg, data_dir_for(cfg, None))
        train_akod_s = time.perf_counter() - t1
    finally:
        wl.train_worker = original_worker
        driver.build_ppo = build_ppo
        ray.shutdown()
    end_to_end_s = time.perf_counter() - t0

    run_dir = cfg.run_dir
    worker = json.loads((run_dir / "bench_worker_timers.json").read_text())
    timing = [json.loads(x) for x in (run_dir / "rl" / "driver_timing.jsonl").read_text().splitlines() if x.strip()][-1]
    iterations = [json.loads(x) for x in (run_dir / "rl" / "iterations.jsonl").read_text().splitlines() if x.strip()]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    logged = [r for r in records if "train_s" in r][-1]

    wall = worker["loop_call_s"]
    train_s = worker["train_s"]
    other = {k[len("other_"):-len("_s")]: v for k, v in worker.items() if k.startswith("other_") and k.endswith("_s")}
    setup_and_gaps = wall - train_s - sum(other.values())
    breakdown = {k: round(v / wall, 4) for k, v in sorted(other.items(), key=lambda kv: -kv[1])}
    breakdown["setup_and_untimed"] = round(setup_and_gaps / wall, 4)
    timers_sum: dict[str, float] = {}
    for call in ppo_calls:
        for k, v in call["timers"].items():
            timers_sum[k] = timers_sum.get(k, 0.0) + v
    end_of_run = sum(other.get(k, 0.0) for k in END_OF_RUN)
    return {
        "steps": steps, "segment_steps": cfg.rl.segment_steps, "batch": cfg.train.batch_size,
        "log_every": cfg.train.log_every, "ckpt_every": cfg.train.ckpt_every, "ref_grid": cfg.train.ref_grid,
        "val_size": cfg.data.val_size, "fid_samples": cfg.eval.fid_samples,
        "fraction": round(1.0 - train_s / wall, 4),
        "fraction_without_end_of_run_eval": round(1.0 - train_s / (wall - end_of_run), 4),
        "fraction_end_to_end": round(1.0 - train_s / end_to_end_s, 4),
        "worker_loop_wall_s": round(wall, 1), "train_s": round(train_s, 1),
        "train_step_s_mean": round(train_s / steps, 3),
        "other_s": {k: round(v, 2) for k, v in other.items()},
        "share_of_loop_wall": breakdown,
        "logged_span": {"wall_s": round(logged["wall_s"], 1), "train_s": round(logged["train_s"], 1),
                        "fraction": round(1.0 - logged["train_s"] / logged["wall_s"], 4), "step": logged["step"]},
        "ray_init_s": round(ray_init_s, 1), "train_akod_s": round(train_akod_s, 1), "end_to_end_s": round(end_to_end_s, 1),
        "driver_wall_s": round(timing["wall_s"], 1), "rl_setup_s": round(timing.get("rl_setup_s", 0.0), 1),
        "ppo_iterations": len(iterations), "ppo_train_calls_s": round(sum(c["train_call_s"] for c in ppo_calls), 1),
        "ppo_rllib_timers_s": {k: round(v, 2) for k, v in sorted(timers_sum.items())},
        "final_ref_loss": last.get("ref_loss"),
    }


def _flat_timers(result: dict) -> dict[str, float]:
    """RLlib's per-iteration timers (seconds): env_runner_sampling_timer (building schedules and
    waiting for the workers' rewards) and learner_update_timer (the PPO update itself)."""
    return {k: float(v) for k, v in (result.get("timers", {}) or {}).items() if isinstance(v, (int, float))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--segment-steps", type=int, nargs="+", default=[200],
                   help="rl.segment_steps of each run (the figure is the first run's)")
    p.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="akod_bench_akod_"))
    load_start = loadavg()
    print(f"[bench] load {load_start}; runs under {root}", flush=True)
    out = {}
    try:
        for k in args.segment_steps:
            r = run_akod(root, f"akod_k{k}", args.steps, k)
            r["loadavg_after"] = loadavg()
            out[f"segment_steps_{k}"] = r
            print(f"[bench] segment_steps {k}: non-training share of the worker loop {r['fraction']:.3f} (target <= 0.05), "
                  f"{r['fraction_without_end_of_run_eval']:.3f} without the end-of-run evaluation, "
                  f"{r['fraction_end_to_end']:.3f} end to end; loop {r['worker_loop_wall_s']}s, train steps {r['train_s']}s "
                  f"({r['train_step_s_mean']}s/step); seconds {r['other_s']}; end to end {r['end_to_end_s']}s "
                  f"(ray.init {r['ray_init_s']}s, RL setup {r['rl_setup_s']}s); PPO: {r['ppo_iterations']} iterations, "
                  f"timers {r['ppo_rllib_timers_s']}; load {r['loadavg_after']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    first = out[f"segment_steps_{args.segment_steps[0]}"]
    results = {"akod_non_training_wall_fraction": first["fraction"],
               "akod_non_training_wall_fraction_without_end_of_run_eval": first["fraction_without_end_of_run_eval"],
               "akod_non_training_wall_fraction_end_to_end": first["fraction_end_to_end"]}
    write_figures("akod_overhead", results, out, load_start, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
