"""Is there a signal in the per-decision credit? Measured before the experiment (issue 21, item 3).

The AKOD learner (version 3) gets one reward per decision: a training image's noise-level bin, credited
with the first-order effect of that image's share of the update on the reward probe's metric
(akod_ray/training/credit.py). A policy can only learn from it if the credit's mean differs between
bins (or with the image's sigma_local) by more than its noise, and if that difference persists while
the model trains. This script measures it on the production path: from a mid-training checkpoint of
the experiment's prior arm (laplace), the trunk trains ``--windows`` decision windows through the AKOD
worker source (BrokerSchedule, DKOWindow, the credit of akod_ray/training/credit.py) with the DKO at
its initial policy (the prior), a scripted learner drawing the decision images' bins from it (no
PPO: nothing moves), and every decision's credit is recorded. Then:

- **split-half reliability**: the per-bin mean credit in odd windows against even windows (Pearson r
  across bins, and Spearman-Brown 2r / (1 + r)); credits are centred per window first (a window's
  common factor, its probe gradient and learning rate, says nothing about bins);
- **persistence**: the same correlation between consecutive blocks of ``--block`` windows;
- **the image feature**: within bins, the slope of the centred credit on log sigma_local, and the
  cross-validated R^2 of bin means alone against bin means plus the feature (5 folds by window);
- **where the credit points**: the per-bin mean credit (bins ordered from clean to noisy).

    .venv/bin/python bench/akod_credit_signal.py            # trains the checkpoint if missing, ~15 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, loadavg, write_figures  # noqa: E402

OUT = ROOT / "bench" / "akod_credit_signal"


def checkpoint_run(args) -> Path:
    """The laplace arm of the experiment's config, trained ``--train-steps`` steps (kept for reruns)."""
    import torch

    from akod_science import run_config, training_data

    from akod_ray.training.checkpoint import latest_checkpoint
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training
    from akod_ray.training.schedule_source import fixed_source

    cfg = run_config("laplace", args.seed, 1e9, args.out, [f"train.steps={args.train_steps}",
                                                         f"train.ckpt_every={args.train_steps}", "eval.fid_every=0",
                                                         f"diffusion.laplace_scale={args.laplace_scale}"])
    if latest_checkpoint(cfg.run_dir) is None:
        torch.set_num_threads(1)
        print(f"[credit] training the checkpoint: laplace, {args.train_steps} steps", flush=True)
        run_training(cfg, training_data(cfg), LocalEnv(cfg.run_dir, 2), cfg.run_dir, fixed_source(cfg))
    return latest_checkpoint(cfg.run_dir)


def scripted_learner(broker, bins, seed: int, stop: threading.Event, log: list) -> None:
    """The frozen learner without RLlib: each window's decisions drawn from the prior's bin masses."""
    rng = np.random.default_rng(seed)
    mass = bins.mass.numpy()
    while not stop.is_set():
        try:
            state = broker.wait_state()
            if not state.get("slots"):
                return
            slots = state["slots"]
            decisions = rng.choice(len(mass), size=len(slots), p=mass / mass.sum()).tolist()
            rid = broker.submit({"decisions": decisions, "slots": slots, "context": state["context"], "dko": None,
                                 "kind": "window"})
            result = broker.wait_result(rid)
            log.append({"window": len(log), "step": result["step"], "decisions": decisions, "slots": slots,
                        "rewards": result["rewards"], "derivatives": result["derivatives"]})
        except Exception:  # noqa: BLE001 - the broker closed: the run ended
            return


