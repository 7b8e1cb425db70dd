"""The paper's question at the largest scale this 2-core CPU allows, version 3 (issue 21): does a
PPO-learned, data-adaptive training distribution train faster than strong fixed ones, and than online
adaptation without RL?

Design:
- Arms (``--arms``): ``laplace`` and ``edm`` (fixed anchors), ``importance`` and ``edm2`` (online adaptation
  without RL on the laplace table: a loss-history importance sampler; EDM2's learned uncertainty weighting),
  ``msfi_only`` (the AKOD U-Net on the laplace table: the network's own effect), ``dko_frozen`` (the learner's
  exploration without its updates: the price of exploring), ``dko_only`` (plain U-Net, learned) and ``akod``
  (AKOD U-Net, learned); seeds 0-4 (``--seeds``); real CIFAR-10 (all 50,000 training images).
- The same budget for every arm: ``--budget`` seconds of the run process's CPU time, one torch thread per
  run (``train.budget_clock=cpu``); everything but evaluation counts (the credits, the probe gradient, PPO's
  updates: the whole AKOD arm runs in one process, ``akod_ray.rl.driver.train_akod_local``). Two runs side by
  side (``--workers 2``), the arms interleaved in time so the load beside a run hits every arm alike. A second
  budget is the same command with ``--budget 720 --out bench/akod_science/budget2x``.
- The referee is fid_c10 (the shipped CIFAR-10 classifier's Frechet distance, never called FID) on the common
  sampling grid (uniform in log-SNR between the shared endpoints: every arm is sampled the same way, so the
  comparison judges training only), ``--sampler`` at 20 evaluations, x0 clipped: at step 0 and every
  ``eval.fid_every`` steps with N = 500 during the run (the curves and time-to-target), and N = 2,000 from the
  final EMA weights, on the common grid and on the arm's own schedule as its grid.
- The DKO (v3, docs/design.md): a distribution over 32 bins of the laplace prior's steps, per image from its
  sigma_local, exploring by being the training distribution; one reward per decision (the credit of
  akod_ray/training/credit.py), ``rl.decision_images`` images every ``rl.decision_every`` steps of 30-step
  windows; PPO with a pull towards the prior (``rl.kl_coeff``). Recorded: the decisions that reached PPO, the
  share of the budget learning cost, the distribution the trunk trained on (realised and intended) against the
  prior, PPO's iterations.
- PPO's learning: from each learned run's final checkpoint, the fixed reward probe's relative fall under the
  final exported distribution against the prior's, paired with common random numbers, ``--gain-reps`` draws
  of ``--gain-steps`` branch steps; the seeds are the independent units.

Runs are resumable: each finished run writes ``<out>/results/<arm>_s<seed>.json`` and is skipped on the next
invocation; an unfinished run starts over. ``--report`` aggregates (akod_science_report.py).

    .venv/bin/python bench/akod_science.py --workers 2          # the runs (hours)
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

ARMS = ["laplace", "edm", "importance", "edm2", "msfi_only", "dko_frozen", "dko_only", "akod"]
# bench-only arms: an ARM_SPECS arm + overrides. dko_null: the null-reward control at the experiment's scale (the
# credits shuffled among each window's decisions before PPO sees them: it must stay at the prior)
VARIANTS: dict[str, tuple[str, list[str]]] = {"dko_null": ("dko_only", ["rl.null_reward=shuffle"])}
LEARNED = ("dko_only", "akod", "dko_frozen", "dko_null")  # arms whose distribution comes from the DKO
SEEDS = [0, 1, 2, 3, 4]
OUT = ROOT / "bench" / "akod_science"
REFEREE_SAMPLER = "heun"  # the best sampler at 20 evaluations by bench/sampling.py (BENCHMARKS.md, "Sampling")

BASE = [  # the experiment's config (set here so the bench is self-contained)
    "model.channels=[16,32,32,64]", "model.bottleneck_channels=64", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "model.dropout=0.0",
    "diffusion.T=1000",
    "dko.kernel_size=7", "dko.bins=32", "dko.floor=0.2", "dko.probe_pool=512",
    "data.source=cifar10", "data.val_size=96",
    "train.batch_size=32", "train.lr=0.0005", "train.warmup_steps=100", "train.ema_decay=0.995",
    "train.bf16=true", "train.num_workers=1", "train.cpus_per_worker=1", "train.log_every=300",
    "train.ckpt_every=1200", "train.sample_every=100000", "train.num_to_keep=4", "train.budget_clock=cpu",
    "train.ref_grid=8", "train.val_batch=96",
    "rl.segment_steps=30", "rl.decision_every=4", "rl.decision_images=8", "rl.train_batch=4", "rl.minibatch_size=96",
    "rl.num_epochs=4", "rl.lr=0.0003", "rl.reward=credit", "rl.reward_images=8", "rl.reward_grid=8",
    "rl.probe_pairs=32", "rl.broker_timeout_s=900",
    "eval.sampler_steps=20", "eval.sampling_grid=common", "eval.fid_every=400",
    "eval.fid_samples=500", "eval.grid_size=4",
]


def arm_spec(arm: str) -> tuple[str, list[str]]:
    """(the ARM_SPECS arm, extra overrides) of an experiment arm."""
    return VARIANTS.get(arm, (arm, []))


def step_cap(budget: float) -> int:
    """train.steps for a budget: a cap that never binds (6,000 at 360 CPU-s, where runs reach 3,300-4,900 steps), so
    every budget ends on its clock; a fixed cap of 6,000 would stop a 720 s run at 6,000 steps on every arm alike."""
    return int(round(6000 * max(budget, 360.0) / 360.0))


def run_config(arm: str, seed: int, budget: float, out: Path, extra: list[str]):
    from akod_ray.config import ARM_SPECS, load_config

    base_arm, variant = arm_spec(arm)
    spec = ARM_SPECS[base_arm]
    switches = [f"{section}.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for section, fields in spec.switches().items() for k, v in fields.items()]
    sets = [*BASE, f"data.data_dir={DATA_DIR}", f"run.root={out / 'runs'}", f"run.name={arm}_s{seed}",
            f"train.seed={seed}", f"data.seed={seed}", f"train.max_wall_s={budget}", f"train.steps={step_cap(budget)}",
            *switches,
            f"diffusion.min_snr_gamma={5.0 if spec.min_snr else 'null'}", *extra, *variant]
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
    from akod_ray.sweep.trial import REFEREE_SEED, samples_fid_c10
    from akod_ray.training.checkpoint import latest_checkpoint, load_for_sampling

    model, process, _ = load_for_sampling(latest_checkpoint(cfg.run_dir))
    return {"fid_c10_final": samples_fid_c10(cfg, model, process, n, REFEREE_SEED + seed, "common"),
            "fid_c10_final_own_grid": samples_fid_c10(cfg, model, process, n, REFEREE_SEED + seed, "own"),
            "fid_c10_final_n": n}


def policy_gain(cfg, data, steps: int, reps: int) -> dict:
    """Paired reward of the final learned distribution against the prior's, from the final checkpoint: each
    draw trains both (uniform t on the exported schedule, which trains on the DKO's marginal; and on the prior
    anchor) from the same weights with the same batches, t and noise draws, and scores the fixed reward probe's
    relative fall (x 100)."""
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import load_schedule
    from akod_ray.rl.worker_source import prior_process
    from akod_ray.training.checkpoint import latest_checkpoint, load_state
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import FixedSchedule, TrainingRun

    state = load_state(latest_checkpoint(cfg.run_dir))
    final = DiffusionProcess(load_schedule(cfg.run_dir / "schedule.json", cfg.diffusion.T))
    prior = prior_process(cfg)
    run = TrainingRun(cfg, data, LocalEnv(cfg.run_dir), cfg.run_dir, FixedSchedule(state["betas"]))
    run.resume()
    before = run.reward_profile()["probe_loss"]
    pairs = []
    for r in range(reps):
        scores = {}
        for name, process in (("prior", prior), ("final", final)):
            after = run.branch(process, steps, salt=100 + r)["after_profile"]
            scores[name] = 100.0 * (before - sum(after) / len(after)) / before
        pairs.append(scores)
    return {"gain_pairs": pairs, "gain_steps": steps}


def distribution_record(cfg) -> dict:
    """What the DKO's trunk trained on, against the prior: per-window intended and realised bin counts,
    W1 (log-SNR) of the run's averages and of the exported final schedule to the prior, the decisions."""
    import numpy as np
    import torch
    from scipy.stats import wasserstein_distance

    from akod_ray.diffusion.dko import NoiseBins, w1_logsnr
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import load_schedule
    from akod_ray.rl.worker_source import prior_process

    posted = read_jsonl(cfg.run_dir / "rl" / "posted.jsonl")
    bins = NoiseBins(cfg.diffusion.T, cfg.dko.bins)
    lam = prior_process(cfg).log_snr
    prior = bins.step_distribution(bins.mass)
    realised = torch.tensor([p["realised"] for p in posted]).sum(0)
    intended = torch.tensor([p["intended"] for p in posted]).sum(0)
    final = DiffusionProcess(load_schedule(cfg.run_dir / "schedule.json", cfg.diffusion.T)).log_snr
    rewards = [r for p in posted for r in p["rewards"]]
    return {
        "windows": [{"step": p["step"], "reward_mean": float(np.mean(p["rewards"])), "probe_loss": p["probe_loss"],
                     "realised": p["realised"], "intended": p["intended"]} for p in posted],
        "decisions_per_run": len(rewards),
        "w1_realised_vs_prior": w1_logsnr(bins.step_distribution(realised), prior, lam),
        "w1_intended_vs_prior": w1_logsnr(bins.step_distribution(intended), prior, lam),
        "w1_realised_vs_intended": w1_logsnr(bins.step_distribution(realised), bins.step_distribution(intended), lam),
        "w1_final_vs_prior": float(wasserstein_distance(final.numpy(), lam.numpy())),
        "final_logsnr": final.tolist(), "prior_logsnr": lam.tolist(),
        "realised_bins": realised.tolist(), "intended_bins": intended.tolist(),
    }


