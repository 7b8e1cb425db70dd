"""Four error paths that were not one clear line (issue 18, item 10), found by planting a pickle payload
in every file of a finished run folder: Ray Train's own checkpoint index, torch's pickle-protocol warning
before akod's line, a report into a folder that cannot be written, and Ray's deduplicated log lines
printed after akod's line. Each is one line on stderr and exit status 2; no payload runs.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from akod_ray.cli import main
from akod_ray.errors import CheckpointError
from akod_ray.training.trainer import TRAIN_INDEX, check_train_index
from checkpoint_helpers import make_checkpoint
from ray_helpers import REPO, akod_cmd, akod_env
from test_bad_inputs import BASE, Payload, _npz, _stats, assert_one_line, everything_under

pytestmark = pytest.mark.usefixtures("torch_single_thread_module")


@pytest.fixture
def no_ray(monkeypatch):
    import akod_ray.training.trainer as trainer

    def tripwire(cfg):
        raise AssertionError("the error was not raised before Ray started")

    monkeypatch.setattr(trainer, "ensure_ray", tripwire)


def plant(path: Path, marker: Path) -> Path:
    """A pickle (protocol 4, as Python writes by default) whose loading would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state": Payload(marker)}, protocol=4))
    return path


def train_index(checkpoints: list[str]) -> dict:
    """What Ray Train writes (this Ray version) after reporting ``checkpoints`` in order."""
    import ray

    results = [{"version": 0, "checkpoint_dir_name": name, "metrics": {"step": int(name.split("_")[1])}}
               for name in checkpoints]
    return {"ray_version": ray.__version__, "checkpoint_results": results,
            "checkpoint_report_indices": list(range(len(results))),
            "latest_checkpoint_result": results[-1] if results else None, "pending_training_results": [],
            "pending_validation_specs": [], "current_report_index": len(results), "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}


@pytest.fixture
def base_yaml(tmp_path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


# --------------------------------------------------------------------------- Ray Train's checkpoint index


def test_ray_trains_own_index_as_it_writes_it_passes(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, step=2)
    (run / TRAIN_INDEX).write_text(json.dumps(train_index(["checkpoint_00000002"])))
    check_train_index(run)


def test_the_checkpoint_a_train_run_resumes_from_is_the_one_its_index_registered(tmp_path):
    """A worker uploads a checkpoint before Train registers it: a run killed in between holds a whole folder newer
    than the one its trunk resumes from, and the AKOD driver's PPO policy must come from the registered one."""
    from akod_ray.training.checkpoint import latest_checkpoint, registered_checkpoint

    run = tmp_path / "run"
    assert registered_checkpoint(run) is None  # no index: Train starts at step 0
    for step in (2, 4):
        make_checkpoint(run, step=step)
    assert registered_checkpoint(run) is None
    (run / TRAIN_INDEX).write_text(json.dumps(train_index(["checkpoint_00000002"])))
    assert registered_checkpoint(run) == run / "checkpoint_00000002"
    assert latest_checkpoint(run) == run / "checkpoint_00000004"
    (run / TRAIN_INDEX).write_text(json.dumps(train_index([])))
    assert registered_checkpoint(run) is None
    index = train_index(["checkpoint_00000002"])
    index["latest_checkpoint_result"]["checkpoint_dir_name"] = "../../checkpoint_00000002"
    (run / TRAIN_INDEX).write_text(json.dumps(index))
    assert registered_checkpoint(run) is None  # only a checkpoint folder's name, beside the index


INDEX_CASES = [
    ("not_json", b"{'checkpoint_results': [", r"is not valid JSON \(.*\)"),
    ("a_pickle", pickle.dumps({"checkpoint_results": []}, protocol=4), r"is not valid JSON"),
    ("a_list", b"[1, 2]", r"holds a JSON list, not an object"),
    ("other_ray", json.dumps(dict(train_index([]), ray_version="1.0.0")).encode(),
     r"was written by Ray '1\.0\.0', this is Ray .* \(Ray Train reads only its own\)"),
    ("no_results", json.dumps({k: v for k, v in train_index([]).items() if k != "checkpoint_results"}).encode(),
     r"does not hold what Ray Train writes \(.*checkpoint_results.*\)"),
    ("missing_folder", json.dumps(train_index(["checkpoint_00000002", "checkpoint_00000004"])).encode(),
     r"lists a checkpoint 'checkpoint_00000004' that is not a folder beside it"),
]


@pytest.mark.parametrize("name, content, why", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_a_corrupt_ray_train_index_is_one_line_before_ray_starts(capsys, no_ray, tmp_path, base_yaml, name, content, why):
    run = tmp_path / "root" / "bad"
    make_checkpoint(run, step=2)
    index = run / TRAIN_INDEX
    index.write_bytes(content)
    before = everything_under(run)
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={tmp_path / 'root'}"],
                    rf"Ray Train's checkpoint index '{re.escape(str(index))}' {why}; restore it, or delete it to train "
                    r"the run again from step 0 \(its checkpoint folders are then replaced\)")
    assert everything_under(run) == before


def test_a_corrupt_ray_train_index_of_a_sweep_trial_is_one_line(capsys, no_ray, tmp_path, base_yaml):
    from akod_ray.config import load_config, save_config

    sweep = tmp_path / "badsweep"
    save_config(load_config(base_yaml, [f"run.root={tmp_path}"]), sweep)
    index = sweep / "runs" / "cosine_s0-abc123" / TRAIN_INDEX
    index.parent.mkdir(parents=True)
    index.write_text("{")
    with pytest.raises(CheckpointError, match=re.escape(str(index))):
        check_train_index(index.parent)
    assert_one_line(capsys, ["sweep", base_yaml, "--set", f"run.root={tmp_path}", "--resume"],
                    rf"Ray Train's checkpoint index '{re.escape(str(index))}' is not valid JSON \(.*\); .*")


# --------------------------------------------------------------------------- torch's pickle-protocol warning


def test_a_broker_state_with_a_payload_is_refused_without_a_warning(tmp_path, recwarn):
    from akod_ray.rl.driver import load_broker_state

    marker = tmp_path / "payload_ran"
    path = plant(tmp_path / "rl" / "broker_state.pt", marker)
    with pytest.raises(CheckpointError, match=rf"^broker state '{re.escape(str(path))}' is not plain data"):
        load_broker_state(path)
    assert not marker.exists()
    assert [str(w.message) for w in recwarn] == []


def test_the_real_process_prints_one_line_for_a_planted_pickle(tmp_path):
    """stderr as a user sees it (pytest's own warning capture is out of the way)."""
    good_run = tmp_path / "run"
    make_checkpoint(good_run)
    marker = tmp_path / "payload_ran"
    weights = plant(tmp_path / "w.pth", marker)
    ref = tmp_path / "ref.npz"
    _npz(ref, **_stats(2048, "pytorch-fid InceptionV3 pool3 (2048-d)"))
    proc = subprocess.run(akod_cmd("fid", good_run, "--ref", ref, "--inception-weights", weights, "--n", "2"),
                          capture_output=True, text=True, env=akod_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"akod: error: Inception weights '{weights}' are corrupt or not the FID Inception: ")
    assert not marker.exists()


# --------------------------------------------------------------------------- a report that cannot be written


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("out", ["akod_report", "akod_report.md"])
def test_a_report_into_a_folder_that_cannot_be_written_is_one_line(capsys, tmp_path, out):
    """/proc passes a permission check (for root, every check) and refuses every new entry."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("diffusion:\n  schedule: cosine\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "wall_s": 1.0, "loss": 0.5, "ref_loss": 0.4}) + "\n")
    target = Path("/proc") / out
    folder = target.parent if target.suffix == ".md" else target
    assert_one_line(capsys, ["report", run, "--out", target],
                    rf"(report: cannot write into '{re.escape(str(folder))}'|--out '{re.escape(str(target))}' cannot be "
                    r"(created or )?written): .*")
    assert everything_under(run) == ["config.yaml", "metrics.jsonl"]


# --------------------------------------------------------------------------- a checkpoint refused on resume (Ray)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_refused_by_a_worker_on_resume_is_one_line_with_rays_lines_in_the_log(tmp_path, base_yaml):
    """Ray's deduplicated lines (the controller's traceback, "[repeated 2x across cluster]") come when Ray
    disconnects; they go to ray.log like the rest, not to the console after akod's line."""
    root = tmp_path / "root"
    run = root / "bad"
    marker = tmp_path / "payload_ran"
    make_checkpoint(run, step=2, legacy=True)  # an earlier version's state.pt, replaced by a pickle
    state = plant(run / "checkpoint_00000002" / "state.pt", marker)
    (run / TRAIN_INDEX).write_text(json.dumps(train_index(["checkpoint_00000002"])))
    proc = subprocess.run(akod_cmd("train", base_yaml, "--set", f"run.root={root}"), capture_output=True, text=True,
                          env=akod_env(RAY_DEDUP_LOGS="1"), cwd=REPO, timeout=540)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr[-4000:]
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"akod: error: checkpoint file '{state}' is corrupt or truncated: it holds Python objects "), line
    assert "pid=" not in proc.stdout and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "CheckpointError" in (run / "ray.log").read_text()
    assert not marker.exists()


def test_without_verbose_ray_neither_dedups_nor_logs_below_error_and_the_environment_is_restored(monkeypatch):
    """Ray's deduplication took two concurrent trials' progress lines (the same words, other numbers) for
    repeats: one trial's lines vanished into "[repeated 2x across cluster]" on the other's."""
    import os

    import akod_ray.cli as cli

    seen = {}
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    monkeypatch.delenv("RAY_LOGGER_LEVEL", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args: seen.update(
        {name: os.environ.get(name) for name in ("RAY_DEDUP_LOGS", "RAY_LOGGER_LEVEL")}) or 0)
    assert main(["train"]) == 0
    assert seen == {"RAY_DEDUP_LOGS": "0", "RAY_LOGGER_LEVEL": "error"}
    assert "RAY_DEDUP_LOGS" not in os.environ and "RAY_LOGGER_LEVEL" not in os.environ
    assert main(["train", "--verbose"]) == 0
    assert seen == {"RAY_DEDUP_LOGS": None, "RAY_LOGGER_LEVEL": None}
