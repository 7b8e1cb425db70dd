"""`akod report` groups runs by arm (issue 18, item 11): a schedule, the Min-SNR weighting and a network.

By schedule alone, dko_only (plain U-Net, learned schedule) was averaged into akod and msfi_only (AKOD
U-Net, cosine) into cosine, so the summary's means mixed arms. Run folders here are written as the
sweep's trials write them (trial_config, save_config), with synthetic metrics: no training.
"""

from __future__ import annotations

import json
import re
import statistics

from akod_ray.config import ARMS, load_config, save_config
from akod_ray.reporting.report import write_report
from akod_ray.sweep.trial import search_space, trial_config

SEEDS = (0, 1)


def final_ref_loss(arm_index: int, seed: int) -> float:
    return round(0.1 + 0.01 * arm_index + 0.001 * seed, 6)


def summary_rows(md: str) -> dict[str, list[str]]:
    block = md.split("## Summary (mean over each arm's runs)\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("| ").split(" | ") for line in block.splitlines() if line.startswith("| ")][2:]
    return {row[0]: row for row in rows}


def test_a_report_over_a_sweep_with_every_arm_lists_every_arm(tmp_path):
    base = load_config(None, [f"run.root={tmp_path}", f"sweep.seeds={list(SEEDS)}", "sweep.budget=6400"])
    runs = tmp_path / base.sweep.name / "runs"
    for i, point in enumerate(search_space(base)):
        cfg = trial_config(base, point, str(runs), f"run{i}")
        save_config(cfg, cfg.run_dir)
        loss = final_ref_loss(ARMS.index(point["arm"]), point["seed"])
        (cfg.run_dir / "metrics.jsonl").write_text(
            json.dumps({"step": 200, "wall_s": 10.0, "loss": loss, "ref_loss": loss}) + "\n")

    md = write_report(tmp_path / base.sweep.name).read_text()
    assert f"{len(ARMS) * len(SEEDS)} run(s) in {len(ARMS)} arm(s)" in md
    rows = summary_rows(md)
    arm_of = {re.sub(r" \(.*\)$", "", name): name for name in rows}  # "dko_only" -> "dko_only (k=7)"
    by_arm = {arm: rows[name] for arm, name in arm_of.items()}
    assert sorted(by_arm) == sorted(ARMS)
    assert rows.keys() >= {"min_snr (Min-SNR-5)", "dko_only (k=7)", "akod (k=7)", "msfi_only", "cosine"}
    for i, arm in enumerate(ARMS):
        assert by_arm[arm][1] == str(len(SEEDS)), arm  # its own runs, and only those
        assert by_arm[arm][2] == f"{statistics.fmean(final_ref_loss(i, s) for s in SEEDS):.5f}", arm
        assert f"## Arm: {arm_of[arm]}\n" in md
