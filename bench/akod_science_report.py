"""The report of bench/akod_science.py (version 3): tables, plots and the bench/results.json keys.

Every interval is a 95% t-interval over seeds (n - 1 degrees of freedom), the seeds being the
independent units; ratios between arms are paired by seed (the same data order, held-out batch
and initial weights). The referee is fid_c10 on the common sampling grid; each arm's own schedule
as its grid is reported beside it. A second budget (the same script with ``--budget 720 --out
bench/akod_science/budget2x``) is read from ``<out>/budget2x`` when it is there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from akod_ray.evaluation.metrics import last_value, series
from common import loadavg, merge_results, meta_record

FIXED = ("baseline", "cosine", "min_snr", "loglinear", "edm", "laplace")  # fixed training distributions
ONLINE = ("importance", "edm2")  # online adaptation without RL
LEARNED = ("dko_only", "akod")  # PPO-learned distributions
CONTROLS = ("dko_frozen", "dko_null")  # the learner without updates; with rewards that carry no information
DKO_ARMS = LEARNED + CONTROLS
EVALUATION = ("fid", "samples", "metrics")
# version 2's figures (bench/akod_science/v2): their meaning changed with version 3's arms and rewards, and no script
# writes them any more; the report removes them from bench/results.json when it writes version 3's
RETIRED_KEYS = (
    "akod_policy_gain_all_pairs", "akod_policy_samples_per_run", "akod_reward_within_round_share_improvement",
    "akod_reward_within_round_share_reference", "akod_vs_best_fixed_time_to_target_ratio",
    "akod_vs_cosine_time_to_target_ratio", "dko_scratch_policy_gain", "dko_scratch_policy_gain_ci95",
    "dko_scratch_policy_gain_detectable_80pct",
    *(f"{a}_vs_{b}_fid_c10_ratio{ci}" for a, b in (("akod", "baseline"), ("akod", "cosine"), ("akod", "edm"),
                                                 ("akod", "laplace"), ("akod", "loglinear"), ("akod", "min_snr"),
                                                 ("edm", "loglinear"), ("laplace", "loglinear"))
      for ci in ("", "_ci95")),
)
LEARNING = ("credit", "reward", "schedule_wait")  # what learning the distribution costs inside the budget


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


# ----------------------------------------------------------------- distributions


def realised_density(r: dict, edges: np.ndarray) -> np.ndarray:
    """The density over log-SNR of what a DKO run's trunk trained on (its realised bins, averaged over the run)."""
    from akod_ray.diffusion.dko import NoiseBins

    d = r["distribution"]
    lam = np.asarray(d["prior_logsnr"])
    bins = NoiseBins(lam.size, len(d["realised_bins"]))
    p = bins.step_distribution(d["realised_bins"]).numpy()
    h, _ = np.histogram(lam, bins=edges, weights=p, density=True)
    return h


