"""How much of the AKOD reward do the DKO's actions explain, and how large must the reward probe be?

Issue 16 asks to choose the reward's form and the probe "by measurement (cost, and the share of
reward variance the actions explain)". From a mid-training checkpoint of the experiment's config,
the trunk trains ``--segments`` segments of ``--segment-steps`` steps, each with a schedule drawn
from the DKO's initial policy (the prior's actions plus Gaussian noise of the policy's initial
standard deviation), exactly as AKOD's trunk does. Before and after every segment the epsilon-MSE
of ``--images`` held-out images at ``--grid`` log-SNR points (uniform between the DKO's endpoints,
fixed noise) is recorded per image and level. Then, for each reward metric (akod_ray/rl/reward.py):

- reliability of a probe of n images: the correlation across segments between the rewards two
  disjoint n-image probes give the same segment (split-half; 1 = the probe measures the segment,
  0 = it measures its own noise);
- share of variance the actions explain: the leave-one-out cross-validated R^2 of a linear model
  of the episode reward on the K - 1 actions (episode credit), and of the knot reward on its own
  action with one intercept per knot (knot credit), from the full probe;
- cost: seconds per probe evaluation of n images x grid points, and per training step.

    .venv/bin/python bench/akod_reward_calibration.py --checkpoint bench/reward_referee/runs/loglinear
    # writes bench/akod_reward_calibration.json and prints a table
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, ROOT  # noqa: E402

METRICS = ("eps_uniform", "x0", "eps_edm", "eps_laplace", "eps_sigmoid")
OUT = ROOT / "bench" / "akod_reward_calibration.json"


def per_image_profile(model, tables, x0, noise, t_grid, bf16: bool):
    """epsilon-MSE [images, levels] with fixed noise [levels, images, ...]."""
    import torch

    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.training.step import autocast

    model.eval()
    out = torch.zeros(x0.shape[0], len(t_grid), dtype=torch.float64)
    with torch.no_grad():
        for j, t in enumerate(t_grid.tolist()):
            tt = torch.full((x0.shape[0],), t, dtype=torch.long)
            with autocast(x0.device, bf16):
                out[:, j] = DiffusionProcess.table_loss(model, tables, x0, tt, noise[j]).double()
    return out.numpy()


def loo_r2(X: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out cross-validated R^2 of least squares y ~ X (X includes its intercept columns)."""
    n = len(y)
    if n <= X.shape[1] + 1:
        return math.nan
    H = X @ np.linalg.pinv(X.T @ X) @ X.T
    resid = y - H @ y
    loo = resid / np.clip(1 - np.diag(H), 1e-9, None)
    return float(1 - (loo**2).sum() / ((y - y.mean()) ** 2).sum())


