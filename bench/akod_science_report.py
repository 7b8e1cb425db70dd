"""The report of bench/akod_science.py (version 2): tables, plots and the bench/results.json keys.

Every interval is a 95% t-interval over seeds (n - 1 degrees of freedom), the seeds being the
independent units; ratios between arms are paired by seed (the same data order, held-out batch
and initial weights). The referee is fid_c10 on the common sampling grid; each arm's own schedule
as its grid is reported beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from akod_ray.evaluation.metrics import last_value, series
from common import loadavg, merge_results, meta_record

FIXED = ("baseline", "cosine", "min_snr", "loglinear", "edm", "laplace")
EVALUATION = ("fid", "samples", "metrics")
LEARNING = ("reward", "schedule_wait", "branches")  # what learning the schedule costs inside the budget


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


def detectable(xs: list[float], power: float = 0.8) -> float:
    """The smallest true mean a two-sided 5% one-sample t-test over these units detects with ``power``
    (their standard deviation taken as the truth): (t_0.975 + t_power) sd / sqrt(n)."""
    a = np.asarray(xs, dtype=np.float64)
    if a.size < 2:
        return math.nan
    df = a.size - 1
    return float((stats.t.ppf(0.975, df) + stats.t.ppf(power, df)) * a.std(ddof=1) / math.sqrt(a.size))


def fmt(t: tuple[float, float, float], digits: int = 3) -> str:
    m, lo, hi = t
    if not math.isfinite(m):
        return "—"
    if not math.isfinite(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def curve(result: dict, key: str, x: str = "budget_s") -> list[tuple[float, float]]:
    """(budget seconds or steps, value) of every record of the run that has ``key``."""
    return list(zip(*series(result["records"], key, x=x)))


def mean_curve(runs: list[dict], key: str = "fid_c10", x: str = "budget_s", points: int = 60):
    """The seeds' curves interpolated onto one grid up to the shortest run: (grid, [runs, grid])."""
    end = min(max(p[0] for p in curve(r, key, x)) for r in runs)
    grid = np.linspace(0, end, points)
    return grid, np.array([np.interp(grid, *zip(*curve(r, key, x))) for r in runs])


def time_to(points, target: float) -> float | None:
    """The first x at which the curve reaches ``target`` (linear between evaluations), or None."""
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


def learning_share(last: dict) -> float:
    """The share of the budgeted wall seconds (all but evaluation) spent learning the schedule: the reward
    probe, the schedule waits (observations, PPO updates, the broker) and branch rollouts."""
    other = {k[6:-2]: v for k, v in last.items() if k.startswith("other_") and k.endswith("_s")}
    budgeted = last["train_s"] + sum(v for k, v in other.items() if k not in EVALUATION)
    return sum(other.get(k, 0.0) for k in LEARNING) / budgeted


def value_at_step(result: dict, step: float, key: str = "fid_c10") -> float:
    return float(np.interp(step, *zip(*curve(result, key, "step"))))


def load(out: Path, arms: list[str]) -> dict[str, list[dict]]:
    by_arm: dict[str, list[dict]] = {a: [] for a in arms}
    for path in sorted((out / "results").glob("*.json")):
        r = json.loads(path.read_text())
        if r["arm"] in by_arm:
            by_arm[r["arm"]].append(r)
    for a in by_arm:
        by_arm[a].sort(key=lambda r: r["seed"])
    return by_arm


def paired_ratio(a: list[dict], b: list[dict], key: str = "fid_c10_final") -> tuple[float, float, float]:
    ad, bd = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    return ci95([ad[s][key] / bd[s][key] for s in sorted(set(ad) & set(bd))])


# ----------------------------------------------------------------- plots


