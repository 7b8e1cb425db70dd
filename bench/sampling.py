"""Quality per network evaluation (issue 17): fid_c10 of every sampler at 5, 10, 20, 50 and 100
evaluations per image, against ancestral DDPM over all T steps of the grid, from the same checkpoints.

Design:
- Arms are checkpoints (or run folders: their latest checkpoint) of trained runs; by default the
  final checkpoints of bench/akod_science/runs/<arm>_s0 for baseline, loglinear, laplace and akod,
  those that exist. The issue's figures need at least three.
- Every sampler of an arm starts from the same noise: images are drawn in batches of ``--batch``
  and batch b's generator is seeded with (seed, b), so batch b's x_T is the same tensor for every
  sampler (DDPM's later draws of ancestral noise do not shift the next batch's x_T).
- Samplers see the grid ``--grid`` (default common: uniform in log-SNR, the same for every arm), the
  run's x0 clipping and bf16 setting (``akod_ray.evaluation.sampling.sample_as_configured``).
  ``--nfe`` values are budgets of network evaluations per image (``eval.sampler_steps``); each result
  records the evaluations really spent (Heun: 2N - 1 <= budget).
- fid_c10 (the shipped CIFAR-10 classifier's Frechet distance, never called FID) against the shipped
  training-set statistics; wall time per image covers sampling only, with ``--threads`` torch threads.
- Resumable: each (arm, sampler, budget) result is its own JSON under ``<out>/results/`` and is
  skipped when present. Run it in the background:

    mkdir -p bench/sampling && .venv/bin/python bench/sampling.py > bench/sampling/run.log 2>&1 &
    .venv/bin/python bench/sampling.py --report      # report.md, plot, results.json keys (any time: what is done)

At about 500 network evaluations per second (the tiny U-Net, one thread) an arm takes some 70 minutes at
N = 1,000: 33 for DDPM-1000 and as many for the 1,110 evaluations per image of 6 samplers x 5 budgets.

``--report`` writes ``<out>/report.md`` and ``<out>/fid_c10_vs_nfe.png`` and merges into bench/results.json
(``--results``): ``sampler_best_nfe20_vs_ddpm1000_fid_c10_ratio``, ``sampler_best_nfe10_vs_ddpm1000_fid_c10_ratio``
(the best sampler at that budget, one sampler for every arm: the lowest mean over arms of its per-arm ratio
to DDPM over all T steps, same checkpoints), ``sampler_best_nfe5_vs_ddim5_fid_c10_ratio``,
``sampler_adaptive_vs_best_fid_c10_ratio_nfe10`` (the adaptive sampler is measured against the best of the
others, never a candidate for "best"), ``sampler_wall_s_per_image_nfe20_<sampler>`` and the names of the
best samplers, with the per-arm numbers under ``_details_sampling``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, command_line, loadavg, merge_results, meta_record  # noqa: E402

OUT = ROOT / "bench" / "sampling"
ARMS = ["baseline", "loglinear", "laplace", "akod"]
SAMPLERS = ["ddim", "dpmpp_2m", "unipc", "euler", "heun", "adaptive"]
NFES = [5, 10, 20, 50, 100]
REFERENCE = "ddpm"


def log(msg: str) -> None:
    print(f"[sampling] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# ----------------------------------------------------------------- arms and results


def default_arms() -> list[Path]:
    runs = ROOT / "bench" / "akod_science" / "runs"
    return [runs / f"{arm}_s0" for arm in ARMS if (runs / f"{arm}_s0").is_dir()]


def resolve(path: Path) -> tuple[str, Path]:
    """(arm name, checkpoint folder) of a checkpoint or run folder."""
    from akod_ray.training.checkpoint import latest_checkpoint, state_file

    path = Path(path)
    if state_file(path) is not None:
        return path.parent.name, path
    found = latest_checkpoint(path)
    if found is None:
        raise SystemExit(f"[sampling] no checkpoint under {path}")
    return path.name, found


def result_path(out: Path, arm: str, sampler: str, budget: int) -> Path:
    return out / "results" / f"{arm}__{sampler}__{budget}.json"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------- one measurement


def generate(cfg, model, process, n: int, seed: int, batch: int, sampler: str, budget: int, grid: str):
    """n images, batch b from a generator seeded (seed, b): the same x_T per batch for every sampler."""
    import torch

    from akod_ray.evaluation.sampling import sample_chunks
    from akod_ray.progress import progress

    out = []
    with progress(f"{sampler}-{budget}", n) as bar:
        for _, images in sample_chunks(cfg, model, process, n, seed, "cpu", chunk=batch, sampler=sampler, steps=budget,
                                       grid=grid):
            out.append(images)
            bar.update(len(images))
    return torch.cat(out)


def measure(arm: str, ckpt: Path, sampler: str, budget: int, args, loaded: dict) -> dict:
    import torch

    from akod_ray.evaluation.fid import default_c10_reference, fid_c10
    from akod_ray.evaluation.sampling import check_sampling
    from akod_ray.training.checkpoint import load_for_sampling, load_state

    if "model" not in loaded:
        loaded["model"], loaded["process"], loaded["cfg"] = load_for_sampling(ckpt)
    model, process, cfg = loaded["model"], loaded["process"], loaded["cfg"]
    record = check_sampling(cfg, process, sampler=sampler, steps=budget, grid=args.grid)
    load_start = loadavg()
    t = time.perf_counter()
    with torch.no_grad():
        images = generate(cfg, model, process, args.n, args.seed, args.batch, sampler, budget, args.grid)
    wall = time.perf_counter() - t
    if not torch.isfinite(images).all():
        raise SystemExit(f"[sampling] {arm} {sampler} {budget}: non-finite images")
    fid = fid_c10(images.float(), default_c10_reference())
    step = load_state(ckpt).get("step")
    return {"arm": arm, "checkpoint": str(ckpt), "step": step, "T": process.T, "budget": budget, **record,
            "n": args.n, "seed": args.seed, "batch": args.batch, "fid_c10": fid, "wall_s": wall,
            "wall_s_per_image": wall / args.n, "threads": torch.get_num_threads(), "loadavg_start": load_start,
            "loadavg_end": loadavg(), "command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M")}


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    paths = args.paths or default_arms()
    if not paths:
        raise SystemExit("[sampling] no checkpoints: give paths, or run bench/akod_science.py first")
    arms = [resolve(p) for p in paths]
    if len(arms) < 3:
        log(f"{len(arms)} arm(s): the issue's figures need at least three")
    for arm, ckpt in arms:
        loaded: dict = {}
        jobs = [(s, b) for b in args.nfe for s in args.samplers]
        if not args.no_reference:
            jobs.append((REFERENCE, None))
        for sampler, budget in jobs:
            if budget is None:  # DDPM takes all T steps of the grid
                from akod_ray.training.checkpoint import load_for_sampling

                if "model" not in loaded:
                    loaded["model"], loaded["process"], loaded["cfg"] = load_for_sampling(ckpt)
                budget = loaded["process"].T
            path = result_path(args.out, arm, sampler, budget)
            if path.is_file():
                log(f"{arm} {sampler} {budget}: done before, skipped")
                continue
            log(f"{arm} {sampler} budget {budget}: sampling {args.n} images (load {loadavg()[0]})")
            result = measure(arm, ckpt, sampler, budget, args, loaded)
            write_json(path, result)
            log(f"{arm} {sampler} {result['nfe']} evaluations: fid_c10 {result['fid_c10']:.3f}, "
                f"{result['wall_s_per_image'] * 1000:.1f} ms/image")


def timing(args) -> None:
    """Wall time per image of every sampler at every budget and of DDPM over all T, side by side: ``--rounds``
    rounds, each timing every (sampler, budget) once on ``--n`` images in turn (so a change of load hits all
    alike), the median per image kept. No fid_c10: the quality cells are timed under whatever load their long
    runs met, these are the figures to compare. Writes ``<out>/timing.json``."""
    import statistics as stats

    import torch

    from akod_ray.training.checkpoint import load_for_sampling

    torch.set_num_threads(args.threads)
    arm, ckpt = resolve((args.paths or default_arms())[0])
    model, process, cfg = load_for_sampling(ckpt)
    jobs = [(s, b) for b in args.nfe for s in args.samplers] + [(REFERENCE, process.T)]
    times: dict[str, list[float]] = {f"{s}_{b}": [] for s, b in jobs}
    load_start = loadavg()
    for r in range(args.rounds):
        for s, b in jobs:
            t = time.perf_counter()
            with torch.no_grad():
                generate(cfg, model, process, args.n, args.seed, args.n, s, b, args.grid)
            times[f"{s}_{b}"].append((time.perf_counter() - t) / args.n)
        log(f"timing round {r + 1}/{args.rounds} done (load {loadavg()[0]})")
    write_json(args.out / "timing.json", {
        "arm": arm, "checkpoint": str(ckpt), "n": args.n, "rounds": args.rounds, "threads": args.threads,
        "grid": args.grid, "per_image_s": {k: stats.median(v) for k, v in times.items()}, "all_s": times,
        "loadavg_start": load_start, "loadavg_end": loadavg(), "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M")})
    log(f"timing: {args.out / 'timing.json'}")


# ----------------------------------------------------------------- report


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]


def table(results: list[dict]) -> dict:
    """{arm: {(sampler, budget): result}} and the reference budget (T) of each arm."""
    by_arm: dict[str, dict] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[(r["sampler"], r["budget"])] = r
    return by_arm


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def ratio_to(by_arm: dict, sampler: str, budget: int, ref: tuple | None) -> float:
    """Mean over arms of fid_c10(sampler, budget) / fid_c10(reference) per arm (nan if any arm lacks one)."""
    ratios = []
    for cells in by_arm.values():
        den_key = ref if ref is not None else next((k for k in cells if k[0] == REFERENCE), None)
        if (sampler, budget) not in cells or den_key not in cells:
            return math.nan
        ratios.append(cells[(sampler, budget)]["fid_c10"] / cells[den_key]["fid_c10"])
    return mean(ratios)


def best_at(by_arm: dict, budget: int, ref: tuple | None, samplers: list[str]) -> tuple[str | None, float]:
    """The one sampler (adaptive excluded) with the lowest mean per-arm ratio at ``budget``."""
    scored = [(ratio_to(by_arm, s, budget, ref), s) for s in samplers if s != "adaptive"]
    scored = [(r, s) for r, s in scored if math.isfinite(r)]
    if not scored:
        return None, math.nan
    r, s = min(scored)
    return s, r


def plot(by_arm: dict, samplers: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    arms = sorted(by_arm)
    panels = [("mean over arms", arms)] + ([(a, [a]) for a in arms] if len(arms) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, members) in zip(axes[0], panels):
        ticks: set[int] = set()
        for s in samplers:
            budgets = sorted({k[1] for a in members for k in by_arm[a] if k[0] == s})
            pts = []
            for b in budgets:
                rs = [by_arm[a].get((s, b)) for a in members]
                if all(rs):
                    pts.append((mean([r["nfe"] for r in rs]), mean([r["fid_c10"] for r in rs])))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
                ticks.update(b for b in budgets if all(by_arm[a].get((s, b)) for a in members))  # budgets, not Heun's 2N - 1
        refs = [next((r for k, r in by_arm[a].items() if k[0] == REFERENCE), None) for a in members]
        if all(refs):
            ax.axhline(mean([r["fid_c10"] for r in refs]), color="k", ls="--", lw=1,
                       label=f"ddpm ({refs[0]['nfe']} evaluations)")
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel("fid_c10")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(args) -> None:
    results = load_results(args.out)
    if not results:
        raise SystemExit(f"[sampling] no results under {args.out / 'results'}")
    by_arm = table(results)
    arms = sorted(by_arm)
    samplers = [s for s in args.samplers if any(k[0] == s for cells in by_arm.values() for k in cells)]
    budgets = sorted({k[1] for cells in by_arm.values() for k in cells if k[0] != REFERENCE})
    n = sorted({r["n"] for r in results})
    figures: dict = {}
    best20, r20 = best_at(by_arm, 20, None, samplers)
    best10, r10 = best_at(by_arm, 10, None, samplers)
    best5, r5 = best_at(by_arm, 5, ("ddim", 5), samplers)
    figures["sampler_best_nfe20_vs_ddpm1000_fid_c10_ratio"] = r20
    figures["sampler_best_nfe20"] = best20
    figures["sampler_best_nfe10_vs_ddpm1000_fid_c10_ratio"] = r10
    figures["sampler_best_nfe10"] = best10
    figures["sampler_best_nfe5_vs_ddim5_fid_c10_ratio"] = r5
    figures["sampler_best_nfe5"] = best5
    if best10 is not None:
        figures["sampler_adaptive_vs_best_fid_c10_ratio_nfe10"] = ratio_to(by_arm, "adaptive", 10, (best10, 10))
    timed = json.loads((args.out / "timing.json").read_text()) if (args.out / "timing.json").is_file() else None
    for s in samplers + [REFERENCE]:
        key = f"sampler_wall_s_per_image_{REFERENCE}" if s == REFERENCE else f"sampler_wall_s_per_image_nfe20_{s}"
        if timed is not None:  # side by side (``--timing``): the figures to compare
            walls = [v for k, v in timed["per_image_s"].items()
                     if k.rsplit("_", 1)[0] == s and (s == REFERENCE or k.rsplit("_", 1)[1] == "20")]
        else:
            walls = [r["wall_s_per_image"] for cells in by_arm.values() for k, r in cells.items()
                     if k[0] == s and (k[1] == 20 or s == REFERENCE)]
        if walls:
            figures[key] = mean(walls)
    figures["sampler_fid_c10_n"] = n[0] if len(n) == 1 else n
    figures["sampler_arms"] = arms
    figures = {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in figures.items()}
    figures = {k: v for k, v in figures.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}

    png = plot(by_arm, samplers, args.out / "fid_c10_vs_nfe.png")
    lines = ["# Sampling: fid_c10 per network evaluation", "",
             f"Arms: {', '.join(arms)} (checkpoints in the tables below); N = {n} samples per cell; grid "
             f"{sorted({r['sampling_grid'] for r in results})}; the same starting noise for every sampler "
             f"(batch b seeded (seed, b)); wall time per image covers sampling only. fid_c10 is the shipped "
             f"classifier's Frechet distance, not FID.", "",
             f"![fid_c10 against network evaluations]({png.name})", ""]
    ref_name = lambda cells: next((f"ddpm-{k[1]}" for k in cells if k[0] == REFERENCE), "ddpm")  # noqa: E731
    for arm in arms:
        cells = by_arm[arm]
        ckpt = next(iter(cells.values()))["checkpoint"]
        lines += [f"## {arm}", "", f"`{ckpt}`", "",
                  "| sampler | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for s in samplers:
            row = []
            for b in budgets:
                r = cells.get((s, b))
                row.append("—" if r is None else f"{r['fid_c10']:.3f} ({r['nfe']} ev, {r['wall_s_per_image'] * 1e3:.1f} ms)")
            lines.append(f"| {s} | " + " | ".join(row) + " |")
        ref = next((r for k, r in cells.items() if k[0] == REFERENCE), None)
        if ref:
            lines.append(f"| {ref_name(cells)} | {ref['fid_c10']:.3f} ({ref['nfe']} ev, "
                         f"{ref['wall_s_per_image'] * 1e3:.1f} ms/image) |" + " |" * (len(budgets) - 1))
        lines.append("")
    if timed is not None:
        keys = list(timed["per_image_s"])
        lines += ["## Wall time per image, side by side", "",
                  f"`{timed['checkpoint']}`, {timed['n']} images per batch, {timed['threads']} torch thread(s), "
                  f"the median of {timed['rounds']} rounds that each time every cell in turn (load "
                  f"{timed['loadavg_start'][0]} at the start, {timed['loadavg_end'][0]} at the end; `{timed['command']}`, "
                  f"{timed['date']}). The milliseconds in the tables above were measured under the load their long "
                  "runs met; compare these.", "", "| sampler and budget | ms per image | ms per evaluation |", "|---|---|---|"]
        from akod_ray.diffusion.dispatch import network_evaluations

        for k in keys:
            s_, b_ = k.rsplit("_", 1)
            nfe = network_evaluations(s_, int(b_), int(b_))  # a ddpm key's budget is its T
            lines.append(f"| {k} | {timed['per_image_s'][k] * 1e3:.2f} | {timed['per_image_s'][k] * 1e3 / nfe:.3f} |")
        lines.append("")
    lines += ["## Figures (bench/results.json)", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in figures.items()]
    lines += ["", "Ratios are means over arms of per-arm ratios; \"best\" is one sampler for every arm, the adaptive "
              "sampler excluded (it is measured against the best).", ""]
    (args.out / "report.md").write_text("\n".join(lines))
    log(f"report: {args.out / 'report.md'}")
    if not args.no_merge:
        merge_results(figures, meta_record(loadavg=loadavg()), path=args.results)
        merge_results({"_details_sampling": {arm: {f"{k[0]}_{k[1]}": {"fid_c10": r["fid_c10"], "nfe": r["nfe"],
                                                                        "wall_s_per_image": r["wall_s_per_image"]}
                                                   for k, r in cells.items()} for arm, cells in by_arm.items()}},
                      path=args.results)
        log(f"merged {len(figures)} keys into {args.results}")
    print(json.dumps(figures, indent=1))
    if best20 is not None:
        print(f"| Sampling (issue 17) | best at 20 evaluations: {best20}, fid_c10 ratio to DDPM-T {r20:.3f}; best at 10: "
              f"{best10}, {r10:.3f}; mean over {len(arms)} arms, N = {n} | `python bench/sampling.py` |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="checkpoint or run folders, one per arm (default: "
                    "bench/akod_science/runs/<arm>_s0 for baseline, loglinear, laplace, akod)")
    ap.add_argument("--n", type=int, default=1000, help="samples per (arm, sampler, budget)")
    ap.add_argument("--nfe", type=int, nargs="+", default=NFES, help="budgets of network evaluations per image")
    ap.add_argument("--samplers", nargs="+", default=SAMPLERS)
    ap.add_argument("--grid", default="common", choices=("common", "own"))
    ap.add_argument("--seed", type=int, default=0, help="the starting noise (the same for every sampler and arm)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="skip ancestral DDPM over all T steps")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="aggregate the results: report.md, plot, results.json")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results file --report merges into")
    ap.add_argument("--no-merge", action="store_true", help="--report without touching the results file")
    ap.add_argument("--timing", action="store_true", help="time every cell side by side on --n images of the first "
                    "arm (no fid_c10): <out>/timing.json, which --report prefers for wall time")
    ap.add_argument("--rounds", type=int, default=3, help="--timing: rounds, the median kept")
    args = ap.parse_args(argv)
    from akod_ray.config import SAMPLERS as KNOWN

    bad = [s for s in args.samplers if s not in KNOWN or s == REFERENCE]
    if bad:
        ap.error(f"--samplers: unknown or reference sampler(s) {bad}; choose from {KNOWN[1:]}")
    if args.rounds < 1 or args.n < 1:
        ap.error(f"--rounds and --n must be >= 1, got {args.rounds} and {args.n}")
    if args.report:
        report(args)
    elif args.timing:
        timing(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
