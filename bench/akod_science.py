"""The paper's question at the largest scale this 2-core CPU allows, version 2 (issue 16): does a
PPO-learned, data-adaptive training distribution train faster than strong fixed ones?

Design:
- Arms ``baseline`` (linear), ``cosine``, ``loglinear``, ``edm``, ``laplace`` (fixed), ``dko_only``
  (plain U-Net, learned schedule) and ``akod`` (AKOD U-Net, learned schedule); ``--arms`` adds
  ``dko_scratch`` (dko_only with the loglinear prior: the DKO learning from the uniform start);
  seeds 0, 1, 2 (``--seeds``); real CIFAR-10 (all 50,000 training images).
- The same budget for every arm: ``--budget`` seconds of the run process's CPU time, one torch
  thread per run (``train.budget_clock=cpu``); everything but evaluation counts (AKOD's reward
  probe, observations and PPO updates: the whole AKOD arm runs in one process,
  ``akod_ray.rl.driver.train_akod_local``). Two runs side by side (``--workers 2``), the arms
  interleaved in time so the load beside a run hits every arm alike.
- The referee is fid_c10 (the shipped CIFAR-10 classifier's Frechet distance, never called FID)
  on the common sampling grid (uniform in log-SNR between the shared endpoints: every arm is sampled
  the same way, so the comparison judges training only), ``--sampler`` at 20 evaluations (the best
  at that budget by bench/sampling.py; version 2 ran with DDIM-20), x0 clipped: at step 0 and every
  ``eval.fid_every`` steps with N = 500 during the run (the curves and time-to-target), and
  N = 2,000 from the final EMA weights, on the common grid and on the arm's own schedule as its grid.
- The DKO (v2): 16 cosine-spaced knots, a correction to a prior schedule (``--prior``, the anchor
  the pilot found best: bench/reward_referee.py), one decision per ``rl.segment_steps`` trunk
  steps, the reward the relative fall of the reward probe's weighted loss profile over the segment
  (``--reward-metric``, chosen by its rank correlation with fid_c10 in the pilot), credited per
  knot. The samples that reach PPO and the share of the budget learning costs are recorded.
- PPO's learning: from each learned-schedule run's final checkpoint, the reward of the final
  policy's schedule against the prior's (the initial policy), paired with common random numbers,
  ``--gain-reps`` draws of ``--gain-steps`` branch steps; the seeds are the independent units.

Runs are resumable: each finished run writes ``<out>/results/<arm>_s<seed>.json`` and is skipped on
the next invocation; an unfinished run starts over. ``--report`` aggregates (akod_science_report.py).

    .venv/bin/python bench/akod_science.py --workers 2          # the runs (about 2 hours)
    .venv/bin/python bench/akod_science.py --report             # tables, plots, results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, ROOT, loadavg, run_workers  # noqa: E402

ARMS = ["baseline", "cosine", "loglinear", "edm", "laplace", "dko_only", "akod"]
VARIANTS = {"dko_scratch": ("dko_only", ["dko.prior=loglinear"])}  # bench-only arms: an ARM_SPECS arm + overrides
LEARNED = ("dko_only", "akod", "dko_scratch")
SEEDS = [0, 1, 2]
OUT = ROOT / "bench" / "akod_science"
REFEREE_SAMPLER = "heun"  # the best sampler at 20 evaluations by bench/sampling.py (BENCHMARKS.md, "Sampling")

BASE = [  # the experiment's config (set here so the bench is self-contained)
    "model.channels=[16,32,32,64]", "model.bottleneck_channels=64", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "model.dropout=0.0",
    "diffusion.T=1000",
    "dko.kernel_size=7", "dko.num_knots=16", "dko.knot_spacing=cosine", "dko.min_segment_share=0.1",
    "dko.probe_size=32", "dko.probe_pool=512",
    "data.source=cifar10", "data.val_size=96",
    "train.steps=4000", "train.batch_size=32", "train.lr=0.0005", "train.warmup_steps=100", "train.ema_decay=0.995",
    "train.bf16=true", "train.num_workers=1", "train.cpus_per_worker=1", "train.log_every=300",
    "train.ckpt_every=1200", "train.sample_every=100000", "train.num_to_keep=4", "train.budget_clock=cpu",
    "train.ref_grid=8", "train.val_batch=96",
    "rl.segment_steps=30", "rl.branches=0", "rl.train_batch=8", "rl.minibatch_size=60", "rl.num_epochs=6",
    "rl.lr=0.0003", "rl.reward=improvement", "rl.reward_images=8", "rl.reward_grid=24", "rl.credit=knot",
    "rl.reward_scale=100", "rl.broker_timeout_s=900",
    "eval.sampler_steps=20", "eval.sampling_grid=common", "eval.fid_every=300",
    "eval.fid_samples=500", "eval.grid_size=4",
]


def arm_spec(arm: str) -> tuple[str, list[str]]:
    """(the ARM_SPECS arm, extra overrides) of an experiment arm."""
    return VARIANTS.get(arm, (arm, []))


def run_config(arm: str, seed: int, budget: float, out: Path, extra: list[str]):
    from akod_ray.config import ARM_SPECS, load_config

    base_arm, variant = arm_spec(arm)
    schedule, min_snr, akod_unet = ARM_SPECS[base_arm]
    sets = [*BASE, f"data.data_dir={DATA_DIR}", f"run.root={out / 'runs'}", f"run.name={arm}_s{seed}",
            f"train.seed={seed}", f"data.seed={seed}", f"train.max_wall_s={budget}",
            f"diffusion.schedule={schedule}", f"diffusion.min_snr_gamma={5.0 if min_snr else 'null'}",
            f"model.msfi={str(akod_unet).lower()}", f"model.beta_modulation={str(akod_unet).lower()}", *extra, *variant]
    return load_config(None, sets)


def science_overrides(args) -> list[str]:
    """The pilot's choices (prior, laplace scale, reward metric) and any --set overrides."""
    return [f"dko.prior={args.prior}", f"diffusion.laplace_scale={args.laplace_scale}",
            f"rl.reward_metric={args.reward_metric}", f"eval.sampler={args.sampler}", *args.set]


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


