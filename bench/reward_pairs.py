"""Does the reward order decisions the way the referee does? (issue 21, item 5)

Version 2 checked the reward by ranking checkpoints of different budgets (training progress) by the
metric's level. That does not show that the reward prefers the *decisions* fid_c10 prefers. Here each
decision is a training distribution the DKO can express (a reweighting of the laplace prior's bins, or an
anchor), trained from the same checkpoint for the same number of steps with the same batches and noise
draws (common random numbers; ``Trunk.branch``). For every pair of them:

- the reward's verdict: the relative fall of the reward probe's metric M over the branch
  (rl.reward_metric at its quantiles, akod_ray/training/credit.py: what the per-decision credits add up
  to, to first order), the higher the better;
- the referee's verdict: fid_c10 of the branch's EMA weights (N = ``--n``, the experiment's sampler at 20
  evaluations, the common grid, the same starting noise for every branch), the lower the better.

``reward_vs_fid_c10_pair_agreement`` is the share of pairs on whose order the two agree; pairs whose
fid_c10 difference is within the referee's own noise (twice the standard error of the difference of two
split halves) are reported separately. The checkpoints are the laplace arm of the experiment's config at
``--steps`` (trained if missing; bench/akod_credit_signal.py trains the same one).

    .venv/bin/python bench/reward_pairs.py           # ~40 CPU-minutes
    .venv/bin/python bench/reward_pairs.py --report  # the table again from the recorded branches
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, loadavg, write_figures  # noqa: E402

OUT = ROOT / "bench" / "reward_pairs"


def candidates(J: int) -> dict[str, list[float] | str]:
    """The decisions: bin weights (relative to the prior's masses) or an anchor's name."""
    up = lambda bins, f=3.0: [f if j in bins else 1.0 for j in range(J)]  # noqa: E731
    q = J // 4
    return {
        "prior": [1.0] * J,
        "clean x3": up(range(0, q)),
        "noisy x3": up(range(J - q, J)),
        "centre x3": up(range(J // 2 - q // 2, J // 2 + q // 2)),
        "tails x3": up(list(range(0, q // 2)) + list(range(J - q // 2, J))),
        "clean-mid x3": up(range(q, 2 * q)),
        "noisy-mid x3": up(range(2 * q, 3 * q)),
        "loglinear": "loglinear",
        "edm": "edm",
    }


def branch_process(cfg, spec, bins, prior_logsnr):
    import torch

    from akod_ray.diffusion.dko import quantile_schedule
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import anchor_betas

    if isinstance(spec, str):
        d = cfg.diffusion
        return DiffusionProcess(anchor_betas(spec, d.T, cfg.dko.logsnr_max, cfg.dko.logsnr_min, d.laplace_scale))
    probs = bins.mass * torch.tensor(spec, dtype=torch.float64)
    return DiffusionProcess(quantile_schedule(bins.step_distribution(probs / probs.sum()), prior_logsnr))


def run_checkpoint(args, steps_at: int) -> list[dict]:
    import torch

    from akod_science import run_config, training_data

    from akod_ray.diffusion.dko import NoiseBins
    from akod_ray.evaluation.fid import c10_activations, default_c10_reference, frechet_distance, statistics
    from akod_ray.evaluation.sampling import sample_as_configured
    from akod_ray.training.checkpoint import latest_checkpoint
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import FixedSchedule, TrainingRun, run_training
    from akod_ray.training.schedule_source import fixed_source

    torch.set_num_threads(1)
    extra = [f"train.steps={steps_at}", f"train.ckpt_every={steps_at}", "eval.fid_every=0", f"eval.sampler={args.sampler}",
             f"diffusion.laplace_scale={args.laplace_scale}", f"run.name=laplace_{steps_at}"]
    cfg = run_config("laplace", args.seed, 1e9, args.out, extra)
    data = training_data(cfg)
    if latest_checkpoint(cfg.run_dir) is None:
        print(f"[pairs] training the checkpoint: laplace, {steps_at} steps", flush=True)
        run_training(cfg, data, LocalEnv(cfg.run_dir, 2), cfg.run_dir, fixed_source(cfg))
    bins = NoiseBins(cfg.diffusion.T, cfg.dko.bins)
    out_path = args.out / "branches" / f"step{steps_at}.json"
    done = json.loads(out_path.read_text()) if out_path.exists() else []
    seen = {r["decision"] for r in done}
    run = TrainingRun(cfg, data, LocalEnv(cfg.run_dir), cfg.run_dir, FixedSchedule(fixed_source(cfg).process.betas))
    run.resume()
    prior_logsnr = run.schedules.process.log_snr
    before = run.reward_profile()["probe_loss"]
    ref = default_c10_reference()
    for name, spec in candidates(bins.J).items():
        if name in seen:
            continue
        t0 = time.process_time()
        process = branch_process(cfg, spec, bins, prior_logsnr)

        def sample(trunk):  # the branch's EMA weights, the same starting noise for every branch
            return sample_as_configured(cfg, trunk._eval_model(), process, args.n, torch.Generator().manual_seed(12345),
                                        "cpu", grid="common")

        out = run.branch(process, args.branch_steps, salt=7, inspect=sample)
        after = sum(out["after_profile"]) / len(out["after_profile"])
        acts = c10_activations(out["inspected"].float())
        halves = [frechet_distance(statistics(a, "samples", ref.implementation), ref) for a in np.array_split(acts, 2)]
        rec = {"decision": name, "step": steps_at, "probe_before": before, "probe_after": after,
               "reward": 100.0 * (before - after) / before,
               "fid_c10": frechet_distance(statistics(acts, "samples", ref.implementation), ref),
               "fid_c10_halves": halves, "n": args.n, "cpu_s": time.process_time() - t0}
        done.append(rec)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(done, indent=1))
        print(f"[pairs] step {steps_at} {name}: reward {rec['reward']:+.3f}, fid_c10 {rec['fid_c10']:.3f} "
              f"({rec['cpu_s']:.0f} CPU-s)", flush=True)
    return done


def agreement(records: list[dict]) -> dict:
    pairs = []
    for a, b in itertools.combinations(records, 2):
        d_reward = a["reward"] - b["reward"]
        d_fid = a["fid_c10"] - b["fid_c10"]
        # the referee's noise on this difference: the halves' spread (the same halves are paired: same noise)
        d_half = [ha - hb for ha, hb in zip(a["fid_c10_halves"], b["fid_c10_halves"])]
        se = abs(d_half[0] - d_half[1]) / 2  # the standard error of the mean of two halves' difference
        pairs.append({"a": a["decision"], "b": b["decision"], "d_reward": d_reward, "d_fid": d_fid,
                      "agree": (d_reward > 0) == (d_fid < 0), "resolved": abs(d_fid) > 2 * max(se, 1e-9)})
    resolved = [p for p in pairs if p["resolved"]]
    return {"pairs": len(pairs), "agreement": float(np.mean([p["agree"] for p in pairs])) if pairs else None,
            "resolved_pairs": len(resolved),
            "agreement_resolved": float(np.mean([p["agree"] for p in resolved])) if resolved else None,
            "detail": pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", nargs="+", type=int, default=[1000, 2000], help="checkpoint steps of the laplace arm")
    ap.add_argument("--branch-steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=1000, help="samples of each branch's fid_c10")
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--laplace-scale", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    load0 = loadavg()
    records = []
    for s in args.steps:
        path = args.out / "branches" / f"step{s}.json"
        records.append(json.loads(path.read_text()) if args.report and path.exists() else run_checkpoint(args, s))
    per = [agreement(r) for r in records]
    pooled_pairs = [p for a in per for p in a["detail"]]
    summary = {"pairs": len(pooled_pairs), "agreement": float(np.mean([p["agree"] for p in pooled_pairs])),
               "resolved_pairs": sum(p["resolved"] for p in pooled_pairs),
               "agreement_resolved": float(np.mean([p["agree"] for p in pooled_pairs if p["resolved"]]))
               if any(p["resolved"] for p in pooled_pairs) else None,
               "per_checkpoint": {s: {k: v for k, v in a.items() if k != "detail"} for s, a in zip(args.steps, per)},
               "branches": records, "pairs_detail": pooled_pairs}
    print(json.dumps({k: v for k, v in summary.items() if k not in ("branches", "pairs_detail")}, indent=1))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_figures("reward_pairs", {
        "reward_vs_fid_c10_pair_agreement": round(summary["agreement"], 4),
        "reward_vs_fid_c10_pair_agreement_resolved": (round(summary["agreement_resolved"], 4)
                                                      if summary["agreement_resolved"] is not None else None),
        "reward_vs_fid_c10_pairs": summary["pairs"],
    }, {k: v for k, v in summary.items() if k != "branches"}, load0)


if __name__ == "__main__":
    main()