def measure(args, ckpt: Path) -> list[dict]:
    import torch

    from akod_science import run_config, training_data

    from akod_ray.rl.local_broker import LocalBroker
    from akod_ray.rl.worker_source import BrokerSchedule
    from akod_ray.training.checkpoint import load_state
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training

    torch.set_num_threads(1)
    step = int(load_state(ckpt)["step"])
    cfg = run_config("dko_only", args.seed, 1e9, args.out, [
        f"train.steps={step + args.windows * args.window}", f"train.ckpt_every={args.windows * args.window}",
        "eval.fid_every=0", "train.log_every=320", f"rl.segment_steps={args.window}",
        f"rl.decision_every={args.decision_every}", f"rl.decision_images={args.images}",
        f"diffusion.laplace_scale={args.laplace_scale}", "dko.prior=laplace", f"run.name=credit_s{args.seed}"])
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    cfg.run_dir.mkdir(parents=True)
    shutil.copytree(ckpt, cfg.run_dir / ckpt.name)
    broker = LocalBroker(cfg.rl.broker_timeout_s)
    env = LocalEnv(cfg.run_dir, 2)
    source = BrokerSchedule(cfg, env, broker, cfg.run_dir)
    log: list[dict] = []
    stop = threading.Event()
    learner = threading.Thread(target=scripted_learner, args=(broker, source.bins, args.seed, stop, log), daemon=True)
    learner.start()
    t0 = time.perf_counter()
    try:
        last = run_training(cfg, training_data(cfg), env, cfg.run_dir, source)
    finally:
        stop.set()
        broker.close("measured")
        learner.join(timeout=10)
    print(f"[credit] {len(log)} windows from step {step} in {time.perf_counter() - t0:.0f} s; costs: "
          f"train {last.get('train_s', 0):.0f} s, credit {last.get('other_credit_s', 0):.0f} s, "
          f"probe and slots {last.get('other_reward_s', 0):.0f} s", flush=True)
    return log, last, step


