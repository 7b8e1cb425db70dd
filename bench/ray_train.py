"""Ray Train overhead on this CPU and the data path's headroom (issue "Ray Train").

    .venv/bin/python bench/ray_train.py [--steps 100] [--rounds 2] [--no-2w] [--no-loader] [--no-write]

1. The same training loop (akod_ray.training.loop.run_training), the same config, three ways,
   interleaved round by round (plain, ray-1w, ray-2w, then the reverse order, ...):
     plain   a fresh Python process without Ray (no Ray running either): run_training with
             LocalEnv and torch.set_num_threads(2)
     ray-1w  akod_ray.training.trainer.train: Ray Train, 1 worker with 2 CPUs (2 torch threads),
             on a local Ray started for the run (ray.init(num_cpus=2), shut down after it)
     ray-2w  the same with 2 DDP workers (gloo) with 1 CPU each
   Steady-state images/s of a run: the median of its metrics.jsonl ``img_per_s`` records after
   the first interval (``log_every`` steps each; the reference-loss evaluation at each log step
   is outside the intervals). Config: channels (32,64,64,128), bottleneck 128, 1 res block,
   attention at 8, batch 32, bf16 autocast + channels_last, linear schedule, CIFAR-10 subset;
   checkpoints and sample grids only at the end.
2. The data path: BatchStream.next on CIFAR-10 training images held in memory (uint8), batch 64,
   to float [-1, 1] with random flips, channels_last, against the images/s that the paper-width
   training step consumes (``cpu_train_img_per_s`` from bench/train_step.py in results.json).

Figures: ray_train_vs_plain_throughput_ratio, ray_train_2w_vs_1w_throughput_ratio,
data_loader_headroom (and the images/s behind them).
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
from common import DATA_DIR, RESULTS, ROOT, loadavg, median, write_figures  # noqa: E402

import torch  # noqa: E402


def bench_config(root: Path, name: str, steps: int, workers: int, cpus: int, log_every: int, source: str):
    from akod_ray.config import load_config

    sets = [
        f"run.name={name}", f"run.root={root}", "run.num_cpus=2", "run.dashboard=false",
        "diffusion.schedule=linear",
        "model.channels=[32,64,64,128]", "model.bottleneck_channels=128", "model.num_res_blocks=1",
        "model.attention_resolutions=[8]",
        f"data.source={source}", "data.train_subset=4096", "data.val_size=64",
        f"train.steps={steps}", "train.batch_size=32", "train.warmup_steps=10", "train.bf16=true",
        "train.channels_last=true", f"train.num_workers={workers}", f"train.cpus_per_worker={cpus}",
        f"train.log_every={log_every}", f"train.ckpt_every={steps}", f"train.sample_every={steps}",
        "train.ref_grid=2", "eval.fid_samples=2", "eval.sampler_steps=1", "eval.grid_size=1",
    ]
    if source == "cifar10":
        sets.append(f"data.data_dir={DATA_DIR}")
    return load_config(None, sets)


def steady_img_per_s(run_dir: Path) -> tuple[float, list[float]]:
    from akod_ray.training.trainer import read_metrics

    vals = [r["img_per_s"] for r in read_metrics(run_dir) if "img_per_s" in r]
    steady = vals[1:]  # the first interval holds the warm-up (first steps, allocator, oneDNN primitives)
    if not steady:
        raise RuntimeError(f"{run_dir}: no steady-state img_per_s records ({vals})")
    return median(steady), vals


def plain_run(config_path: str) -> None:
    """The plain-PyTorch run, in its own process (``--plain-run``): no Ray imported or running."""
    from akod_ray.config import load_config
    from akod_ray.data.sources import load_training_data
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import FixedSchedule, run_training
    from akod_ray.training.schedule_source import fixed_betas

    torch.set_num_threads(2)
    cfg = load_config(config_path)
    data = load_training_data(cfg, cfg.data.data_dir)
    run_training(cfg, data, LocalEnv(cfg.run_dir), cfg.run_dir, FixedSchedule(fixed_betas(cfg)))
    assert "ray" not in sys.modules, "the plain run must not import Ray"


def run_plain(cfg) -> float:
    import subprocess

    from akod_ray.config import save_config

    path = save_config(cfg, cfg.run_dir)
    t = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--plain-run", str(path)], check=True, cwd=ROOT)
    return time.perf_counter() - t


def run_ray(cfg) -> float:
    import ray

    from akod_ray.run import train

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        train(cfg)
    finally:
        ray.shutdown()
    return time.perf_counter() - t


def loader_img_per_s(batch: int = 64, seconds: float = 3.0, count: int | None = None) -> dict:
    from akod_ray.data.parquet import load_images
    from akod_ray.data.stream import BatchStream

    torch.set_num_threads(2)
    t = time.perf_counter()
    images = load_images(DATA_DIR, "train", count=count, seed=0)
    decode_s = time.perf_counter() - t
    stream = BatchStream(images, batch, seed=0)
    for _ in range(20):
        stream.next("cpu", channels_last=True)
    rates = []
    for _ in range(5):  # five windows, best and median
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds / 5:
            stream.next("cpu", channels_last=True)
            n += 1
        rates.append(n * batch / (time.perf_counter() - t))
    return {"images": int(images.shape[0]), "decode_s": round(decode_s, 1), "img_per_s_windows": [round(r) for r in rates],
            "img_per_s": median(rates)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="steps of each run (log_every 20: 4 steady intervals)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (plain, ray-1w, ray-2w)")
    p.add_argument("--no-2w", action="store_true", help="leave out the 2-worker runs")
    p.add_argument("--no-loader", action="store_true", help="leave out the data-path measurement")
    p.add_argument("--no-ray", action="store_true", help="only the data-path measurement")
    p.add_argument("--loader-images", type=int, default=None, help="CIFAR-10 training images held (default: all 50,000)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--plain-run", metavar="CONFIG", help=argparse.SUPPRESS)  # internal: the plain run's process
    args = p.parse_args(argv)
    if args.plain_run:
        plain_run(args.plain_run)
        return 0
    source = "cifar10" if (DATA_DIR / "train.parquet").is_file() else "procedural"
    results, details = {}, {"source": source, "steps": args.steps, "log_every": args.log_every, "rounds": args.rounds}
    load_start = loadavg()
    print(f"[bench] load {load_start}", flush=True)

    if not args.no_ray:
        root = Path(tempfile.mkdtemp(prefix="akod_bench_ray_"))
        variants = {"plain": (1, 2, run_plain), "ray_1w": (1, 2, run_ray)}
        if not args.no_2w:
            variants["ray_2w"] = (2, 1, run_ray)
        rates = {v: [] for v in variants}
        walls = {v: [] for v in variants}
        intervals = {v: [] for v in variants}
        loads = {v: [] for v in variants}
        try:
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(variants)[::-1]
                for v in order:
                    workers, cpus, fn = variants[v]
                    cfg = bench_config(root, f"{v}_r{r}", args.steps, workers, cpus, args.log_every, source)
                    wall = fn(cfg)
                    rate, vals = steady_img_per_s(cfg.run_dir)
                    rates[v].append(rate)
                    walls[v].append(round(wall, 1))
                    intervals[v].append([round(x, 1) for x in vals])
                    loads[v].append(loadavg()[0])
                    print(f"[bench] round {r + 1} {v}: steady {rate:.1f} img/s (intervals {[round(x, 1) for x in vals]}), "
                          f"run wall {wall:.1f}s, load {loadavg()}", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        med = {v: median(x) for v, x in rates.items()}
        results["ray_train_vs_plain_throughput_ratio"] = round(med["ray_1w"] / med["plain"], 3)
        results["ray_train_plain_img_per_s"] = round(med["plain"], 2)
        results["ray_train_1w_img_per_s"] = round(med["ray_1w"], 2)
        details.update({"per_round_img_per_s": rates, "run_wall_s": walls, "interval_img_per_s": intervals,
                        "load_after_run": loads,
                        "paired_ratio_1w_over_plain": [round(a / b, 3) for a, b in zip(rates["ray_1w"], rates["plain"])]})
        if "ray_2w" in med:
            results["ray_train_2w_vs_1w_throughput_ratio"] = round(med["ray_2w"] / med["ray_1w"], 3)
            results["ray_train_2w_img_per_s"] = round(med["ray_2w"], 2)
            details["paired_ratio_2w_over_1w"] = [round(a / b, 3) for a, b in zip(rates["ray_2w"], rates["ray_1w"])]
        print(f"[bench] Ray Train 1 worker / plain PyTorch: {results['ray_train_vs_plain_throughput_ratio']:.3f} (target >= 0.95)",
              flush=True)
        if "ray_train_2w_vs_1w_throughput_ratio" in results:
            print(f"[bench] Ray Train 2 workers x 1 CPU / 1 worker x 2 CPUs: {results['ray_train_2w_vs_1w_throughput_ratio']:.3f}",
                  flush=True)

    if not args.no_loader and source == "cifar10":
        loader = loader_img_per_s(count=args.loader_images)
        consumed = json.loads(RESULTS.read_text()).get("cpu_train_img_per_s") if RESULTS.is_file() else None
        results["data_loader_img_per_s"] = round(loader["img_per_s"], 1)
        details["loader"] = loader
        if consumed:
            results["data_loader_headroom"] = round(loader["img_per_s"] / consumed, 1)
            details["loader_vs_train_step_img_per_s"] = consumed
            print(f"[bench] data path {loader['img_per_s']:.0f} img/s vs paper-width step {consumed:.2f} img/s: headroom "
                  f"{results['data_loader_headroom']:.0f}x (target >= 10)", flush=True)
        else:
            print("[bench] no cpu_train_img_per_s in results.json: run bench/train_step.py first for the headroom", flush=True)
        if "ray_train_plain_img_per_s" in results:
            details["loader_headroom_vs_midsize_plain"] = round(loader["img_per_s"] / results["ray_train_plain_img_per_s"], 1)

    details.update({"loadavg_start": load_start, "loadavg_end": loadavg()})
    write_figures("ray_train", results, details, load_start, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