def collect(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from akod_ray.config import apply_overrides, config_from_dict, config_to_dict
    from akod_ray.data.parquet import load_images, to_model_range
    from akod_ray.data.sources import TrainingData
    from akod_ray.diffusion.dko import KnotScheduleBuilder, prior_actions, schedule_from_knots
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.training.checkpoint import latest_checkpoint, load_state
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import FixedSchedule, TrainingRun, reference_process, step_seed

    ckpt = Path(args.checkpoint)
    ckpt = ckpt if (ckpt / "state.pt").exists() else latest_checkpoint(ckpt) if args.step is None else \
        ckpt / f"checkpoint_{args.step:08d}"
    state = load_state(ckpt)
    cfg = config_from_dict(apply_overrides(config_to_dict(config_from_dict(state["config"])), [
        f"dko.num_knots={args.knots}", "dko.knot_spacing=cosine", f"dko.prior={args.prior}", *args.set]))
    dko, T = cfg.dko, cfg.diffusion.T
    prior = prior_actions(dko.prior, T, dko.num_knots, dko.logsnr_max, dko.logsnr_min, dko.min_segment_share,
                          cfg.diffusion.laplace_scale, dko.knot_spacing)
    tmp = Path(tempfile.mkdtemp(prefix="akod_calib_"))
    try:
        shutil.copytree(ckpt, tmp / ckpt.name)
        train = load_images(str(DATA_DIR), "train")
        val = load_images(str(DATA_DIR), "test", count=cfg.data.val_size, seed=cfg.data.seed + 1)
        run = TrainingRun(cfg, TrainingData(train, val), LocalEnv(tmp, 1), tmp, FixedSchedule(state["betas"]))
        run.resume()
        probe_x0 = to_model_range(load_images(str(DATA_DIR), "test", count=args.images, seed=4242)).float()
        ref = reference_process(cfg)
        t_grid = torch.linspace(0, T - 1, args.grid).round().long()
        grid_logsnr = ref.log_snr[t_grid].tolist()
        noise = torch.randn((args.grid, *probe_x0.shape), generator=torch.Generator().manual_seed(7))
        tables = ref.step_tables()
        rng = np.random.default_rng(args.seed)
        std = math.exp(-0.5)  # the DKO's initial policy: log std -0.5 (akod_ray/diffusion/dko.py)
        segments, probe_s, train_s = [], [], []
        before = None
        for s in range(args.segments):
            actions = rng.normal(0.0, std, dko.num_knots - 1)
            b = KnotScheduleBuilder(dko.num_knots, dko.logsnr_max, dko.logsnr_min, dko.min_segment_share, prior)
            for a in actions:
                b.step(float(a))
            knots = b.knot_logsnr()
            process = DiffusionProcess(schedule_from_knots(knots, T, dko.knot_spacing))
            if before is None:
                before = per_image_profile(run.model, tables, probe_x0, noise, t_grid, cfg.train.bf16)
            t0 = time.perf_counter()
            for _ in range(args.segment_steps):
                run.train_one_step(process, step_seed(cfg.train.seed, 0, run.step))
                run.step += 1
            train_s.append((time.perf_counter() - t0) / args.segment_steps)
            t0 = time.perf_counter()
            after = per_image_profile(run.model, tables, probe_x0, noise, t_grid, cfg.train.bf16)
            probe_s.append(time.perf_counter() - t0)
            segments.append({"step": run.step, "actions": actions.tolist(), "knots": knots.tolist(),
                             "before": before.tolist(), "after": after.tolist()})
            before = after
            print(f"[calibration] segment {s + 1}/{args.segments} step {run.step}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"checkpoint": str(ckpt), "config": config_to_dict(cfg), "grid_logsnr": grid_logsnr,
            "segments": segments, "probe_s_per_pair": float(np.median(probe_s)) / (args.images * args.grid),
            "train_s_per_step": float(np.median(train_s)), "prior_actions": prior,
            "knot_spacing": "cosine", "images": args.images, "grid": args.grid, "segment_steps": args.segment_steps}


def analyse(data: dict, subsets=(4, 8, 16, 32)) -> dict:
    from akod_ray.rl.reward import knot_credit

    lam = np.asarray(data["grid_logsnr"])
    segs = data["segments"]
    B = np.asarray([s["before"] for s in segs])  # [S, images, levels]
    A = np.asarray([s["after"] for s in segs])
    acts = np.asarray([s["actions"] for s in segs])
    steps = np.asarray([s["step"] for s in segs], dtype=np.float64)
    S, n_img, _ = B.shape
    out = {}
    for metric in METRICS:
        def reward(idx):
            return np.asarray([knot_credit(metric, B[s, idx].mean(0), A[s, idx].mean(0), lam, segs[s]["knots"])
                               for s in range(S)])  # [S, K - 1]
        full = reward(np.arange(n_img))
        episode = full.sum(1)
        res = {"episode_reward_mean": float(episode.mean()), "episode_reward_std": float(episode.std())}
        for n in subsets:
            if 2 * n > n_img:
                continue
            rs = []
            for k in range(n_img // (2 * n)):
                ra = reward(np.arange(2 * k * n, (2 * k + 1) * n)).sum(1)
                rb = reward(np.arange((2 * k + 1) * n, (2 * k + 2) * n)).sum(1)
                rs.append(np.corrcoef(ra, rb)[0, 1])
            res[f"reliability_n{n}"] = float(np.mean(rs))
        ones = np.ones((S, 1))
        drift = (steps - steps.mean())[:, None] / max(steps.std(), 1.0)
        r2_drift = loo_r2(np.hstack([ones, drift]), episode)
        r2_actions = loo_r2(np.hstack([ones, drift, acts]), episode)
        res["episode_cv_r2_drift"] = r2_drift
        res["episode_cv_r2_drift_and_actions"] = r2_actions
        K1 = acts.shape[1]
        y = full.reshape(-1)  # [S * (K - 1)], segment-major
        knot_ids = np.tile(np.arange(K1), S)
        X0 = np.eye(K1)[knot_ids]
        X1 = np.hstack([X0, acts.reshape(-1, 1) * np.eye(K1)[knot_ids]])  # each knot's own action, own slope
        res["knot_cv_r2_intercepts"] = loo_r2(X0, y)
        res["knot_cv_r2_intercepts_and_own_action"] = loo_r2(X1, y)
        out[metric] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its latest, or --step)")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--segments", type=int, default=40)
    ap.add_argument("--segment-steps", type=int, default=32)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--knots", type=int, default=16)
    ap.add_argument("--prior", default="laplace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--analyse-only", action="store_true", help="re-analyse the recorded segments")
    args = ap.parse_args()
    raw = args.out.with_suffix(".segments.json")
    if args.analyse_only:
        data = json.loads(raw.read_text())
    else:
        data = collect(args)
        raw.write_text(json.dumps(data))
    result = {k: v for k, v in data.items() if k != "segments"}
    result["analysis"] = analyse(data)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["analysis"], indent=1))
    print(f"probe: {data['probe_s_per_pair'] * 1e3:.3f} ms per (image, level) pair; "
          f"train step {data['train_s_per_step']:.3f} s")


if __name__ == "__main__":
    main()
