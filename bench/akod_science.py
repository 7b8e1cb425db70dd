"""The paper's question at the largest scale this 2-core CPU allows: does a PPO-learned,
data-adaptive schedule train faster than strong fixed ones?

Design (issue 11, "The experiment"):
- Arms ``baseline`` (plain U-Net, linear), ``cosine``, ``min_snr`` (cosine + Min-SNR-5),
  ``loglinear`` (uniform in log-SNR: the DKO's starting point), ``akod`` (AKOD U-Net + learned
  schedule) and, with ``--arms``, ``dko_only`` / ``msfi_only``; seeds 0, 1, 2; real CIFAR-10
  (all 50,000 training images).
- The same budget for every arm: ``--budget`` seconds of the run process's CPU time, with one
  torch thread per run (``train.budget_clock=cpu``). On a dedicated core that is wall-clock;
  on this shared 2-core box it is the part of wall-clock that other processes cannot inflate.
  Everything the arm does counts (AKOD's branch rollouts, reward evaluations and PPO updates:
  the whole AKOD arm runs in one process, ``akod_ray.rl.driver.train_akod_local``); evaluation
  (fid_c10, reference-loss records, sample grids) does not, for any arm.
- The referee is fid_c10 (the shipped CIFAR-10 classifier's Frechet distance, never called FID):
  every ``fid_every`` steps with N = 1,000 during the run (the curves and time-to-target), and
  N = 2,000 from the final EMA weights. The reference loss is reported beside it, marked biased
  (its grid is uniform in log-SNR, the loglinear schedule's own training distribution).
- PPO's learning: from each AKOD run's final checkpoint, the reward (relative improvement of
  the reference loss over ``--gain-steps`` branch steps, common random numbers) of the final
  policy's schedule against the initial policy's, paired, over ``--gain-reps`` draws.

Runs are resumable: each finished run writes ``<out>/results/<arm>_s<seed>.json`` and is
skipped on the next invocation; an unfinished run starts over. ``--workers 2`` runs two
processes side by side (one core each). ``--report`` aggregates: ``<out>/report.md``, plots,
and the keys of bench/results.json.

    .venv/bin/python bench/akod_science.py --workers 2          # the runs (about 2 hours)
    .venv/bin/python bench/akod_science.py --report             # tables, plots, results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, ROOT, loadavg, merge_results, meta_record  # noqa: E402

ARMS = ["baseline", "cosine", "min_snr", "loglinear", "akod"]
SEEDS = [0, 1, 2]
OUT = ROOT / "bench" / "akod_science"

BASE = [  # the experiment's config (tune_configs/tiny.yaml's sections, set here so the bench is self-contained)
    "model.channels=[16,32,32,64]", "model.bottleneck_channels=64", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "model.dropout=0.0",
    "diffusion.T=1000",
    "dko.kernel_size=7", "dko.num_knots=8", "dko.probe_size=32", "dko.probe_pool=512",
    "data.source=cifar10", "data.val_size=96",
    "train.steps=4000", "train.batch_size=32", "train.lr=0.0005", "train.warmup_steps=100", "train.ema_decay=0.995",
    "train.bf16=true", "train.num_workers=1", "train.cpus_per_worker=1", "train.log_every=200",
    "train.ckpt_every=1000", "train.sample_every=100000", "train.num_to_keep=1", "train.budget_clock=cpu",
    "train.ref_grid=8", "train.val_batch=96",
    "rl.segment_steps=250", "rl.branches=4", "rl.branch_steps=16", "rl.train_batch=4", "rl.minibatch_size=28",
    "rl.num_epochs=8", "rl.lr=0.0003", "rl.reward=improvement", "rl.broker_timeout_s=900",
    "eval.sampler=ddim", "eval.ddim_steps=20", "eval.fid_every=600", "eval.fid_samples=1000", "eval.grid_size=4",
]


def run_config(arm: str, seed: int, budget: float, out: Path, extra: list[str]):
    from akod_ray.config import ARM_SPECS, load_config

    schedule, min_snr, akod_unet = ARM_SPECS[arm]
    sets = [*BASE, f"data.data_dir={DATA_DIR}", f"run.root={out / 'runs'}", f"run.name={arm}_s{seed}",
            f"train.seed={seed}", f"data.seed={seed}", f"train.max_wall_s={budget}",
            f"diffusion.schedule={schedule}", f"diffusion.min_snr_gamma={5.0 if min_snr else 'null'}",
            f"model.msfi={str(akod_unet).lower()}", f"model.beta_modulation={str(akod_unet).lower()}", *extra]
    return load_config(None, sets)


# ----------------------------------------------------------------- one run


_DATA: dict = {}


def training_data(cfg):
    """The training images are decoded once per process; the held-out batch depends on the seed."""
    from akod_ray.data.parquet import load_images
    from akod_ray.data.sources import TrainingData

    if "train" not in _DATA:
        _DATA["train"] = load_images(str(DATA_DIR), "train")
    val = load_images(str(DATA_DIR), "test", count=cfg.data.val_size, seed=cfg.data.seed + 1)
    return TrainingData(_DATA["train"], val)


def final_fid(cfg, n: int, seed: int) -> dict:
    """fid_c10 of n EMA samples from the run's final checkpoint, and of its first 1,000."""
    import torch

    from akod_ray.diffusion.samplers import sample
    from akod_ray.evaluation.fid import (c10_activations, c10_implementation, default_c10_reference,
                                         frechet_distance, statistics)
    from akod_ray.training.checkpoint import latest_checkpoint, load_for_sampling

    model, process, _ = load_for_sampling(latest_checkpoint(cfg.run_dir))
    g = torch.Generator().manual_seed(10_000 + seed)
    images = sample(model, process, n, g, "ddim", cfg.eval.ddim_steps, 0.0, torch.device("cpu"), bf16=cfg.train.bf16)
    acts = c10_activations(images.float())
    ref = default_c10_reference()
    impl = c10_implementation()
    return {"fid_c10_final": frechet_distance(statistics(acts, "samples", impl), ref), "fid_c10_final_n": n,
            "fid_c10_final_1000": frechet_distance(statistics(acts[:1000], "samples", impl), ref)}


