"""The report of bench/akod_science.py: tables, plots and the bench/results.json keys.

Every interval is a 95% t-interval over seeds (n - 1 degrees of freedom); ratios between arms
are paired by seed (the same data order, held-out batch and initial weights).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from akod_ray.evaluation.metrics import last_value, series
from common import loadavg, merge_results, meta_record


def ci95(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t-interval; the interval is nan with fewer than 2 values."""
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if a.size < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - h, m + h


def fmt(t: tuple[float, float, float], digits: int = 3) -> str:
    m, lo, hi = t
    if not math.isfinite(m):
        return "—"
    if not math.isfinite(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def curve(result: dict, key: str) -> list[tuple[float, float]]:
    """(budget seconds, value) of every record of the run that has ``key``."""
    return list(zip(*series(result["records"], key, x="budget_s")))


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    """The first budget second at which the curve reaches ``target`` (linear between evaluations), or None."""
    prev = None
    for t, v in points:
        if v <= target:
            if prev is None:
                return t
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / (v0 - v) if v0 != v else t
        prev = (t, v)
    return None


def final_of(result: dict, key: str) -> float:
    last = last_value(result["records"], key)
    return last[0] if last is not None else math.nan


EVALUATION = ("fid", "samples", "metrics")


def non_train_share(last: dict) -> float:
    """The share of the budgeted wall seconds (all but evaluation) not spent in trunk train steps."""
    other = sum(v for k, v in last.items() if k.startswith("other_") and k[6:-2] not in EVALUATION)
    return other / (last["train_s"] + other)


def reward_variance_shares(posted: list[dict]) -> dict:
    """Share of each reward candidate's variance that lies within branch rounds (same trunk weights, common
    random numbers: differences there are the actions' doing), against between rounds (training drift)."""
    branches = [p for p in posted if p.get("kind") == "branch"]
    rounds: dict[int, list[dict]] = {}
    for p in branches:
        rounds.setdefault(int(p["step"]), []).append(p)
    out = {}
    for name, fn in (("improvement", lambda p: (p["before_loss"] - p["score_loss"]) / p["before_loss"]),
                     ("reference", lambda p: -p["score_loss"])):
        values = [fn(p) for p in branches]
        if len(values) < 2:
            continue
        grand = float(np.mean(values))
        total = sum((v - grand) ** 2 for v in values)
        within = sum(sum((fn(p) - np.mean([fn(q) for q in g])) ** 2 for p in g) for g in rounds.values())
        out[name] = within / total if total > 0 else math.nan
    return out


def load(out: Path, arms: list[str]) -> dict[str, list[dict]]:
    by_arm: dict[str, list[dict]] = {a: [] for a in arms}
    for path in sorted((out / "results").glob("*.json")):
        r = json.loads(path.read_text())
        if r["arm"] in by_arm:
            by_arm[r["arm"]].append(r)
    for a in by_arm:
        by_arm[a].sort(key=lambda r: r["seed"])
    return by_arm


def plots(out: Path, by_arm: dict[str, list[dict]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from akod_ray.diffusion.dko import uniform_logsnr_betas
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import cosine_betas, linear_betas

    files = []
    for key, label in (("fid_c10", "fid_c10 (N = 1,000, EMA, DDIM 20)"), ("ref_loss", "reference loss (biased referee)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, runs in by_arm.items():
            if not runs:
                continue
            grid = np.linspace(0, min(max(p[0] for p in curve(r, key)) for r in runs), 50)
            ys = np.array([np.interp(grid, *zip(*curve(r, key))) for r in runs])
            line, = ax.plot(grid, ys.mean(0), label=f"{arm} (n={len(runs)})")
            ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("budget seconds (CPU time of the run, 1 thread)")
        ax.set_ylabel(label)
        ax.set_title(f"{key} during training: mean over seeds, band = min..max")
        if key == "fid_c10":
            ax.set_ylim(top=60)
        ax.legend()
        fig.tight_layout()
        name = f"curve_{key}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    T = 1000
    t = np.arange(0, T, 10)
    for name, betas, style in (("linear", linear_betas(T), "--"), ("cosine", cosine_betas(T), ":"),
                               ("loglinear (DKO start)", uniform_logsnr_betas(T, 9.21, -10.13), "-.")):
        ax.plot(t, DiffusionProcess(betas).log_snr[::10].numpy(), style, color="gray", label=name)
    for r in by_arm.get("akod", []) + by_arm.get("dko_only", []):
        if "final_logsnr" in r:
            ax.plot(t, torch.tensor(r["final_logsnr"]).numpy(), label=f"learned: {r['arm']} seed {r['seed']}")
    ax.set_xlabel("t")
    ax.set_ylabel("log-SNR")
    ax.set_title("learned schedules (final DKO at its latest observation) beside fixed ones")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "schedules.png", dpi=110)
    plt.close(fig)
    files.append("schedules.png")
    return files


def _reached(times: list) -> str:
    hit = [x for x in times if x is not None]
    return f"{len(hit)}/{len(times)}: {fmt(ci95(hit), 0) if hit else 'never'}"


def write_report(out: Path, arms: list[str], write_results: bool = True) -> None:
    by_arm = load(out, arms)
    cos = by_arm.get("cosine", [])
    target_fid = float(np.mean([final_of(r, "fid_c10") for r in cos])) if cos else math.nan
    target_ref = float(np.mean([final_of(r, "ref_loss") for r in cos])) if cos else math.nan
    fixed_finals = {a: float(np.mean([final_of(r, "fid_c10") for r in runs])) for a, runs in by_arm.items()
                    if runs and a in ("baseline", "cosine", "min_snr", "loglinear")}
    best_fixed = min(fixed_finals, key=fixed_finals.get) if fixed_finals else None
    target_best = fixed_finals.get(best_fixed, math.nan)
    rows, per_arm = [], {}
    for arm, runs in by_arm.items():
        if not runs:
            continue
        ttf = [time_to(curve(r, "fid_c10"), target_fid) for r in runs]
        ttr = [time_to(curve(r, "ref_loss"), target_ref) for r in runs]
        s = {
            "n": len(runs), "seeds": [r["seed"] for r in runs],
            "images": ci95([r["images"] for r in runs]),
            "budget_s": ci95([r["last"].get("budget_s", math.nan) for r in runs]),
            "ref_loss": ci95([final_of(r, "ref_loss") for r in runs]),
            "fid_c10_final": ci95([r["fid_c10_final"] for r in runs]),
            "fid_c10_1000": ci95([final_of(r, "fid_c10") for r in runs]),
            "time_to_fid": ttf, "time_to_ref": ttr,
            "non_train_share": ci95([non_train_share(r["last"]) for r in runs]),
            "time_to_best_fixed": [time_to(curve(r, "fid_c10"), target_best) for r in runs],
        }
        per_arm[arm] = s
        reached = [x for x in ttf if x is not None]
        rows.append(f"| {arm} | {s['n']} | {fmt(s['images'], 0)} | {fmt(s['fid_c10_final'], 2)} | "
                    f"{fmt(s['fid_c10_1000'], 2)} | {fmt(s['ref_loss'], 4)} | "
                    f"{len(reached)}/{len(ttf)}: {fmt(ci95(reached), 0) if reached else 'never'} | "
                    f"{_reached(s['time_to_best_fixed'])} | "
                    f"{sum(x is not None for x in ttr)}/{len(ttr)} | {fmt(s['non_train_share'], 3)} |")

    figures, notes = {}, []
    akod = {r["seed"]: r for r in by_arm.get("akod", [])}
    cosd = {r["seed"]: r for r in cos}
    paired = sorted(set(akod) & set(cosd))
    if paired:
        ratios = [akod[s]["fid_c10_final"] / cosd[s]["fid_c10_final"] for s in paired]
        m, lo, hi = ci95(ratios)
        figures["akod_vs_cosine_fid_c10_ratio"] = m
        figures["akod_vs_cosine_fid_c10_ratio_ci95"] = [lo, hi]
        t_a = [time_to(curve(akod[s], "fid_c10"), target_fid) for s in paired]
        t_c = [time_to(curve(cosd[s], "fid_c10"), target_fid) for s in paired]
        if all(x is not None for x in t_a + t_c):
            figures["akod_vs_cosine_time_to_target_ratio"] = float(np.mean(t_a) / np.mean(t_c))
        else:
            figures["akod_vs_cosine_time_to_target_ratio"] = None
            notes.append(f"AKOD reached cosine's final fid_c10 ({target_fid:.2f}) in {sum(x is not None for x in t_a)} of "
                         f"{len(t_a)} seeds within the budget: the time-to-target ratio is undefined (reported as null).")
    for other in ("loglinear", "baseline", "min_snr"):  # AKOD against its own starting point and the other fixed arms
        od = {r["seed"]: r for r in by_arm.get(other, [])}
        common = sorted(set(akod) & set(od))
        if common:
            m, lo, hi = ci95([akod[s]["fid_c10_final"] / od[s]["fid_c10_final"] for s in common])
            figures[f"akod_vs_{other}_fid_c10_ratio"] = m
            figures[f"akod_vs_{other}_fid_c10_ratio_ci95"] = [lo, hi]
    gains = {r["seed"]: [p["final"] - p["initial"] for p in r["gain_pairs"]] for r in by_arm.get("akod", []) if "gain_pairs" in r}
    if gains:
        per_seed = [float(np.mean(g)) for g in gains.values()]
        m, lo, hi = ci95(per_seed)
        figures["akod_policy_gain"] = m
        figures["akod_policy_gain_ci95"] = [lo, hi]
        all_pairs = [x for g in gains.values() for x in g]
        figures["akod_policy_gain_all_pairs"] = list(ci95(all_pairs))
    shares = [reward_variance_shares(r.get("posted", [])) for r in by_arm.get("akod", [])]
    if shares:
        for name in ("improvement", "reference"):
            figures[f"akod_reward_within_round_share_{name}"] = ci95([s.get(name, math.nan) for s in shares])[0]

    files = plots(out, by_arm)
    lines = [
        "# AKOD against fixed schedules: the experiment (bench/akod_science.py)", "",
        "Every arm: the same budget of CPU seconds of its own process (1 torch thread), everything but "
        "evaluation counted (AKOD's branch rollouts, reward evaluations and PPO included). Real CIFAR-10 "
        "(50,000 training images), U-Net channels (16, 32, 32, 64), batch 32, bf16, AdamW 5e-4, EMA 0.995, "
        "T = 1000. Means with 95% t-intervals over seeds.", "",
        f"Target for time-to-target: cosine's final fid_c10 at N = 1,000, mean over seeds = {target_fid:.3f}; "
        f"reference-loss target: cosine's final reference loss = {target_ref:.4f} (biased: its grid is uniform in "
        "log-SNR, the loglinear schedule's own training distribution).", "",
        f"Second target: the best fixed arm's final fid_c10 (N = 1,000): {best_fixed}, {target_best:.3f}.", "",
        "| arm | seeds | images | fid_c10 final (N=2,000) | fid_c10 final (N=1,000, in-run) | reference loss (biased) "
        "| seeds reaching cosine's fid_c10: budget s | seeds reaching the best fixed arm's fid_c10: budget s "
        "| seeds reaching cosine's ref loss | non-training share of the budget |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "## Keys", "", "```json", json.dumps(figures, indent=2), "```", "",
        *[f"- {n}" for n in notes], "",
        "## PPO's learning", "",
    ]
    for r in by_arm.get("akod", []):
        rets = [round(i["episode_return_mean"], 5) for i in r.get("iterations", []) if i.get("episode_return_mean") is not None]
        g = gains.get(r["seed"], [])
        lines.append(f"- seed {r['seed']}: {len(rets)} PPO iterations, {len([p for p in r.get('posted', []) if p.get('kind') == 'branch'])} "
                     f"branch episodes; episode return mean per iteration {rets}; paired gain final - initial policy "
                     f"{[round(x, 5) for x in g]}; trained schedule == rebuilt from checkpoint: {r.get('final_equals_trained')}")
    lines += ["", "## Reward candidates", "",
              "Share of each candidate's variance that lies within branch rounds (the same trunk weights and common random "
              "numbers, so differences are the actions' doing) rather than between rounds (training drift):", ""]
    for name in ("improvement", "reference"):
        k = f"akod_reward_within_round_share_{name}"
        if k in figures:
            lines.append(f"- {name}: {figures[k]:.4f}")
    lines += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"per_arm": per_arm, "figures": figures, "target_fid_c10": target_fid,
                                                  "target_ref_loss": target_ref}, indent=2, default=str))
    clean = {k: v for k, v in figures.items() if k.startswith("akod_")}
    if write_results:
        merge_results(clean, meta_record(loadavg=loadavg(), note="bench/akod_science.py --report over "
                                         f"{sum(len(v) for v in by_arm.values())} runs"))
    print((out / "report.md").read_text())