def _density(logsnr: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """The training distribution of log-SNR a schedule induces under uniform t, as a density."""
    h, _ = np.histogram(logsnr, bins=bins, density=True)
    return h


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    """Label, lay out, write and close one figure; its file name for the report."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(out: Path, by_arm: dict[str, list[dict]], laplace_scale: float, sampler: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from akod_ray.diffusion.schedules import anchor_logsnr

    files = []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm, runs in by_arm.items():
        if runs:
            grid, ys = mean_curve(runs)
            line, = ax.plot(grid, ys.mean(0), label=f"{arm} (n={len(runs)})")
            ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.12)
    ax.set_ylim(top=80)
    files.append(_save(fig, ax, out / "curve_fid_c10.png", "budget seconds (CPU time of the run, 1 thread)",
                       f"fid_c10 (N = 500, {sampler}, common grid)", "fid_c10 during training: mean over seeds, band = min..max"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    bins = np.linspace(-10.13, 9.21, 40)
    mid = (bins[1:] + bins[:-1]) / 2
    for name, style in (("loglinear", ":"), ("edm", "--"), ("laplace", "-.")):
        lam = anchor_logsnr(name, 1000, 9.21, -10.13, laplace_scale).numpy()
        ax.plot(mid, _density(lam, bins), style, color="gray", label=f"{name}" + (f" ({laplace_scale:g})" if name == "laplace" else ""))
    for arm in ("dko_only", "akod", "dko_scratch"):
        for r in by_arm.get(arm, []):
            if "final_logsnr" in r:
                ax.plot(mid, _density(np.asarray(r["final_logsnr"]), bins), alpha=0.8, label=f"learned: {arm} s{r['seed']}")
    files.append(_save(fig, ax, out / "schedules.png", "log-SNR", "density of the training noise levels (uniform t)",
                       "learned training distributions (final DKO) beside the anchors"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm in ("dko_only", "akod", "dko_scratch"):
        runs = [r for r in by_arm.get(arm, []) if r.get("iterations")]
        if not runs:
            continue
        n = min(len(r["iterations"]) for r in runs)
        ys = np.array([[i["episode_return_mean"] for i in r["iterations"][:n]] for r in runs], dtype=np.float64)
        it = np.arange(1, n + 1)
        line, = ax.plot(it, ys.mean(0), label=f"{arm} (n={len(runs)})")
        ax.fill_between(it, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    files.append(_save(fig, ax, out / "ppo_return.png", "PPO iteration", "mean episode return (reward x rl.reward_scale)",
                       "PPO's return per iteration, band = min..max over seeds"))
    return files


# ----------------------------------------------------------------- the report


def referee_sampler(by_arm: dict) -> str:
    """The sampler and evaluations of the runs' in-run fid_c10 ("DDIM-20"); every run must agree."""
    seen = {(rec.get("fid_c10_sampler", "ddim"), rec.get("fid_c10_nfe")) for rs in by_arm.values() for r in rs
            for rec in r["records"] if "fid_c10" in rec}
    if len(seen) != 1:
        raise SystemExit(f"[science] the runs were judged with different samplers {sorted(seen, key=str)}: "
                         "one experiment has one referee")
    name, nfe = seen.pop()
    return f"{name.upper() if name in ('ddim', 'ddpm') else name}-{nfe}"


def write_report(out: Path, arms: list[str], write_results: bool = True) -> None:
    by_arm = {a: rs for a, rs in load(out, arms).items() if rs}
    fixed_final = {a: float(np.mean([r["fid_c10_final"] for r in rs])) for a, rs in by_arm.items() if a in FIXED}
    best_fixed = min(fixed_final, key=fixed_final.get) if fixed_final else None
    choices = next(iter(by_arm.values()))[0].get("choices", {}) if by_arm else {}
    figures: dict = {"akod_science_best_fixed_arm": best_fixed}
    rows, per_arm = [], {}
    # time to target on the in-run curves (N = 500 for every point): the best fixed arm's final in-run value
    target = float(np.mean([final_of(r, "fid_c10") for r in by_arm[best_fixed]])) if best_fixed else math.nan
    akod_steps = min((r["steps"] for r in by_arm.get("akod", [])), default=None)
    for arm, runs in by_arm.items():
        grid, ys = mean_curve(runs)
        s = {
            "n": len(runs), "seeds": [r["seed"] for r in runs],
            "steps": ci95([r["steps"] for r in runs]), "images": ci95([r["images"] for r in runs]),
            "fid_c10_final": ci95([r["fid_c10_final"] for r in runs]),
            "fid_c10_final_own_grid": ci95([r["fid_c10_final_own_grid"] for r in runs]),
            "fid_c10_in_run_final": ci95([final_of(r, "fid_c10") for r in runs]),
            "time_to_target_s": time_to(zip(grid, ys.mean(0)), target),
            "learning_share": ci95([learning_share(r["last"]) for r in runs]) if arm in ("dko_only", "akod", "dko_scratch") else None,
            "samples_per_run": ci95([r["samples_per_run"] for r in runs]) if "samples_per_run" in runs[0] else None,
            "fid_c10_at_akod_steps": ci95([value_at_step(r, akod_steps) for r in runs]) if akod_steps else None,
        }
        per_arm[arm] = s
        ttt = s["time_to_target_s"]
        rows.append(f"| {arm} | {s['n']} | {fmt(s['steps'], 0)} | {fmt(s['fid_c10_final'], 2)} | "
                    f"{fmt(s['fid_c10_final_own_grid'], 2)} | {fmt(s['fid_c10_in_run_final'], 2)} | "
                    f"{fmt(s['fid_c10_at_akod_steps'], 2) if s['fid_c10_at_akod_steps'] else '—'} | "
                    f"{f'{ttt:.0f}' if ttt is not None else 'not reached'} | "
                    f"{fmt(s['samples_per_run'], 0) if s['samples_per_run'] else '—'} | "
                    f"{fmt(s['learning_share'], 3) if s['learning_share'] else '—'} |")

    akod = by_arm.get("akod", [])
    if akod and best_fixed:
        m, lo, hi = paired_ratio(akod, by_arm[best_fixed])
        figures["akod_vs_best_fixed_fid_c10_ratio"], figures["akod_vs_best_fixed_fid_c10_ratio_ci95"] = m, [lo, hi]
        t_a, t_b = per_arm["akod"]["time_to_target_s"], per_arm[best_fixed]["time_to_target_s"]
        figures["akod_vs_best_fixed_time_to_target_ratio"] = t_a / t_b if t_a is not None and t_b else None
    for other in ("cosine", "loglinear", "baseline", "edm", "laplace"):
        if akod and other in by_arm:
            m, lo, hi = paired_ratio(akod, by_arm[other])
            figures[f"akod_vs_{other}_fid_c10_ratio"], figures[f"akod_vs_{other}_fid_c10_ratio_ci95"] = m, [lo, hi]
    if akod and "cosine" in by_arm:
        t_a, t_c = per_arm["akod"]["time_to_target_s"], per_arm["cosine"]["time_to_target_s"]
        cos_target = float(np.mean([final_of(r, "fid_c10") for r in by_arm["cosine"]]))
        ga, ya = mean_curve(akod)
        gc, yc = mean_curve(by_arm["cosine"])
        ta, tc = time_to(zip(ga, ya.mean(0)), cos_target), time_to(zip(gc, yc.mean(0)), cos_target)
        figures["akod_vs_cosine_time_to_target_ratio"] = ta / tc if ta is not None and tc else None
    for a, b in (("laplace", "loglinear"), ("edm", "loglinear"), ("dko_only", best_fixed), ("akod", "dko_only")):
        if a in by_arm and b in by_arm:
            m, lo, hi = paired_ratio(by_arm[a], by_arm[b])
            figures[f"{a}_vs_{b if b != best_fixed else 'best_fixed'}_fid_c10_ratio"] = m
            figures[f"{a}_vs_{b if b != best_fixed else 'best_fixed'}_fid_c10_ratio_ci95"] = [lo, hi]
    if akod:
        figures["akod_policy_samples_per_run"] = per_arm["akod"]["samples_per_run"][0]
        figures["akod_learning_overhead_share"] = per_arm["akod"]["learning_share"][0]
    gains = {}
    for arm in ("akod", "dko_only", "dko_scratch"):
        per_seed = [float(np.mean([p["final"] - p["initial"] for p in r["gain_pairs"]])) for r in by_arm.get(arm, [])
                    if "gain_pairs" in r]
        if per_seed:
            gains[arm] = per_seed
            m, lo, hi = ci95(per_seed)
            prefix = "akod_policy_gain" if arm == "akod" else f"{arm}_policy_gain"
            figures[prefix], figures[f"{prefix}_ci95"] = m, [lo, hi]
            figures[f"{prefix}_detectable_80pct"] = detectable(per_seed)
    # the reward against the referee: the pilot's measurement (bench/reward_referee.py)
    pilot = out.parent / "reward_referee" / "summary.json"
    referee = json.loads(pilot.read_text()) if pilot.exists() else None
    metric = choices.get("reward_metric")
    if referee and metric in referee["spearman"]:
        figures["reward_vs_fid_c10_spearman"] = referee["spearman"][metric]["all"]
        figures["reward_vs_fid_c10_spearman_within_budget"] = referee["spearman"][metric]["within_budget_mean"]

    sampler = referee_sampler(by_arm)
    files = plots(out, by_arm, float(choices.get("laplace_scale", 1.0)), sampler)
    lines = [
        "# AKOD against fixed schedules, version 2 (bench/akod_science.py)", "",
        "Every arm: the same budget of CPU seconds of its own process (1 torch thread), everything but "
        "evaluation counted (AKOD's reward probe, observations and PPO updates included). Real CIFAR-10 "
        "(50,000 training images), U-Net channels (16, 32, 32, 64), batch 32, bf16, AdamW 5e-4, EMA 0.995, "
        "T = 1000. The referee: fid_c10 on the common sampling grid (uniform in log-SNR between the shared "
        "endpoints), " + sampler + ", x0 clipped, from the final EMA weights (N = 2,000); each arm's own schedule as its "
        "grid beside it. Means with 95% t-intervals over seeds; ratios paired by seed.", "",
        f"Choices from the pilot (bench/reward_referee.py): DKO prior **{choices.get('prior')}**, laplace scale "
        f"**{choices.get('laplace_scale')}**, reward metric **{metric}**.", "",
        f"Best fixed arm (lowest mean final fid_c10, common grid): **{best_fixed}**. Time-to-target: budget seconds "
        f"until the seeds' mean in-run curve (N = 500) reaches the best fixed arm's final in-run value ({target:.2f}).",
        "",
        "| arm | seeds | steps | fid_c10 final, common grid (N=2,000) | fid_c10 final, own grid (N=2,000) "
        "| fid_c10 in-run final (N=500) | fid_c10 at AKOD's steps (N=500, equal images) | time to target (budget s) "
        "| PPO samples per run | learning share of the budget |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "## Keys", "", "```json", json.dumps(figures, indent=2), "```", "",
        "## PPO's learning", "",
    ]
    for arm in ("akod", "dko_only", "dko_scratch"):
        for r in by_arm.get(arm, []):
            rets = [round(i["episode_return_mean"], 3) for i in r.get("iterations", [])
                    if i.get("episode_return_mean") is not None]
            g = [round(p["final"] - p["initial"], 4) for p in r.get("gain_pairs", [])]
            lines.append(f"- {arm} seed {r['seed']}: {len(rets)} PPO iterations, {r.get('samples_per_run')} samples; "
                         f"mean return per iteration {rets}; paired gain final - prior {g}")
    if referee:
        lines += ["", "## The reward against the referee (the pilot, bench/reward_referee/report.md)", "",
                  "| candidate | Spearman, all checkpoints | Spearman within a budget |", "|---|---|---|"]
        for c, v in referee["spearman"].items():
            lines.append(f"| {c}{' (used)' if c == metric else ''} | {v['all']:.3f} | {v['within_budget_mean']:.3f} |")
    lines += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"per_arm": per_arm, "figures": figures, "target_fid_c10": target,
                                                  "choices": choices, "gains": gains}, indent=2, default=str))
    if write_results:
        merge_results({k: v for k, v in figures.items() if not k.startswith("akod_science_")},
                      meta_record(loadavg=loadavg(), note="bench/akod_science.py --report over "
                                  f"{sum(len(v) for v in by_arm.values())} runs"))
    print((out / "report.md").read_text())
