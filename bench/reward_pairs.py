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

``reward_vs_fid_c10_pair_agreement`` is the share of pairs on whose order the two agree, also split into the
pairs of two reweightings of the prior (the DKO's fine decisions) and the pairs with an anchor (large moves).
The prior is trained a second time with other batches' noise draws (``prior (replicate)``): the two copies'
differences in reward and in fid_c10 are what the training noise alone does, and pairs whose fid_c10
difference is beyond it are counted separately (``_resolved``). The checkpoints are the laplace arm of the
experiment's config at ``--steps`` (trained if missing).

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
        REPLICATE: [1.0] * J,  # the prior again, with other noise draws: the training noise's own size
    }


REPLICATE = "prior (replicate)"
ANCHORS = ("loglinear", "edm")


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

        out = run.branch(process, args.branch_steps, salt=8 if name == REPLICATE else 7, inspect=sample)
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


def share(pairs: list[dict]) -> float | None:
    return float(np.mean([p["agree"] for p in pairs])) if pairs else None


def agreement(records: list[dict]) -> dict:
    by = {r["decision"]: r for r in records}
    rep = by.get(REPLICATE)
    noise_fid = abs(by["prior"]["fid_c10"] - rep["fid_c10"]) if rep else 0.0
    noise_reward = abs(by["prior"]["reward"] - rep["reward"]) if rep else 0.0
    pairs = []
    for a, b in itertools.combinations([r for r in records if r["decision"] != REPLICATE], 2):
        d_reward, d_fid = a["reward"] - b["reward"], a["fid_c10"] - b["fid_c10"]
        pairs.append({"a": a["decision"], "b": b["decision"], "d_reward": d_reward, "d_fid": d_fid,
                      "agree": (d_reward > 0) == (d_fid < 0), "resolved": abs(d_fid) > noise_fid,
                      "anchor": a["decision"] in ANCHORS or b["decision"] in ANCHORS})
    return {"pairs": len(pairs), "agreement": share(pairs),
            "reweightings": share([p for p in pairs if not p["anchor"]]),
            "with_an_anchor": share([p for p in pairs if p["anchor"]]),
            "resolved_pairs": sum(p["resolved"] for p in pairs), "agreement_resolved": share([p for p in pairs if p["resolved"]]),
            "training_noise_fid_c10": noise_fid, "training_noise_reward": noise_reward, "detail": pairs}


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
    summary = {"pairs": len(pooled_pairs), "agreement": share(pooled_pairs),
               "reweightings": share([p for p in pooled_pairs if not p["anchor"]]),
               "with_an_anchor": share([p for p in pooled_pairs if p["anchor"]]),
               "resolved_pairs": sum(p["resolved"] for p in pooled_pairs),
               "agreement_resolved": share([p for p in pooled_pairs if p["resolved"]]),
               "per_checkpoint": {s: {k: v for k, v in a.items() if k != "detail"} for s, a in zip(args.steps, per)},
               "branches": records, "pairs_detail": pooled_pairs}
    print(json.dumps({k: v for k, v in summary.items() if k not in ("branches", "pairs_detail")}, indent=1))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    rounded = lambda v: round(v, 4) if v is not None else None  # noqa: E731
    write_figures("reward_pairs", {
        "reward_vs_fid_c10_pair_agreement": rounded(summary["agreement"]),
        "reward_vs_fid_c10_pair_agreement_reweightings": rounded(summary["reweightings"]),
        "reward_vs_fid_c10_pair_agreement_with_an_anchor": rounded(summary["with_an_anchor"]),
        "reward_vs_fid_c10_pair_agreement_resolved": rounded(summary["agreement_resolved"]),
        "reward_vs_fid_c10_pairs": summary["pairs"],
    }, {k: v for k, v in summary.items() if k != "branches"}, load0)


if __name__ == "__main__":
    main()