def analyse(log: list[dict], J: int, block: int) -> dict:
    rows = [(w["window"], j, f, c) for w in log for j, f, c in zip(w["decisions"], w["slots"], w["rewards"])]
    win, b, feat, credit = (np.asarray(x, dtype=np.float64) for x in zip(*rows))
    win, b = win.astype(int), b.astype(int)
    centred = credit.copy()
    for w in np.unique(win):  # remove each window's common factor
        centred[win == w] -= credit[win == w].mean()

    def bin_means(mask):
        return np.array([centred[mask & (b == j)].mean() if (mask & (b == j)).any() else np.nan for j in range(J)])

    odd, even = bin_means(win % 2 == 1), bin_means(win % 2 == 0)
    ok = np.isfinite(odd) & np.isfinite(even)
    r = float(np.corrcoef(odd[ok], even[ok])[0, 1])
    mid = int(np.median(np.unique(win)))
    early, late = bin_means(win < mid), bin_means(win >= mid)
    keep = np.isfinite(early) & np.isfinite(late)
    halves = float(np.corrcoef(early[keep], late[keep])[0, 1])
    # what a fully persistent signal would give each split, given the noise of a bin's mean (Spearman-Brown's view)
    se2 = centred.var() / (len(centred) / J)
    signal2 = max(float(np.nanvar(bin_means(np.ones_like(win, dtype=bool)))) - se2, 0.0)
    expected_halves = signal2 / (signal2 + 2 * se2) if signal2 > 0 else 0.0
    expected_block = signal2 / (signal2 + len(set(win)) / block * se2) if signal2 > 0 else 0.0
    blocks = sorted(set(win // block))
    persist = []
    for a, c in zip(blocks, blocks[1:]):
        ma, mc = bin_means(win // block == a), bin_means(win // block == c)
        keep = np.isfinite(ma) & np.isfinite(mc)
        if keep.sum() > 2:
            persist.append(float(np.corrcoef(ma[keep], mc[keep])[0, 1]))
    # the image feature within bins: pooled slope of centred credit on the bin-centred feature
    fc = feat.copy()
    for j in range(J):
        fc[b == j] -= feat[b == j].mean() if (b == j).any() else 0.0
    slope = float((fc * centred).sum() / (fc * fc).sum())
    resid = centred - slope * fc
    se = float(np.sqrt((resid.var() / (fc * fc).sum())))
    # cross-validated R^2: bin means vs bin means + per-bin feature slope, folds by window
    folds = win % 5
    sse = {"bin": 0.0, "bin+feature": 0.0, "none": 0.0}
    for k in range(5):
        tr, te = folds != k, folds == k
        mu = np.array([centred[tr & (b == j)].mean() if (tr & (b == j)).any() else 0.0 for j in range(J)])
        pred_bin = mu[b[te]]
        pred_both = pred_bin.copy()
        for j in range(J):
            m_tr, m_te = tr & (b == j), (b[te] == j)
            if m_tr.sum() > 3 and m_te.any():
                x = feat[m_tr] - feat[m_tr].mean()
                s = (x * (centred[m_tr] - mu[j])).sum() / max((x * x).sum(), 1e-12)
                pred_both[m_te] += s * (feat[te][m_te] - feat[m_tr].mean())
        y = centred[te]
        sse["none"] += float(((y - centred[tr].mean()) ** 2).sum())
        sse["bin"] += float(((y - pred_bin) ** 2).sum())
        sse["bin+feature"] += float(((y - pred_both) ** 2).sum())
    full = bin_means(np.ones_like(win, dtype=bool))
    return {
        "decisions": int(len(credit)), "windows": len(log),
        "credit_mean": float(credit.mean()), "credit_sd": float(credit.std()),
        "centred_sd": float(centred.std()),
        "split_half_r": r, "split_half_spearman_brown": 2 * r / (1 + r),
        "persistence_r": persist, "persistence_r_mean": float(np.mean(persist)) if persist else None,
        "persistence_r_if_fully_persistent": expected_block,
        "halves_r": halves, "halves_r_if_fully_persistent": expected_halves,
        "bin_signal_sd": float(np.sqrt(signal2)), "bin_mean_se": float(np.sqrt(se2)),
        "feature_slope": slope, "feature_slope_se": se,
        "cv_r2_bin": 1 - sse["bin"] / sse["none"], "cv_r2_bin_feature": 1 - sse["bin+feature"] / sse["none"],
        "bin_mean_centred": full.tolist(),
        "bin_sd_of_means": float(np.nanstd(full)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-steps", type=int, default=1000, help="steps of the laplace checkpoint")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--window", type=int, default=32, help="steps of a decision window")
    ap.add_argument("--decision-every", type=int, default=4)
    ap.add_argument("--images", type=int, default=32, help="decision images of a decision step")
    ap.add_argument("--block", type=int, default=10, help="windows of a block for the persistence")
    ap.add_argument("--laplace-scale", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-write", action="store_true", help="print only (tests, quick runs)")
    ap.add_argument("--analyse", action="store_true", help="analyse the recorded signal.json again (no training)")
    args = ap.parse_args()
    load0 = loadavg()
    if args.analyse:
        saved = json.loads((args.out / "signal.json").read_text())
        log, last, step = saved["log"], {k: v for k, v in saved["costs"].items()}, saved["from_step"]
    else:
        ckpt = checkpoint_run(args)
        log, last, step = measure(args, ckpt)
    from akod_ray.diffusion.dko import NoiseBins

    from akod_science import run_config

    cfg = run_config("dko_only", args.seed, 1e9, args.out, [])
    out = analyse(log, NoiseBins(cfg.diffusion.T, cfg.dko.bins).J, args.block)
    out.update({"from_step": step, "costs": {k: v for k, v in last.items() if k.endswith("_s")}})
    print(json.dumps({k: v for k, v in out.items() if k not in ("bin_mean_centred", "persistence_r")}, indent=1))
    if args.no_write:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "signal.json").write_text(json.dumps({**out, "log": log}))
    write_figures("akod_credit_signal", {
        "credit_split_half_reliability": round(out["split_half_spearman_brown"], 4),
        "credit_window_persistence": round(out["persistence_r_mean"], 4) if out["persistence_r_mean"] else None,
        "credit_halves_persistence": round(out["halves_r"], 4),
        "credit_cv_r2_bin": round(out["cv_r2_bin"], 5), "credit_cv_r2_bin_feature": round(out["cv_r2_bin_feature"], 5),
    }, {k: v for k, v in out.items() if k != "log"}, load0)


if __name__ == "__main__":
    main()