def policy_gain(cfg, data, steps: int, reps: int) -> dict:
    """Paired reward of the final policy's schedule against the initial policy's, from the final checkpoint."""
    import torch

    from akod_ray.diffusion.dko import DKO, learned_schedule
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.rl.driver import make_observer, probe_pool_of
    from akod_ray.training.checkpoint import latest_checkpoint, load_state
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import FixedSchedule, TrainingRun

    state = load_state(latest_checkpoint(cfg.run_dir))
    dko = state["schedule_source"]["dko"]
    observer = make_observer(cfg, probe_pool_of(cfg, data.train))
    final = learned_schedule(dko, observer, cfg.dko.hidden)
    initial = learned_schedule({"weights": DKO(cfg.dko.hidden).state_dict(), "context": dko["context"]}, observer,
                               cfg.dko.hidden)
    run = TrainingRun(cfg, data, LocalEnv(cfg.run_dir), cfg.run_dir, FixedSchedule(state["betas"]))
    run.resume()
    before = run.reference()["ref_loss"]
    pairs = []
    for r in range(reps):
        scores = {name: run.branch(DiffusionProcess(b), steps, salt=100 + r)["ref_loss"]
                  for name, b in (("initial", initial), ("final", final))}
        pairs.append({k: (before - v) / before for k, v in scores.items()})
    return {"gain_pairs": pairs, "gain_before_loss": before, "gain_steps": steps,
            "final_logsnr": DiffusionProcess(final).log_snr[::10].tolist(),
            "final_equals_trained": bool(torch.equal(final, state["betas"]))}


def one_run(arm: str, seed: int, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training
    from akod_ray.training.schedule_source import fixed_source

    cfg = run_config(arm, seed, args.budget, args.out, args.set)
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # an unfinished run starts over
    data = training_data(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg.diffusion.schedule == "akod":
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        from akod_ray.rl.driver import train_akod_local

        last = train_akod_local(cfg, data)
    else:
        last = run_training(cfg, data, LocalEnv(cfg.run_dir, 1), cfg.run_dir, fixed_source(cfg))
    out = {"arm": arm, "seed": seed, "budget": args.budget, "run_wall_s": time.perf_counter() - t0,
           "run_cpu_s": time.process_time() - c0, "last": last, "loadavg": loadavg()}
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out["records"] = records
    out["steps"] = last.get("step")
    out["images"] = last.get("step", 0) * cfg.train.batch_size
    out.update(final_fid(cfg, args.final_n, seed))
    if cfg.diffusion.schedule == "akod":
        rl = cfg.run_dir / "rl"
        out["posted"] = [json.loads(x) for x in (rl / "posted.jsonl").read_text().splitlines() if x.strip()]
        for p in out["posted"]:
            p.pop("loss_profile", None), p.pop("profile_logsnr", None)
        out["iterations"] = [json.loads(x) for x in (rl / "iterations.jsonl").read_text().splitlines() if x.strip()]
        out.update(policy_gain(cfg, data, args.gain_steps, args.gain_reps))
    return out


def worker(index: int, count: int, args) -> None:
    plan = [(arm, seed) for seed in SEEDS for arm in args.arms]
    for i, (arm, seed) in enumerate(plan):
        if i % count != index:
            continue
        dest = args.out / "results" / f"{arm}_s{seed}.json"
        if dest.exists():
            continue
        print(f"[science] worker {index}: {arm} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
        result = one_run(arm, seed, args)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(dest)
        print(f"[science] worker {index}: {arm} seed {seed} done: {result['images']} images, fid_c10 "
              f"{result['fid_c10_final']:.2f} (N={result['fid_c10_final_n']}), {result['run_wall_s']:.0f} s wall",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="runs side by side (one core each)")
    ap.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arms", nargs="+", default=ARMS)
    ap.add_argument("--budget", type=float, default=360.0, help="CPU seconds of training per run (every arm)")
    ap.add_argument("--final-n", type=int, default=2000, help="samples of the final fid_c10")
    ap.add_argument("--gain-steps", type=int, default=50, help="branch steps of the policy-gain evaluation")
    ap.add_argument("--gain-reps", type=int, default=4, help="paired draws of the policy-gain evaluation")
    ap.add_argument("--set", action="append", default=[], help="extra config override (tests, quick runs)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="aggregate the finished runs")
    args = ap.parse_args()
    if args.report:
        from akod_science_report import write_report

        write_report(args.out, args.arms, write_results=args.out.resolve() == OUT.resolve())
        return
    if args.worker_index is not None:
        worker(args.worker_index, args.workers, args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:]]
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker-index", str(i)],
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for i in range(args.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")


if __name__ == "__main__":
    main()
