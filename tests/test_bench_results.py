"""bench/common.merge_results: figures merged with their _meta, retired keys removed with theirs."""

from __future__ import annotations

import json
import sys

from ray_helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import akod_science_report  # noqa: E402
from common import merge_results  # noqa: E402


def test_merge_keeps_other_keys_and_records_meta(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"kept": 1.5, "_meta": {"kept": {"command": "old"}}}))
    out = merge_results({"new": 2.0}, {"command": "bench/x.py"}, path=path)
    assert out == json.loads(path.read_text())
    assert out["kept"] == 1.5 and out["new"] == 2.0
    assert out["_meta"] == {"kept": {"command": "old"}, "new": {"command": "bench/x.py"}}


def test_retired_keys_leave_with_their_meta_and_a_rewritten_key_stays(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"old_ratio": 0.78, "old_ratio_ci95": [0.6, 0.9], "same": 1.0, "other": 3.0,
                                "_meta": {"old_ratio": {}, "old_ratio_ci95": {}, "same": {}, "other": {}}}))
    out = merge_results({"same": 0.5}, {"command": "new"}, path=path, retire=("old_ratio", "old_ratio_ci95", "same",
                                                                             "absent"))
    assert out == {"same": 0.5, "other": 3.0, "_meta": {"same": {"command": "new"}, "other": {}}}


def test_the_science_report_retires_version_2_figures_it_does_not_write():
    retired = set(akod_science_report.RETIRED_KEYS)
    assert {"akod_vs_min_snr_fid_c10_ratio", "laplace_vs_loglinear_fid_c10_ratio_ci95", "dko_scratch_policy_gain",
            "akod_policy_samples_per_run"} <= retired
    # none of version 3's own figures is retired
    assert not retired & {"learned_vs_best_fixed_fid_c10_ratio", "akod_vs_best_fixed_fid_c10_ratio",
                          "akod_policy_gain", "akod_policy_gain_ci95", "null_reward_drift_w1"}