def fid_of(cfg, model, process, n: int, seed: int, grid: str) -> float:
    """fid_c10 of n samples of ``model`` (the run's sampler, on ``grid``)."""
    import torch

    from akod_ray.evaluation.fid import default_c10_reference, fid_c10
    from akod_ray.evaluation.sampling import sample_as_configured

    images = sample_as_configured(cfg, model, process, n, torch.Generator().manual_seed(seed), "cpu", grid=grid)
    return fid_c10(images.float(), default_c10_reference())


def initial_fid(cfg, data) -> dict:
    """The step-0 point of the fid_c10 curve: the initial EMA weights (= the initial weights), exactly as
    the loop would evaluate them (the same model construction and seed, the same sampling). The
    conditioning comes from the arm's schedule (for a learned arm: its prior anchor)."""
    import tempfile

    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import anchor_betas
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import FixedSchedule, TrainingRun, offline_fid
    from akod_ray.training.schedule_source import fixed_betas

    d = cfg.diffusion
    betas = (anchor_betas(cfg.dko.prior, d.T, cfg.dko.logsnr_max, cfg.dko.logsnr_min, d.laplace_scale)
             if d.schedule == "akod" else fixed_betas(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun(cfg, data, LocalEnv(Path(tmp)), Path(tmp), FixedSchedule(betas))
        out = offline_fid(cfg, run._eval_model(), DiffusionProcess(betas), run.env, 0)
    return {"step": 0, "budget_s": 0.0, "wall_s": 0.0, **out}


def final_fid(cfg, n: int, seed: int) -> dict:
    """fid_c10 of n EMA samples from the run's final checkpoint, on the common grid and on its own schedule."""
    from akod_ray.training.checkpoint import latest_checkpoint, load_for_sampling

    model, process, _ = load_for_sampling(latest_checkpoint(cfg.run_dir))
    return {"fid_c10_final": fid_of(cfg, model, process, n, 10_000 + seed, "common"),
            "fid_c10_final_own_grid": fid_of(cfg, model, process, n, 10_000 + seed, "own"), "fid_c10_final_n": n}


def policy_gain(cfg, data, steps: int, reps: int) -> dict:
    """Paired reward of the final policy's schedule against the prior's (the initial policy), from the final
    checkpoint: each draw trains both from the same weights with the same batches, t and noise."""
    from akod_ray.diffusion.dko import DKO, learned_schedule
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.rl.driver import make_observer, probe_pool_of
    from akod_ray.rl.reward import reward_from
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
    before = run.reward_profile()
    rl = cfg.rl
    pairs = []
    for r in range(reps):
        scores = {}
        for name, b in (("initial", initial), ("final", final)):
            after = run.branch(DiffusionProcess(b), steps, salt=100 + r)["after_profile"]
            scores[name] = reward_from({"before_profile": before["profile"], "after_profile": after,
                                        "profile_logsnr": before["profile_logsnr"]}, rl.reward, rl.reward_metric,
                                       rl.reward_scale)
        pairs.append(scores)
    return {"gain_pairs": pairs, "gain_steps": steps,
            "final_logsnr": DiffusionProcess(final).log_snr.tolist(),
            "prior_logsnr": DiffusionProcess(initial).log_snr.tolist()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def one_run(arm: str, seed: int, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training
    from akod_ray.training.schedule_source import fixed_source

    cfg = run_config(arm, seed, args.budget, args.out, science_overrides(args))
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # an unfinished run starts over
    data = training_data(cfg)
    start = initial_fid(cfg, data)
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg.diffusion.schedule == "akod":
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        from akod_ray.rl.driver import train_akod_local

        last = train_akod_local(cfg, data)
    else:
        last = run_training(cfg, data, LocalEnv(cfg.run_dir, cfg.train.num_to_keep), cfg.run_dir, fixed_source(cfg))
    out = {"arm": arm, "seed": seed, "budget": args.budget, "run_wall_s": time.perf_counter() - t0,
           "run_cpu_s": time.process_time() - c0, "last": last, "loadavg": loadavg(),
           "choices": {"prior": args.prior, "laplace_scale": args.laplace_scale, "reward_metric": args.reward_metric,
                       "sampler": args.sampler}}
    out["records"] = [start, *read_jsonl(cfg.run_dir / "metrics.jsonl")]
    out["steps"] = last.get("step")
    out["images"] = last.get("step", 0) * cfg.train.batch_size
    out.update(final_fid(cfg, args.final_n, seed))
    if cfg.diffusion.schedule == "akod":
        rl = cfg.run_dir / "rl"
        out["posted"] = read_jsonl(rl / "posted.jsonl")
        for p in out["posted"]:
            for key in ("loss_profile", "before_profile", "after_profile", "profile_logsnr"):
                p.pop(key, None)
        out["iterations"] = read_jsonl(rl / "iterations.jsonl")
        out["samples_per_run"] = sum(int(i.get("samples_trained") or 0) for i in out["iterations"])
        out.update(policy_gain(cfg, data, args.gain_steps, args.gain_reps))
    return out


def plan(args) -> list[tuple[str, int]]:
    """Seed by seed, every arm in turn, the order rotated from seed to seed: the two workers take
    alternate entries, so every arm runs beside every other under the same load."""
    out = []
    for i, seed in enumerate(args.seeds):
        k = i % len(args.arms)
        out += [(arm, seed) for arm in args.arms[k:] + args.arms[:k]]
    return out


def worker(index: int, count: int, args) -> None:
    for i, (arm, seed) in enumerate(plan(args)):
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
    ap.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    ap.add_argument("--budget", type=float, default=360.0, help="CPU seconds of training per run (every arm)")
    ap.add_argument("--prior", default="laplace", help="dko.prior of the learned arms (the pilot's best anchor)")
    ap.add_argument("--laplace-scale", type=float, default=1.0, help="diffusion.laplace_scale (the pilot's choice)")
    ap.add_argument("--reward-metric", default="eps_uniform", help="rl.reward_metric (the pilot's choice)")
    ap.add_argument("--sampler", default=REFEREE_SAMPLER, help="the referee's sampler at 20 network evaluations "
                    "(default: the best at 20 by bench/sampling.py; version 2 of this experiment ran with ddim)")
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
    run_workers(__file__, args, worker)


if __name__ == "__main__":
    main()