def adaptation_record(cfg) -> dict:
    """The importance sampler's final proposal over its bins, or EDM2's learned u(lambda) on a grid."""
    import torch

    from akod_ray.training.checkpoint import latest_checkpoint, load_state

    state = load_state(latest_checkpoint(cfg.run_dir))
    if cfg.diffusion.adaptation == "importance":
        from akod_ray.training.adaptation import ImportanceSampler

        d = cfg.diffusion
        sampler = ImportanceSampler(d.T, d.adaptation_bins, d.adaptation_floor, d.adaptation_decay, "cpu")
        sampler.load_state_dict(state["schedule_source"]["sampler"])
        return {"proposal": sampler.proposal().tolist(), "mass": sampler.mass.tolist()}
    if cfg.diffusion.adaptation == "edm2":
        from akod_ray.training.adaptation import EDM2Weighting

        w = EDM2Weighting(cfg.train.lr)
        w.load_checkpoint_state(state["objective"])
        lam = torch.linspace(cfg.dko.logsnr_max, cfg.dko.logsnr_min, 64)
        with torch.no_grad():
            return {"logsnr": lam.tolist(), "log_variance": w.log_variance(lam).tolist()}
    return {}


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
    out["adaptation"] = adaptation_record(cfg)
    if cfg.diffusion.schedule == "akod":
        out["iterations"] = read_jsonl(cfg.run_dir / "rl" / "iterations.jsonl")
        out["distribution"] = distribution_record(cfg)
        out["samples_per_run"] = out["distribution"]["decisions_per_run"]
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
    ap.add_argument("--laplace-scale", type=float, default=0.75, help="diffusion.laplace_scale (the pilot's choice)")
    ap.add_argument("--reward-metric", default="eps_laplace", help="rl.reward_metric (the pilot's choice)")
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
