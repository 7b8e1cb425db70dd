"""``akod report``: a Markdown report of a run or a sweep, with tables and PNG plots.

A run folder holds ``config.yaml`` (the resolved config) and ``metrics.jsonl``, and may hold
``samples/grid_<step>.png`` and ``schedule.json`` (AKOD). A sweep folder holds run folders
at any depth. The report has one table per arm (schedule, Min-SNR, network and DKO filter
size: :func:`arm_name`; the seeds of an arm are its rows) with the final reference loss, the final fid_c10 / FID with
their sample counts, wall-clock and time-to-target, a summary table over arms, quality
against wall-clock plots, the learned schedules against linear and cosine, and the latest
sample grid of each run. A missing metric shows as "—".
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import statistics as stats_
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from akod_ray import storage
from akod_ray.diffusion.schedules import MAX_SCHEDULE_BYTES, load_schedule
from akod_ray.errors import DataError
from akod_ray.evaluation.metrics import last_value, read_metrics, series, time_to_target
from akod_ray.progress import progress
from akod_ray.reporting.plots import plot_metric_vs_time, plot_schedules
from akod_ray.storage import ObjectPath, StoragePath, location

MISSING = "—"
REPORT_NAME = "report.md"
FILES_DIR = "report_files"


@dataclass
class Run:
    path: StoragePath
    name: str  # relative to the report's root
    config: dict
    records: list[dict]
    schedule: torch.Tensor | None = None
    grid: StoragePath | None = None
    problems: list[str] = field(default_factory=list)

    def cfg(self, section: str, key: str, default=None):
        value = (self.config.get(section) or {}).get(key, default) if isinstance(self.config, dict) else default
        return default if value is None else value

    @property
    def arm(self) -> str:
        return arm_name(self.config)

    @property
    def seed(self):
        return self.cfg("train", "seed")


def arm_name(config: dict) -> str:
    """The run's arm of a comparison (DESIGN 1.7): a schedule, the Min-SNR weighting and a network, so
    that runs of different arms never share a row of the summary (dko_only trains the learned schedule
    with the plain U-Net, akod with the AKOD U-Net; msfi_only and cosine share a schedule).

    The sweep's arm name (config.ARM_SPECS) when the run is one: ``baseline``, ``min_snr (Min-SNR-5)``,
    ``dko_only (k=7)``, ``akod (k=7)``, ...; else what it is made of: ``linear + Min-SNR-5, MSFI``."""
    from akod_ray.config import ARM_SPECS, ModelConfig

    diffusion, model = config.get("diffusion") or {}, config.get("model") or {}
    schedule = str(diffusion.get("schedule") or "?")
    gamma = diffusion.get("min_snr_gamma")
    msfi = bool(model.get("msfi", ModelConfig.msfi))
    modulation = bool(model.get("beta_modulation", ModelConfig.beta_modulation))
    details = []
    if schedule == "akod":
        details.append(f"k={(config.get('dko') or {}).get('kernel_size', '?')}")
    if gamma is not None:
        details.append(f"Min-SNR-{gamma:g}" if _number(gamma) is not None else f"Min-SNR-{gamma}")
    adaptation = str(diffusion.get("adaptation") or "none")
    frozen = bool((config.get("rl") or {}).get("frozen", False))
    spec = (schedule, gamma is not None, msfi, adaptation, frozen)
    arm = next((a for a, s in ARM_SPECS.items() if (s.schedule, s.min_snr, s.akod_unet, s.adaptation, s.frozen) == spec),
               None) if msfi == modulation else None
    if arm is not None:
        return arm + (f" ({', '.join(details)})" if details else "")
    name = schedule + (f" ({details[0]})" if schedule == "akod" else "") + (f" + {details[-1]}" if gamma is not None else "")
    return ", ".join([name] + [part for on, part in ((msfi, "MSFI"), (modulation, "beta modulation")) if on])


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_run_config(path: StoragePath, problems: list[str]) -> dict:
    """A run's config.yaml as plain sections; what cannot be read becomes a problem line, not an error
    (the report still covers the run's metrics)."""
    from akod_ray.config import parse_yaml

    try:
        config = parse_yaml(storage.read_bytes(path).decode("utf-8")) or {}
    except (OSError, ValueError) as e:
        problems.append(f"config.yaml unreadable: {' '.join(str(e).split())[:200]}")
        return {}
    if not isinstance(config, dict):
        problems.append("config.yaml is not a mapping")
        return {}
    bad = sorted(str(k) for k, v in config.items() if not isinstance(v, dict))
    if bad:
        problems.append(f"config.yaml: section(s) {bad} are not mappings (ignored)")
    return {str(k): v for k, v in config.items() if isinstance(v, dict)}


def find_runs(root: str | StoragePath) -> list[StoragePath]:
    """Run folders (config.yaml beside metrics.jsonl) at or under ``root``, sorted."""
    files = {e.path for e in storage.walk_files(root)}
    return sorted({p.parent for p in files if p.name == "metrics.jsonl" and p.parent / "config.yaml" in files})


def _learned(path: StoragePath) -> bool:
    """Is this schedule.json a learned one? Every run writes one; the AKOD driver marks its own ``"source": "akod"``
    (a fixed arm's names its schedule). A file that cannot be read is left to :func:`load_schedule` to report."""
    try:
        head = json.loads(storage.read_bytes(path)[:MAX_SCHEDULE_BYTES].decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return True
    return not isinstance(head, dict) or head.get("source", "akod") == "akod"


def load_run(run_dir: StoragePath, root: StoragePath) -> Run:
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    run = Run(run_dir, name, {}, [])
    run.config = read_run_config(run_dir / "config.yaml", run.problems)
    try:
        run.records = read_metrics(run_dir / "metrics.jsonl")
    except DataError as e:
        run.problems.append(str(e))
    if storage.is_file(run_dir / "schedule.json") and _learned(run_dir / "schedule.json"):
        try:
            run.schedule = load_schedule(run_dir / "schedule.json")
        except DataError as e:
            run.problems.append(str(e))
    grids = sorted(e.path for e in storage.list_dir(run_dir / "samples")
                   if not e.is_dir and e.path.name.startswith("grid_") and e.path.name.endswith(".png"))
    run.grid = grids[-1] if grids else None
    return run


# --------------------------------------------------------------------------- formatting


def fmt(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


# FID is conventionally given to 2 decimals; fid_c10 lives on a smaller scale (train vs test
# at N = 10000: 0.03), so it gets significant digits.
SPECS = {"fid": ".2f", "fid_c10": ".4g"}


def fmt_with_n(found: tuple[float, dict] | None, n_key: str, spec: str) -> str:
    if found is None:
        return MISSING
    value, rec = found
    n = rec.get(n_key)
    return f"{value:{spec}} (N={n})" if n is not None else f"{value:{spec}} (N={MISSING})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return stats_.fmean(vals) if vals else None


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    key: str  # metrics.jsonl key
    value: float | None
    how: str  # where the value came from


def choose_target(runs: list[Run], key: str, given: float | None, config_key: str) -> Target:
    """The caller's target, else the runs' eval.<config_key> (when they agree), else the lowest value every run reached."""
    if given is not None:
        return Target(key, float(given), "given")
    configured = {_number(r.cfg("eval", config_key)) for r in runs} - {None}
    if len(configured) == 1:
        return Target(key, float(configured.pop()), f"eval.{config_key}")
    bests = [min(ys) for r in runs if (ys := series(r.records, key)[1])]
    if bests:
        return Target(key, max(bests), "auto: the lowest value that every run recording it reached")
    return Target(key, None, "none")


def _ttt(run: Run, target: Target) -> str:
    if target.value is None:
        return MISSING
    if not series(run.records, target.key)[1]:
        return MISSING
    t = time_to_target(run.records, target.key, target.value)
    return "not reached" if t is None else f"{t:.1f}"


def _mean_ttt(runs: list[Run], target: Target) -> str:
    """Mean time-to-target over the runs that reached it, with how many did."""
    if target.value is None:
        return MISSING
    measured = [r for r in runs if series(r.records, target.key)[1]]
    if not measured:
        return MISSING
    times = [t for r in measured if (t := time_to_target(r.records, target.key, target.value)) is not None]
    if not times:
        return f"not reached (0/{len(measured)})"
    return f"{stats_.fmean(times):.1f} ({len(times)}/{len(measured)} reached)"


# --------------------------------------------------------------------------- the report


def run_row(run: Run, t_loss: Target, t_quality: Target, with_fid: bool) -> list[str]:
    last = run.records[-1] if run.records else {}
    wall = last_value(run.records, "wall_s")
    img_s = [v for r in run.records if isinstance(v := r.get("img_per_s"), (int, float))]
    row = [
        run.name,
        str(run.seed) if run.seed is not None else MISSING,
        str(last.get("step", MISSING)),
        fmt(wall[0] if wall else None, ".1f"),
        fmt(stats_.median(img_s) if img_s else None, ".1f"),
        fmt(lv[0] if (lv := last_value(run.records, "ref_loss")) else None, ".5f"),
        fmt_with_n(last_value(run.records, "fid_c10"), "fid_c10_n", SPECS["fid_c10"]),
    ]
    if with_fid:
        row.append(fmt_with_n(last_value(run.records, "fid"), "fid_n", SPECS["fid"]))
    row += [_ttt(run, t_loss), _ttt(run, t_quality)]
    return row


def write_report(path: str | StoragePath, out: str | StoragePath | None = None, target_ref_loss: float | None = None,
                 target_fid: float | None = None) -> StoragePath:
    """Write ``report.md`` (and PNG plots in ``report_files/``) for a run or sweep folder; return its path.

    ``out`` is a folder or a ``.md`` file (default: ``path/report.md``). Targets default to the
    runs' eval.target_ref_loss / eval.target_fid, else the lowest value every run reached. Either may be
    in an object store (akod_ray/storage.py): the plots are drawn locally and uploaded, report.md last.
    """
    root = location(path)
    if not storage.is_dir(root):
        raise DataError(f"report: {str(root)!r} is not a folder")
    run_dirs = find_runs(root)
    if not run_dirs:
        raise DataError(f"report: no runs under {str(root)!r} (a run folder holds config.yaml and metrics.jsonl)")
    runs = []
    with progress("report: reading runs", len(run_dirs), "runs") as bar:
        for d in run_dirs:
            runs.append(load_run(d, root))
            bar.update(1)

    out = location(out) if out is not None else root
    md_path = out if out.suffix == ".md" else out / REPORT_NAME
    files = md_path.parent / FILES_DIR
    remote = storage.is_remote(md_path)
    try:
        storage.make_dirs(md_path.parent)
        # plots are drawn here and put in place of files/ at the end: renamed locally, uploaded to an object store
        staging = Path(tempfile.mkdtemp(prefix=f".{FILES_DIR}.", dir=None if remote else md_path.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; a report is for reading
    except OSError as e:  # what a permission check cannot see: a read-only file system, /proc, a full disk
        raise DataError(f"report: cannot write into {str(md_path.parent)!r}: {e.strerror or e}") from None
    try:
        lines = _report_lines(root, runs, md_path, files, staging, target_ref_loss, target_fid)
        _publish(staging, files)
    except BaseException as e:  # nothing half-written: the plots of a failed report never replace the last ones
        if isinstance(e, OSError):
            raise DataError(f"report: cannot write the plots into {str(files)!r}: {e.strerror or e}") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        storage.write_text(md_path, "\n".join(lines))
    except OSError as e:
        raise DataError(f"report: cannot write {str(md_path)!r}: {e.strerror or e}") from None
    return md_path


def _publish(staging: Path, files: StoragePath) -> None:
    """Put the freshly drawn plots in place of the old ones: two renames locally; in an object store, the
    old plots deleted and the new ones uploaded (report.md, written after them, links them)."""
    if isinstance(files, ObjectPath):
        storage.delete_tree(files)
        for f in sorted(staging.iterdir()):
            storage.upload_file(f, files / f.name)
        return
    old = files.with_name(files.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if files.exists():
        files.rename(old)
    staging.rename(files)
    shutil.rmtree(old, ignore_errors=True)


def _report_lines(root: StoragePath, runs: list[Run], md_path: StoragePath, files: StoragePath, staging: Path,
                  target_ref_loss: float | None, target_fid: float | None) -> list[str]:
    """The report's Markdown lines; plots are drawn into ``staging`` and linked as they will lie in ``files``."""

    def rel(p: StoragePath) -> str:
        if p.parent == staging:
            p = files / p.name
        if isinstance(p, ObjectPath) and isinstance(md_path, ObjectPath) and p.scheme == md_path.scheme:
            return posixpath.relpath(p.key, md_path.parent.key)
        return str(p) if isinstance(p, ObjectPath) or isinstance(md_path, ObjectPath) else \
            Path(os.path.relpath(p, md_path.parent)).as_posix()

    with_fid = any(series(r.records, "fid")[1] for r in runs)
    quality = "fid" if with_fid else "fid_c10"
    qname = "FID" if with_fid else "fid_c10"
    t_loss = choose_target(runs, "ref_loss", target_ref_loss, "target_ref_loss")
    t_quality = choose_target(runs, quality, target_fid, "target_fid")

    arms: dict[str, list[Run]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)

    lines = [f"# akod_ray report: {root.resolve().name}", ""]
    lines += [
        f"{len(runs)} run(s) in {len(arms)} arm(s) under `{root}`. Wall-clock is `wall_s` of metrics.jsonl, "
        "measured the same way for every arm (AKOD's RL overhead included). The reference loss is the "
        "epsilon-MSE on held-out images over a fixed log-SNR grid (the same protocol for every arm). "
        "fid_c10 is the offline FID in the feature space of the project's CIFAR-10 classifier: it is not "
        "Inception FID and is never compared with it.",
        "",
        f"- time-to-target, reference loss <= {fmt(t_loss.value, '.5f')} ({t_loss.how})",
        f"- time-to-target, {qname} <= {fmt(t_quality.value, SPECS[quality])} ({t_quality.how})",
        "",
    ]
    asked = any((r.config.get("eval") or {}).get("fid", "c10") != "c10" for r in runs)
    if asked and not with_fid:
        lines += ["Inception FID: no run recorded it (the pytorch-fid weights were not found where the runs ran: "
                  "AKOD_INCEPTION_WEIGHTS, or torch's hub cache); fid_c10 only.", ""]

    # Summary over arms.
    lines += ["## Summary (mean over each arm's runs)", ""]
    header = ["arm", "runs", "final ref loss", f"final {qname}", "wall-clock (s)",
              "time to ref-loss target (s)", f"time to {qname} target (s)"]
    rows = []
    for arm, members in sorted(arms.items()):
        rows.append([
            arm, str(len(members)),
            fmt(_mean([lv[0] if (lv := last_value(m.records, "ref_loss")) else None for m in members]), ".5f"),
            fmt(_mean([lv[0] if (lv := last_value(m.records, quality)) else None for m in members]), SPECS[quality]),
            fmt(_mean([lv[0] if (lv := last_value(m.records, "wall_s")) else None for m in members]), ".1f"),
            _mean_ttt(members, t_loss),
            _mean_ttt(members, t_quality),
        ])
    lines += _table(header, rows) + [""]

    # One table per arm.
    header = ["run", "seed", "steps", "wall-clock (s)", "img/s", "final ref loss", "final fid_c10 (N)"]
    if with_fid:
        header.append("final FID (N)")
    header += ["time to ref-loss target (s)", f"time to {qname} target (s)"]
    for arm, members in sorted(arms.items()):
        lines += [f"## Arm: {arm}", ""]
        lines += _table(header, [run_row(m, t_loss, t_quality, with_fid) for m in members]) + [""]

    # Plots.
    lines += ["## Quality against wall-clock", ""]
    for key, label, target in (("ref_loss", "reference loss", t_loss.value),
                               ("fid_c10", "fid_c10 (offline, not FID)", t_quality.value if quality == "fid_c10" else None),
                               ("fid", "FID (Inception)", t_quality.value if quality == "fid" else None)):
        curves = {arm: [c for m in members if (c := series(m.records, key))[0]] for arm, members in arms.items()}
        curves = {a: c for a, c in curves.items() if c}
        if not curves:
            if key != "fid":
                lines += [f"No run recorded {key}.", ""]
            continue
        values = [y for runs_ in curves.values() for _, ys in runs_ for y in ys]
        log_y = min(values) > 0 and max(values) > 10 * min(values)  # losses span decades early in training
        png = plot_metric_vs_time(curves, staging / f"{key}_vs_time.png", label, f"{label} vs wall-clock", target, log_y)
        lines += [f"![{label} vs wall-clock]({rel(png)})", ""]

    lines += ["## Noise schedules", ""]
    learned = {f"{r.name} ({r.arm})": r.schedule for r in runs if r.schedule is not None}
    png = plot_schedules(learned, staging / "schedules.png")
    what = f"{len(learned)} learned schedule(s)" if learned else "no learned schedule in these runs"
    lines += [f"beta_t and log-SNR_t of {what}, against linear and cosine.", "", f"![noise schedules]({rel(png)})", ""]

    grids = [r for r in runs if r.grid is not None]
    if grids:
        lines += ["## Latest sample grids", ""]
        for r in grids:
            lines += [f"**{r.name}** ({r.arm}, `{r.grid.name}`)", "", f"![{r.name}]({rel(r.grid)})", ""]

    problems = [(r.name, p) for r in runs for p in r.problems]
    if problems:
        lines += ["## Problems", ""] + [f"- {name}: {p}" for name, p in problems] + [""]
    return lines

