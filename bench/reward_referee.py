"""Which reward predicts the referee? And which laplace scale, and which sampling grid?

The pilot of issue 16 ("AKOD v2"), on the experiment's own config (bench/akod_science.py's
BASE: real CIFAR-10, the tiny U-Net, one thread, a CPU-time budget):

1. Train the fixed arms baseline (linear), cosine, loglinear, edm and laplace at scales
   0.75, 1 and 2 (``--scales``) for ``--budget`` CPU-seconds each, keeping a checkpoint every
   ``--ckpt-every`` steps.
2. Score every checkpoint by the referee, fid_c10 (N = ``--n``, DDIM-20 from the same noise, on
   the common grid and on the arm's own schedule), and by every candidate reward:
   - the five weightings of the epsilon-MSE profile (akod_ray/rl/reward.py: eps_uniform, x0,
     eps_edm, eps_laplace, eps_sigmoid) on ``--profile-images`` held-out images x 32 log-SNR
     points with fixed noise;
   - a small-N fid_c10 (N = 200, DDIM-10, common grid);
   - ``denoised_features``: the mean squared distance, in the fid_c10 classifier's feature space,
     between held-out images and their one-step denoised versions at log-SNR -2, 0 and 2.
3. ``--report``: the Spearman rank correlation of each candidate with fid_c10 (common grid) over
   all checkpoints, and within each budget (across arms: what a schedule choice needs); the
   laplace scale with the lowest fid_c10 at equal images (the largest checkpoint step every run
   has); own grid against common grid per arm; the cost of each candidate. Writes bench/reward_referee/report.md and summary.json, and merges
   ``reward_vs_fid_c10_spearman`` (for the metric rl.reward_metric uses by default) into
   bench/results.json.

Resumable: each run's checkpoints stay under bench/reward_referee/runs/<arm>; each scored
checkpoint writes bench/reward_referee/scores/<arm>_<step>.json and is skipped next time.

    .venv/bin/python bench/reward_referee.py --workers 2      # about 30 minutes on 2 cores
    .venv/bin/python bench/reward_referee.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, ROOT, merge_results, meta_record, run_workers  # noqa: E402

OUT = ROOT / "bench" / "reward_referee"
ARMS = ["baseline", "cosine", "loglinear", "edm", "laplace"]
SCALES = [0.75, 1.0, 2.0]
METRICS = ("eps_uniform", "x0", "eps_edm", "eps_laplace", "eps_sigmoid")
CANDIDATES = METRICS + ("fid_c10_small", "denoised_features")
DENOISE_LOGSNR = (-2.0, 0.0, 2.0)


def plan(args) -> list[tuple[str, list[str]]]:
    """(run name, extra overrides) of every pilot run."""
    runs = []
    for arm in args.arms:
        if arm == "laplace":
            runs += [(f"laplace_b{b:g}", [f"diffusion.laplace_scale={b}"]) for b in args.scales]
        else:
            runs.append((arm, []))
    return runs


def arm_of(name: str) -> str:
    return name.split("_b")[0]


def pilot_config(name: str, extra: list[str], args):
    from akod_science import run_config

    return run_config(arm_of(name), args.seed, args.budget, args.out, [
        f"run.name={name}", f"train.ckpt_every={args.ckpt_every}", "train.num_to_keep=100", "eval.fid_every=0",
        *extra, *args.set])


# ----------------------------------------------------------------- 1. training


def train(name: str, extra: list[str], args) -> None:
    import torch

    torch.set_num_threads(1)
    from akod_science import training_data

    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training
    from akod_ray.training.schedule_source import fixed_source

    cfg = pilot_config(name, extra, args)
    done = cfg.run_dir / "done.json"
    if done.exists():
        return
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # an unfinished run starts over
    t0 = time.perf_counter()
    last = run_training(cfg, training_data(cfg), LocalEnv(cfg.run_dir, 100), cfg.run_dir, fixed_source(cfg))
    done.write_text(json.dumps({"last": last, "wall_s": time.perf_counter() - t0}))


# ----------------------------------------------------------------- 2. scoring


def profile_scores(model, process, cfg, images, bf16: bool) -> tuple[dict, float]:
    """The five weighted metrics of a 32-point epsilon-MSE profile (fixed noise); and its seconds."""
    from akod_ray.rl.reward import metric_value
    from akod_ray.training.loop import reference_process
    from akod_ray.training.step import ReferenceProtocol

    t = time.perf_counter()
    probe = ReferenceProtocol(reference_process(cfg), images, 32, seed=77, batch=256)
    profile = probe.profile(model, bf16)
    scores = {m: metric_value(m, profile, probe.grid_logsnr) for m in METRICS}
    return scores, time.perf_counter() - t


def denoised_features(model, process, cfg, images, bf16: bool) -> tuple[float, float]:
    """Mean squared classifier-feature distance between x_0 and its one-step denoised x0_hat."""
    import torch

    from akod_ray.diffusion.samplers import Denoiser
    from akod_ray.evaluation.fid import c10_activations

    t = time.perf_counter()
    g = torch.Generator().manual_seed(99)
    clean = torch.from_numpy(c10_activations(images))
    den = Denoiser(model, process, clip_x0=True, bf16=bf16)
    total = 0.0
    with torch.no_grad():
        for lam in DENOISE_LOGSNR:
            a = 1.0 / (1.0 + math.exp(-lam))
            x_t = a**0.5 * images + (1 - a) ** 0.5 * torch.randn(images.shape, generator=g)
            _, x0_hat = den.at_logsnr(x_t, lam)
            total += float(((torch.from_numpy(c10_activations(x0_hat)) - clean) ** 2).sum(1).mean())
    return total / len(DENOISE_LOGSNR), time.perf_counter() - t


def fid(model, process, cfg, n: int, steps: int, grid: str, seed: int) -> tuple[float, float]:
    import torch

    from akod_ray.evaluation.fid import default_c10_reference, fid_c10
    from akod_ray.evaluation.sampling import sample_as_configured

    t = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    images = sample_as_configured(cfg, model, process, n, g, "cpu", sampler="ddim", steps=steps, grid=grid)
    value = fid_c10(images.float(), default_c10_reference())
    return value, time.perf_counter() - t


def score(name: str, extra: list[str], args) -> None:
    import torch

    torch.set_num_threads(1)
    from akod_ray.data.parquet import load_images, to_model_range
    from akod_ray.training.checkpoint import CHECKPOINT_RE, load_for_sampling, load_state

    cfg = pilot_config(name, extra, args)
    images = to_model_range(load_images(str(DATA_DIR), "test", count=args.profile_images, seed=1000)).float()
    for ckpt in sorted(p for p in cfg.run_dir.iterdir() if CHECKPOINT_RE.match(p.name)):
        step = int(CHECKPOINT_RE.match(ckpt.name).group(1))
        dest = args.out / "scores" / f"{name}_{step:08d}.json"
        if dest.exists():
            continue
        model, process, ckpt_cfg = load_for_sampling(ckpt)
        bf16 = ckpt_cfg.train.bf16
        out = {"run": name, "arm": arm_of(name), "step": step, "budget_s": load_state(ckpt)["budget_s"], "cost_s": {}}
        for grid in ("common", "own"):
            out[f"fid_c10_{grid}"], out["cost_s"][f"fid_c10_{grid}"] = fid(model, process, ckpt_cfg, args.n, 20, grid, 5)
        out["fid_c10_small"], out["cost_s"]["fid_c10_small"] = fid(model, process, ckpt_cfg, 200, 10, "common", 6)
        scores, out["cost_s"]["profile"] = profile_scores(model, process, ckpt_cfg, images, bf16)
        out.update(scores)
        out["denoised_features"], out["cost_s"]["denoised_features"] = denoised_features(model, process, ckpt_cfg,
                                                                                        images, bf16)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(dest)
        print(f"[pilot] {name} step {step}: fid_c10 {out['fid_c10_common']:.2f} (own grid {out['fid_c10_own']:.2f})",
              flush=True)


# ----------------------------------------------------------------- 3. report


def spearman(xs, ys) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic) if len(xs) >= 3 else math.nan


def report(args) -> dict:
    from akod_ray.config import RLConfig

    rows = [json.loads(p.read_text()) for p in sorted((args.out / "scores").glob("*.json"))]
    if not rows:
        raise SystemExit(f"no scored checkpoints under {args.out / 'scores'}")
    referee = [r["fid_c10_common"] for r in rows]
    steps = sorted({r["step"] for r in rows})
    corr = {}
    for c in CANDIDATES:
        within = [spearman([r[c] for r in rows if r["step"] == s], [r["fid_c10_common"] for r in rows if r["step"] == s])
                  for s in steps]
        within = [w for w in within if math.isfinite(w)]
        corr[c] = {"all": spearman([r[c] for r in rows], referee),
                   "within_budget_mean": sum(within) / len(within) if within else math.nan,
                   "within_budget": within}
    cost = {k: sum(r["cost_s"][k] for r in rows) / len(rows) for k in rows[0]["cost_s"]}
    final_step = {r["run"]: max(x["step"] for x in rows if x["run"] == r["run"]) for r in rows}
    finals = {r["run"]: r for r in rows if r["step"] == final_step[r["run"]]}
    # equal images: the largest checkpoint step every run has (a CPU-time budget buys more or fewer steps
    # as the load beside a run changes, so the finals differ in steps as well as in schedule)
    common_step = max(s for s in steps if all(any(x["run"] == name and x["step"] == s for x in rows) for name in finals))
    at_common = {r["run"]: r for r in rows if r["step"] == common_step}
    laplace = {name: r["fid_c10_common"] for name, r in at_common.items() if r["arm"] == "laplace"}
    best_scale = min(laplace, key=laplace.get) if laplace else None
    default_metric = RLConfig().reward_metric
    summary = {"checkpoints": len(rows), "steps": steps, "spearman": corr, "mean_cost_s": cost,
               "final": {name: {k: r[k] for k in ("step", "fid_c10_common", "fid_c10_own", *CANDIDATES)}
                         for name, r in finals.items()},
               "common_step": common_step,
               "at_common_step": {name: {k: r[k] for k in ("fid_c10_common", "fid_c10_own")} for name, r in at_common.items()},
               "laplace_best": best_scale, "reward_metric_default": default_metric}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["# Which reward predicts the referee (bench/reward_referee.py)", "",
             f"{len(rows)} checkpoints of {len(finals)} fixed-schedule runs (seed {args.seed}, "
             f"{args.budget:g} CPU-s each, a checkpoint every {args.ckpt_every} steps); referee: fid_c10 "
             f"(N = {args.n}, DDIM-20, common grid, the same starting noise for every checkpoint).", "",
             "| candidate | Spearman, all checkpoints | Spearman within a budget (mean over budgets) | seconds per evaluation |",
             "|---|---|---|---|"]
    for c in CANDIDATES:
        key = "profile" if c in METRICS else c
        lines.append(f"| {c} | {corr[c]['all']:.3f} | {corr[c]['within_budget_mean']:.3f} | {cost.get(key, math.nan):.2f} |")
    lines += ["", f"fid_c10 on the common grid and on the arm's own schedule as its grid, at step {common_step} (equal "
                  "images, the largest checkpoint step every run has) and at the end of the budget:", "",
              f"| run | common grid, step {common_step} | own grid, step {common_step} | final step | common grid, final "
              "| own grid, final |", "|---|---|---|---|---|---|"]
    for name, r in sorted(at_common.items(), key=lambda kv: kv[1]["fid_c10_common"]):
        f = finals[name]
        lines.append(f"| {name} | {r['fid_c10_common']:.2f} | {r['fid_c10_own']:.2f} | {f['step']} | "
                     f"{f['fid_c10_common']:.2f} | {f['fid_c10_own']:.2f} |")
    if best_scale:
        lines += ["", f"Laplace scale with the lowest fid_c10 at step {common_step}: **{best_scale}** "
                      f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(laplace.items()))})."]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.out.resolve() == OUT.resolve():
        merge_results({"reward_vs_fid_c10_spearman": corr[default_metric]["all"],
                       "reward_vs_fid_c10_spearman_within_budget": corr[default_metric]["within_budget_mean"],
                       "reward_vs_fid_c10_spearman_by_candidate": {c: corr[c]["all"] for c in CANDIDATES}},
                      meta_record(script="bench/reward_referee.py"))
    return summary


# ----------------------------------------------------------------- driver


def worker(index: int, count: int, args) -> None:
    runs = plan(args)
    for i, (name, extra) in enumerate(runs):  # train first, then score, so both workers stay busy
        if i % count == index:
            print(f"[pilot] worker {index}: train {name} ({time.strftime('%H:%M:%S')})", flush=True)
            train(name, extra, args)
    for i, (name, extra) in enumerate(runs):
        if i % count == index:
            score(name, extra, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arms", nargs="+", default=ARMS)
    ap.add_argument("--scales", nargs="+", type=float, default=SCALES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=240.0, help="CPU seconds of training per run")
    ap.add_argument("--ckpt-every", type=int, default=400)
    ap.add_argument("--n", type=int, default=1000, help="fid_c10 samples of the referee")
    ap.add_argument("--profile-images", type=int, default=96)
    ap.add_argument("--set", action="append", default=[], help="extra config override (tests, quick runs)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        report(args)
        return
    run_workers(__file__, args, worker)


if __name__ == "__main__":
    main()