def proposal_density(r: dict, prior_logsnr: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The importance arm's final proposal as a density over log-SNR (its bins of the laplace table)."""
    from akod_ray.diffusion.dko import NoiseBins

    q = r["adaptation"]["proposal"]
    bins = NoiseBins(prior_logsnr.size, len(q))
    h, _ = np.histogram(prior_logsnr, bins=edges, weights=bins.step_distribution(q).numpy(), density=True)
    return h


def window_drift(r: dict) -> list[tuple[int, float]]:
    """(step, W1 in log-SNR of the window's intended distribution to the prior) of every window of a DKO run."""
    import torch

    from akod_ray.diffusion.dko import NoiseBins, w1_logsnr

    d = r["distribution"]
    lam = torch.tensor(d["prior_logsnr"], dtype=torch.float64)
    bins = NoiseBins(lam.numel(), len(d["intended_bins"]))
    prior = bins.step_distribution(bins.mass)
    return [(w["step"], w1_logsnr(bins.step_distribution(w["intended"]), prior, lam)) for w in d["windows"]]


def null_drift(runs: list[dict]) -> float | None:
    """The null-reward control's drift: the largest W1 to the prior, over its seeds, of the distribution its trunk
    trained on (averaged over the run) and of its final schedule."""
    if not runs:
        return None
    return float(max(max(r["distribution"]["w1_intended_vs_prior"], r["distribution"]["w1_final_vs_prior"])
                     for r in runs))


# ----------------------------------------------------------------- plots


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
            ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.10)
    ax.set_ylim(top=40)
    files.append(_save(fig, ax, out / "curve_fid_c10.png", "budget seconds (CPU time of the run, 1 thread)",
                       f"fid_c10 (N = 500, {sampler}, common grid)", "fid_c10 during training: mean over seeds, band = min..max"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    edges = np.linspace(-10.13, 9.21, 58)
    mid = (edges[1:] + edges[:-1]) / 2
    for name, style in (("loglinear", ":"), ("edm", "--"), ("laplace", "-.")):
        lam = anchor_logsnr(name, 1000, 9.21, -10.13, laplace_scale).numpy()
        h, _ = np.histogram(lam, bins=edges, density=True)
        ax.plot(mid, h, style, color="gray", label=f"anchor: {name}" + (f" ({laplace_scale:g})" if name == "laplace" else ""))
    for arm in DKO_ARMS:
        runs = [r for r in by_arm.get(arm, []) if r.get("distribution")]
        if runs:
            ax.plot(mid, np.mean([realised_density(r, edges) for r in runs], 0), label=f"trained on: {arm} (n={len(runs)})")
    runs = [r for r in by_arm.get("importance", []) if r.get("adaptation", {}).get("proposal")]
    if runs:
        lam = anchor_logsnr("laplace", 1000, 9.21, -10.13, laplace_scale).numpy()
        ax.plot(mid, np.mean([proposal_density(r, lam, edges) for r in runs], 0), label="importance: final proposal")
    files.append(_save(fig, ax, out / "distributions.png", "log-SNR", "density of the training noise levels",
                       "what the trunk trained on (averaged over each run) beside the anchors"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for arm in DKO_ARMS:
        runs = [r for r in by_arm.get(arm, []) if r.get("distribution")]
        if not runs:
            continue
        m = min(len(r["distribution"]["windows"]) for r in runs)
        steps = [w["step"] for w in runs[0]["distribution"]["windows"][:m]]
        reward = np.array([[w["reward_mean"] for w in r["distribution"]["windows"][:m]] for r in runs])
        k = min(10, m)  # a moving mean over 10 windows: one window's mean credit is mostly noise
        smooth = np.array([np.convolve(row, np.ones(k) / k, mode="valid") for row in reward])
        line, = axes[0].plot(steps[k - 1:], smooth.mean(0), label=f"{arm} (n={len(runs)})")
        drift = [window_drift(r) for r in runs]
        axes[1].plot(steps, np.mean([[w for _, w in d[:m]] for d in drift], 0), color=line.get_color(), label=arm)
    axes[0].set_xlabel("trunk step")
    axes[0].set_ylabel("credit per decision (x rl.reward_scale)\nmoving mean of 10 windows", fontsize=9)
    axes[0].set_title("credit the decisions earned: learners vs the frozen control", fontsize=10)
    axes[0].legend(fontsize=7)
    files.append(_save(fig, axes[1], out / "ppo_learning.png", "trunk step",
                       "W1 (log-SNR), window's distribution to the prior", "how far the policy moved (mean over seeds)"))
    return files


# ----------------------------------------------------------------- the report


def referee_sampler(by_arm: dict) -> str:
    """The sampler and evaluations of the runs' in-run fid_c10 ("heun-19"); every run must agree."""
    seen = {(rec.get("fid_c10_sampler", "ddim"), rec.get("fid_c10_nfe")) for rs in by_arm.values() for r in rs
            for rec in r["records"] if "fid_c10" in rec}
    if len(seen) != 1:
        raise SystemExit(f"[science] the runs were judged with different samplers {sorted(seen, key=str)}: "
                         "one experiment has one referee")
    name, nfe = seen.pop()
    return f"{name.upper() if name in ('ddim', 'ddpm') else name}-{nfe}"


def ratio_key(figures: dict, key: str, a: list[dict], b: list[dict], field: str = "fid_c10_final") -> None:
    m, lo, hi = paired_ratio(a, b, field)
    figures[key], figures[f"{key}_ci95"] = m, [lo, hi]


def equal_images_ratio(a: list[dict], b: list[dict]) -> tuple[float, float, float]:
    """a's final in-run fid_c10 against b's at a's own steps (b's curve interpolated): the ratio at equal images."""
    bd = {r["seed"]: r for r in b}
    return ci95([final_of(r, "fid_c10") / value_at_step(bd[r["seed"]], r["steps"]) for r in a if r["seed"] in bd])


def write_report(out: Path, arms: list[str], write_results: bool = True) -> None:
    by_arm = {a: rs for a, rs in load(out, arms).items() if rs}
    fixed_final = {a: float(np.mean([r["fid_c10_final"] for r in rs])) for a, rs in by_arm.items() if a in FIXED}
    best_fixed = min(fixed_final, key=fixed_final.get) if fixed_final else None
    learned_final = {a: float(np.mean([r["fid_c10_final"] for r in rs])) for a, rs in by_arm.items() if a in LEARNED}
    learned = min(learned_final, key=learned_final.get) if learned_final else None
    choices = next(iter(by_arm.values()))[0].get("choices", {}) if by_arm else {}
    figures: dict = {"akod_science_best_fixed_arm": best_fixed, "akod_science_best_learned_arm": learned}
    rows, per_arm = [], {}
    # time to target on the in-run curves (N = 500 for every point): the best fixed arm's final in-run value
    target = float(np.mean([final_of(r, "fid_c10") for r in by_arm[best_fixed]])) if best_fixed else math.nan
    ref_steps = min((r["steps"] for arm in LEARNED for r in by_arm.get(arm, [])), default=None)
    for arm, runs in by_arm.items():
        grid, ys = mean_curve(runs)
        dko = [r for r in runs if r.get("distribution")]
        s = {
            "n": len(runs), "seeds": [r["seed"] for r in runs],
            "steps": ci95([r["steps"] for r in runs]), "images": ci95([r["images"] for r in runs]),
            "fid_c10_final": ci95([r["fid_c10_final"] for r in runs]),
            "fid_c10_final_own_grid": ci95([r["fid_c10_final_own_grid"] for r in runs]),
            "fid_c10_in_run_final": ci95([final_of(r, "fid_c10") for r in runs]),
            "time_to_target_s": time_to(zip(grid, ys.mean(0)), target),
            "learning_share": ci95([learning_share(r["last"]) for r in dko]) if dko else None,
            "decisions_per_run": ci95([r["samples_per_run"] for r in dko]) if dko else None,
            "w1_trained_vs_prior": ci95([r["distribution"]["w1_realised_vs_prior"] for r in dko]) if dko else None,
            "w1_final_vs_prior": ci95([r["distribution"]["w1_final_vs_prior"] for r in dko]) if dko else None,
            "fid_c10_at_learned_steps": ci95([value_at_step(r, ref_steps) for r in runs]) if ref_steps else None,
        }
        per_arm[arm] = s
        ttt = s["time_to_target_s"]
        rows.append(f"| {arm} | {s['n']} | {fmt(s['steps'], 0)} | {fmt(s['fid_c10_final'], 2)} | "
                    f"{fmt(s['fid_c10_final_own_grid'], 2)} | {fmt(s['fid_c10_in_run_final'], 2)} | "
                    f"{fmt(s['fid_c10_at_learned_steps'], 2) if s['fid_c10_at_learned_steps'] else '—'} | "
                    f"{f'{ttt:.0f}' if ttt is not None else 'not reached'} | "
                    f"{fmt(s['decisions_per_run'], 0) if s['decisions_per_run'] else '—'} | "
                    f"{fmt(s['learning_share'], 3) if s['learning_share'] else '—'} | "
                    f"{fmt(s['w1_trained_vs_prior'], 3) if s['w1_trained_vs_prior'] else '—'} | "
                    f"{fmt(s['w1_final_vs_prior'], 3) if s['w1_final_vs_prior'] else '—'} |")

    if best_fixed:
        fixed = by_arm[best_fixed]
        if learned:
            ratio_key(figures, "learned_vs_best_fixed_fid_c10_ratio", by_arm[learned], fixed)
            t_l, t_b = per_arm[learned]["time_to_target_s"], per_arm[best_fixed]["time_to_target_s"]
            figures["learned_vs_best_fixed_time_to_target_ratio"] = t_l / t_b if t_l is not None and t_b else None
        for arm, key in (("akod", "akod_vs_best_fixed"), ("dko_only", "dko_only_vs_best_fixed"),
                         ("importance", "importance_vs_best_fixed"), ("edm2", "edm2_weighting_vs_best_fixed")):
            if arm in by_arm:
                ratio_key(figures, f"{key}_fid_c10_ratio", by_arm[arm], fixed)
    prior = by_arm.get(choices.get("prior", "laplace"))
    if prior and "dko_frozen" in by_arm:
        ratio_key(figures, "frozen_vs_prior_fid_c10_ratio", by_arm["dko_frozen"], prior)
        m, lo, hi = equal_images_ratio(by_arm["dko_frozen"], prior)
        figures["frozen_vs_prior_fid_c10_ratio_equal_images"], figures["frozen_vs_prior_fid_c10_ratio_equal_images_ci95"] = \
            m, [lo, hi]
    for a, b in (("dko_only", "dko_frozen"), ("akod", "dko_only"), ("msfi_only", "laplace"), ("edm", "laplace")):
        if a in by_arm and b in by_arm:
            ratio_key(figures, f"{a}_vs_{b}_fid_c10_ratio", by_arm[a], by_arm[b])
    if "akod" in by_arm:
        figures["akod_independent_rewards_per_run"] = per_arm["akod"]["decisions_per_run"][0]
        figures["akod_learning_overhead_share"] = per_arm["akod"]["learning_share"][0]
    if "dko_null" in by_arm:
        figures["null_reward_drift_w1"] = null_drift(by_arm["dko_null"])
    gains = {}
    for arm in ("akod", "dko_only"):
        per_seed = [float(np.mean([p["final"] - p["prior"] for p in r["gain_pairs"]])) for r in by_arm.get(arm, [])
                    if "gain_pairs" in r]
        if per_seed:
            gains[arm] = per_seed
            m, lo, hi = ci95(per_seed)
            prefix = "akod_policy_gain" if arm == "akod" else f"{arm}_policy_gain"
            figures[prefix], figures[f"{prefix}_ci95"] = m, [lo, hi]
            figures[f"{prefix}_detectable_80pct"] = detectable(per_seed)
    # the second budget: does the gap grow or shrink with training?
    twice = load(out / "budget2x", arms) if (out / "budget2x" / "results").is_dir() else {}
    twice = {a: rs for a, rs in twice.items() if rs}
    second = []
    if best_fixed in twice:
        for arm in [a for a in twice if a != best_fixed]:
            key = f"{'learned' if arm == learned else arm}_vs_best_fixed_fid_c10_ratio_2x_budget"
            ratio_key(figures, key, twice[arm], twice[best_fixed])
            second.append((arm, key))
    for arm in twice:  # the same arm and seed at 2x against 1x: does more training help at all?
        if arm in by_arm:
            ratio_key(figures, f"{arm}_2x_vs_1x_budget_fid_c10_ratio", twice[arm], by_arm[arm])
    pairs_file = out.parent / "reward_pairs" / "summary.json"
    pairs = json.loads(pairs_file.read_text()) if pairs_file.exists() else None

    sampler = referee_sampler(by_arm)
    files = plots(out, by_arm, float(choices.get("laplace_scale", 0.75)), sampler)
    lines = [
        "# AKOD against fixed schedules and online adaptation, version 3 (bench/akod_science.py)", "",
        "Every arm: the same budget of CPU seconds of its own process (1 torch thread), everything but "
        "evaluation counted (the credits, the probe gradient and PPO's updates included). Real CIFAR-10 "
        "(50,000 training images), U-Net channels (16, 32, 32, 64), batch 32, bf16, AdamW 5e-4, EMA 0.995, "
        "T = 1000. The referee: fid_c10 on the common sampling grid (uniform in log-SNR between the shared "
        "endpoints), " + sampler + ", x0 clipped, from the final EMA weights (N = 2,000); each arm's own schedule as its "
        "grid beside it. Means with 95% t-intervals over seeds; ratios paired by seed.", "",
        f"The DKO's prior: **{choices.get('prior')}** (laplace scale **{choices.get('laplace_scale')}**); the reward "
        f"probe's metric: **{choices.get('reward_metric')}**.", "",
        f"Best fixed arm (lowest mean final fid_c10, common grid): **{best_fixed}**; best learned arm: **{learned}**. "
        f"Time-to-target: budget seconds until the seeds' mean in-run curve (N = 500) reaches the best fixed arm's "
        f"final in-run value ({target:.2f}).", "",
        "| arm | seeds | steps | fid_c10 final, common grid (N=2,000) | fid_c10 final, own grid (N=2,000) "
        "| fid_c10 in-run final (N=500) | fid_c10 at the learned arms' steps (N=500, equal images) "
        "| time to target (budget s) | rewards (decisions) per run | learning share of the budget "
        "| W1 trained on vs prior | W1 final schedule vs prior |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
    ]
    if second:
        lines += ["## The second budget (2x)", "", "| arm | seeds | steps | fid_c10 final, common grid |", "|---|---|---|---|"]
        for arm, rs in twice.items():
            lines.append(f"| {arm} | {len(rs)} | {fmt(ci95([r['steps'] for r in rs]), 0)} | "
                         f"{fmt(ci95([r['fid_c10_final'] for r in rs]), 2)} |")
        lines.append("")
    if pairs:
        lines += ["## The reward checked on decisions (bench/reward_pairs.py)", "",
                  f"{pairs['pairs']} pairs of training distributions trained from the same checkpoints with the same "
                  f"batches: the reward (the probe metric's relative fall) orders **{pairs['agreement']:.2f}** of them as "
                  f"fid_c10 does: {pairs['with_an_anchor']:.2f} of the pairs with an anchor (large moves), "
                  f"{pairs['reweightings']:.2f} of the pairs of two reweightings of the prior (the DKO's decisions).", ""]
    lines += ["## Keys", "", "```json", json.dumps(figures, indent=2), "```", "", "## PPO's learning", ""]
    for arm in DKO_ARMS:
        for r in by_arm.get(arm, []):
            its = r.get("iterations", [])
            kl = [round(i["prior_kl"], 4) for i in its if i.get("prior_kl") is not None]
            g = [round(p["final"] - p["prior"], 4) for p in r.get("gain_pairs", [])]
            lines.append(f"- {arm} seed {r['seed']}: {len(its)} PPO iterations, {r.get('samples_per_run')} rewarded "
                         f"decisions; KL(pi || prior) per iteration {kl[:3]} ... {kl[-3:]}; W1 trained on / final vs "
                         f"prior {r['distribution']['w1_realised_vs_prior']:.3f} / {r['distribution']['w1_final_vs_prior']:.3f};"
                         f" paired gain final - prior {g}")
    lines += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"per_arm": per_arm, "figures": figures, "target_fid_c10": target,
                                                  "choices": choices, "gains": gains}, indent=2, default=str))
    if write_results:
        merge_results({k: v for k, v in figures.items() if not k.startswith("akod_science_")},
                      meta_record(loadavg=loadavg(), note="bench/akod_science.py --report over "
                                  f"{sum(len(v) for v in by_arm.values())} runs"), retire=RETIRED_KEYS)
    print((out / "report.md").read_text())
