"""The Tune sweep end to end through a real local Ray: the smoke sweep's shape (a fixed arm
and AKOD, one table row per trial), and resume after the driver is killed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from akod_ray.config import ARMS, load_config
from akod_ray.sweep.trial import point_name, replace_sweep, search_space, trial_config
from akod_ray.sweep.tuner import write_table
from ray_helpers import CIFAR_DIR as CIFAR
from ray_helpers import tiny_procedural

ROOT = Path(__file__).resolve().parents[1]


def test_search_space_covers_arms_filter_sizes_and_seeds():
    cfg = load_config(ROOT / "tune_configs" / "smoke.yaml",
                      ["sweep.arms=[baseline,min_snr,dko_only,akod]", "sweep.kernel_sizes=[3,5,7,9,11]", "sweep.seeds=[0,1]"])
    points = search_space(cfg)
    names = sorted(point_name(p) for p in points)
    # fixed arms once per seed, the learned-schedule arms once per (k, seed)
    assert len(points) == 2 * (2 + 5 + 5)
    assert "akod_k11_s1" in names and "dko_only_k3_s0" in names and "baseline_s0" in names and "min_snr_s1" in names
    assert not any(n.startswith("baseline_k") for n in names)


# arm -> (schedule, Min-SNR gamma, MSFI and beta-modulation): DESIGN 1.7
EXPECTED_SWITCHES = {  # arm: (schedule, Min-SNR gamma, AKOD U-Net, adaptation, frozen)
    "baseline": ("linear", None, False, "none", False), "cosine": ("cosine", None, False, "none", False),
    "min_snr": ("cosine", 5.0, False, "none", False), "loglinear": ("loglinear", None, False, "none", False),
    "edm": ("edm", None, False, "none", False), "laplace": ("laplace", None, False, "none", False),
    "importance": ("laplace", None, False, "importance", False), "edm2": ("laplace", None, False, "edm2", False),
    "msfi_only": ("laplace", None, True, "none", False), "dko_frozen": ("akod", None, False, "none", True),
    "dko_only": ("akod", None, False, "none", False), "akod": ("akod", None, True, "none", False),
}
SMOKE_ARMS = {"baseline", "cosine", "loglinear", "laplace", "msfi_only", "dko_only", "akod"}  # make demo's seven


def test_trial_config_gives_every_arm_its_switches_and_the_same_budget():
    cfg = load_config(ROOT / "tune_configs" / "smoke.yaml", ["sweep.budget=6400", "train.batch_size=32",
                                                             "model.msfi=true", "model.beta_modulation=false"])
    assert set(cfg.sweep.arms) == SMOKE_ARMS  # the smoke sweep runs seven of the arms
    cfg = replace_sweep(cfg, arms=tuple(EXPECTED_SWITCHES))
    assert set(EXPECTED_SWITCHES) == set(ARMS)
    by_arm = {p["arm"]: trial_config(cfg, p, "/tmp/x", "t1") for p in search_space(cfg)}
    assert {c.train.steps for c in by_arm.values()} == {200}
    for arm, (schedule, gamma, akod_unet, adaptation, frozen) in EXPECTED_SWITCHES.items():
        c = by_arm[arm]  # the base config's model switches never leak into an arm
        assert (c.diffusion.schedule, c.diffusion.min_snr_gamma, c.model.msfi, c.model.beta_modulation,
                c.diffusion.adaptation, c.rl.frozen) == (schedule, gamma, akod_unet, akod_unet, adaptation, frozen), arm
    assert by_arm["akod"].dko.kernel_size == 7
    assert by_arm["baseline"].run.name == "baseline_s0-t1"  # from the trial id, never a timestamp
    timed = load_config(ROOT / "tune_configs" / "smoke.yaml", ["sweep.budget_kind=seconds", "sweep.budget=90"])
    assert trial_config(timed, search_space(timed)[0], "/tmp/x", "t2").train.max_wall_s == 90.0


@pytest.mark.timeout(300)
def test_every_arm_trains_with_its_switches(tmp_path, torch_single_thread):
    """Issues 11, 16 and 21: each of the twelve arms runs (a few steps, tiny U-Net, procedural data) with the
    network, schedule and switches its spec says: MSFI weights exist only in the AKOD U-Net arms, the schedule
    the checkpoint stores is the arm's, the online arms keep their sampler's or objective's state, the frozen
    control's DKO never moves."""
    import ray
    import torch

    from akod_ray.data.sources import load_training_data
    from akod_ray.diffusion.dko import uniform_logsnr_betas
    from akod_ray.diffusion.schedules import anchor_betas, fixed_schedule
    from akod_ray.rl.driver import train_akod_local
    from akod_ray.sweep.trial import summarize
    from akod_ray.training.checkpoint import latest_checkpoint, load_state
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training
    from akod_ray.training.schedule_source import fixed_source

    base = load_config(ROOT / "tune_configs" / "tiny_akod.yaml", [
        "data.source=procedural", "data.train_subset=64", "data.val_size=8", "train.batch_size=8", "train.steps=4",
        "train.log_every=2", "train.ckpt_every=4", "train.sample_every=4", "rl.segment_steps=2", "rl.train_batch=1",
        "rl.decision_every=1", "rl.decision_images=2", "rl.minibatch_size=4", "rl.probe_pairs=4", "dko.probe_pool=16",
        "eval.fid_samples=8", "eval.sampler_steps=2", "sweep.budget=32"])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        for arm, (schedule, gamma, akod_unet, adaptation, frozen) in EXPECTED_SWITCHES.items():
            point = {"arm": arm, "kernel_size": 5 if schedule == "akod" else None, "seed": 0}
            cfg = trial_config(base, point, str(tmp_path), "t")
            data = load_training_data(cfg, None)
            if schedule == "akod":
                train_akod_local(cfg, data)
            else:
                run_training(cfg, data, LocalEnv(cfg.run_dir), cfg.run_dir, fixed_source(cfg))
            state = load_state(latest_checkpoint(cfg.run_dir))
            assert state["step"] == 4, arm
            assert any(k.startswith("msfi.") for k in state["model"]) == akod_unet, arm
            assert any(k.startswith("modulation.") for k in state["model"]) == akod_unet, arm
            ends = (cfg.dko.logsnr_max, cfg.dko.logsnr_min)
            expected = {"linear": fixed_schedule("linear", 1000), "cosine": fixed_schedule("cosine", 1000),
                        "loglinear": uniform_logsnr_betas(1000, *ends), "edm": anchor_betas("edm", 1000, *ends),
                        "laplace": anchor_betas("laplace", 1000, *ends, cfg.diffusion.laplace_scale)}.get(schedule)
            if expected is not None:
                assert torch.equal(state["betas"], expected), arm
            else:  # the learned arms store the DKO their trunk trained with
                assert set(state["schedule_source"]["dko"]) >= {"weights", "context"}
                iterations = [json.loads(x) for x in (cfg.run_dir / "rl" / "iterations.jsonl").read_text().splitlines()]
                assert all(i["frozen"] == frozen for i in iterations) and iterations, arm
                if frozen:
                    assert not state["schedule_source"]["dko"]["weights"]["head.weight"].any()
            assert ("sampler" in state["schedule_source"]) == (adaptation == "importance"), arm
            assert ("objective" in state) == (adaptation == "edm2"), arm
            row = summarize(cfg, point)
            assert (row["schedule"], row["min_snr_gamma"], row["msfi"], row["beta_modulation"], row["adaptation"],
                    row["frozen"]) == (schedule, gamma, akod_unet, akod_unet, adaptation, frozen), arm
    finally:
        if started:
            ray.shutdown()


def test_sweep_table_has_one_row_per_trial(tmp_path):
    rows = [{"trial": "baseline_s0", "arm": "baseline", "ref_loss": 0.25, "fid_c10": float("nan")},
            {"trial": "akod_k7_s0", "arm": "akod", "kernel_size": 7, "ref_loss": 0.2}]
    csv_path, md_path = write_table(rows, tmp_path)
    got = list(csv.DictReader(csv_path.open()))
    assert [r["trial"] for r in got] == ["akod_k7_s0", "baseline_s0"]
    assert got[1]["ref_loss"] == "0.25"
    md = md_path.read_text().splitlines()
    assert len(md) == 4 and "| akod_k7_s0 | akod | 7 |" in md[2] and "—" in md[3]


def _sweep_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "akod_ray", "sweep", str(ROOT / "tune_configs" / "smoke.yaml"),
            "--set", f"run.root={root}", "--set", "run.dashboard=false", "--set", "sweep.arms=[baseline,cosine,akod]",
            "--set", "sweep.budget=2400", "--set", "sweep.max_concurrent_trials=1", "--set", "train.log_every=25",
            "--set", "train.ckpt_every=25", "--set", "eval.fid_samples=64", "--set", "data.train_subset=1024", *extra]


def _finished_runs(runs: Path, steps: int) -> list[Path]:
    done = []
    for m in runs.glob("*/metrics.jsonl"):
        lines = [line for line in m.read_text().splitlines() if line.strip()]
        if any(f'"step": {steps},' in line for line in lines) and (m.parent / f"checkpoint_{steps:08d}").is_dir():
            done.append(m.parent)
    return done


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not (CIFAR / "train.parquet").is_file(), reason="needs ../shared/data/cifar10")
def test_smoke_sweep_survives_driver_kill_and_resumes(tmp_path):
    env = dict(os.environ, AKOD_DATA_DIR=str(CIFAR), PYTHONUNBUFFERED="1")
    sweep_dir, runs = tmp_path / "smoke", tmp_path / "smoke" / "runs"
    steps = 2400 // 32

    # 1. Start the sweep; kill the driver (and the Ray it started) once the first trial finished.
    log1 = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_sweep_cmd(tmp_path), cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None and not _finished_runs(runs, steps):
            time.sleep(2)
        assert proc.poll() is None, f"the sweep ended before it could be interrupted: {(tmp_path / 'first.log').read_text()[-3000:]}"
        finished = _finished_runs(runs, steps)
        assert len(finished) == 1, "the first trial did not finish in time"
        time.sleep(3)  # let Tune record the finished trial
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = finished[0]
    first_metrics = (first / "metrics.jsonl").read_text()
    first_ckpts = sorted(p.name for p in first.glob("checkpoint_*"))

    # 2. Resume: the finished trial is kept, the others finish; one table row per trial.
    out = subprocess.run(_sweep_cmd(tmp_path, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "report" in out.stdout
    assert (first / "metrics.jsonl").read_text() == first_metrics, "a finished trial was rerun"
    assert sorted(p.name for p in first.glob("checkpoint_*")) == first_ckpts
    rows = list(csv.DictReader((sweep_dir / "sweep_table.csv").open()))
    assert sorted(r["arm"] for r in rows) == ["akod", "baseline", "cosine"]
    for r in rows:
        assert int(float(r["step"])) == steps
        assert 0 < float(r["ref_loss"]) < 1.0
    assert len(_finished_runs(runs, steps)) == 3
    akod_run = next(p for p in runs.iterdir() if p.name.startswith("akod_k7_s0"))
    assert (akod_run / "schedule.json").is_file()
    assert (sweep_dir / "report.md").is_file() and "akod" in (sweep_dir / "report.md").read_text()


# --------------------------------------------------------------------------- resume without Tune's pickles

RESUME_BASE = tiny_procedural(
    train={"log_every": 4, "ckpt_every": 4, "sample_every": 8},
    sweep={"name": "resume", "arms": ["baseline", "cosine"], "budget": 64, "max_concurrent_trials": 1},
)


class Payload:
    """Unpickling this creates ``marker``: proof that a resume ran code from a file in the run folder."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payloads(sweep_dir: Path, marker: Path) -> list[Path]:
    """A payload in every place a Tune restore reads: tuner.pkl, the experiment state (a cloudpickle
    fallback inside the JSON) and each Tune trial's params.pkl."""
    import pickle

    blob = pickle.dumps(Payload(marker))
    planted = [sweep_dir / "tuner.pkl"]
    planted[0].write_bytes(blob)
    state = sweep_dir / "experiment_state-2099-01-01_00-00-00.json"
    state.write_text(json.dumps({"trial_data": [[{"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}, {}]],
                                 "runner_data": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}}))
    planted.append(state)
    for params in sweep_dir.glob("*/params.pkl"):
        params.write_bytes(blob)
        planted.append(params)
    return planted


def test_plan_reads_only_the_projects_own_state(tmp_path):
    """The resume plan comes from run folders and summaries; a payload planted in Tune's files is never read."""
    from akod_ray.config import config_from_dict
    from akod_ray.sweep.tuner import plan_trials, write_summary

    cfg = config_from_dict(RESUME_BASE)
    runs = tmp_path / "runs"
    finished, started = runs / "baseline_s0-aaaa1111", runs / "cosine_s0-bbbb2222"
    finished.mkdir(parents=True)
    write_summary(finished, {"arm": "baseline", "ref_loss": 0.5})
    (started / "checkpoint_00000004").mkdir(parents=True)
    (runs / "cosine_s0-cccc3333").mkdir()  # an older attempt without checkpoints
    (runs / "cosine_s0-../x").mkdir(parents=True)  # not a run id: ignored
    plant_payloads(tmp_path, tmp_path / "payload_ran")
    done, todo = plan_trials(cfg, runs)
    assert [(r["trial"], r["ref_loss"]) for r in done] == [("baseline_s0", 0.5)]
    assert todo == [{"point": {"arm": "cosine", "kernel_size": None, "seed": 0}, "run_id": "bbbb2222"}]
    assert not (tmp_path / "payload_ran").exists()


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")] if p.is_dir()}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_resume_never_runs_a_payload_planted_in_tune_state(tmp_path):
    cfg_path = tmp_path / "resume.yaml"
    cfg_path.write_text(yaml.safe_dump(RESUME_BASE))
    cmd = [sys.executable, "-m", "akod_ray", "sweep", str(cfg_path), "--set", f"run.root={tmp_path}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    sweep_dir, runs = tmp_path / "resume", tmp_path / "resume" / "runs"

    # 1. A whole sweep, run with a permissive umask: the folders it creates still get no group/world write bit.
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                           preexec_fn=lambda: os.umask(0))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    kept, redo = sorted(runs.iterdir())  # baseline_s0-<id>, cosine_s0-<id>
    assert (kept / "summary.json").is_file() and (redo / "summary.json").is_file()
    writable = {k: oct(m) for k, m in _modes(sweep_dir).items() if m & 0o022}
    assert not writable, f"group/world-writable folders: {writable}"

    # 2. The cosine trial counts as unfinished again; every file a Tune restore would unpickle holds a payload.
    (redo / "summary.json").unlink()
    kept_metrics = (kept / "metrics.jsonl").read_text()
    marker = tmp_path / "payload_ran"
    planted = plant_payloads(sweep_dir, marker)
    assert len(planted) >= 4  # tuner.pkl, the experiment state, and both trials' params.pkl

    # 3. Resume: the payload never runs, the finished trial is kept, the other one finishes in its own run folder.
    second = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert not marker.exists(), "a payload planted in Tune's state ran on resume"
    assert (kept / "metrics.jsonl").read_text() == kept_metrics, "a finished trial was rerun"
    assert (redo / "summary.json").is_file() and sorted(runs.iterdir()) == [kept, redo]
    rows = list(csv.DictReader((sweep_dir / "sweep_table.csv").open()))
    assert sorted((r["arm"], r["schedule"], r["step"]) for r in rows) == [("baseline", "linear", "8"), ("cosine", "cosine", "8")]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_tiny_sweep_shows_inception_fid_beside_fid_c10_with_stand_in_weights(tmp_path):
    """Issue 23, item 3: with pytorch-fid weights on disk (stand-ins in its format, AKOD_INCEPTION_WEIGHTS) the
    sweep computes the Inception reference once and its table and report show Inception FID next to fid_c10."""
    from inception_helpers import standin_inception_weights

    base = {**RESUME_BASE, "data": {**RESUME_BASE["data"], "train_subset": 16},
            "eval": {**RESUME_BASE["eval"], "fid_samples": 4},
            "sweep": {"name": "inception", "arms": ["baseline"], "budget": 32, "max_concurrent_trials": 1}}
    cfg_path = tmp_path / "inception.yaml"
    cfg_path.write_text(yaml.safe_dump(base))
    weights = standin_inception_weights(tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth")
    env = dict(os.environ, PYTHONUNBUFFERED="1", AKOD_INCEPTION_WEIGHTS=str(weights))
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "akod_ray", "sweep", str(cfg_path), "--set", f"run.root={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "inception"
    assert f"[akod] Inception FID: reference statistics of the 16 training images -> {sweep_dir}" in out.stdout
    assert "no pytorch-fid weights" not in out.stdout
    [row] = list(csv.DictReader((sweep_dir / "sweep_table.csv").open()))
    assert float(row["fid"]) > 0 and int(row["fid_n"]) == 4 and float(row["fid_c10"]) > 0 and int(row["fid_c10_n"]) == 4
    header = (sweep_dir / "sweep_table.md").read_text().splitlines()[0]
    assert "| fid_c10 | fid_c10_n | fid | fid_n |" in header
    report = (sweep_dir / "report.md").read_text()
    assert "final fid_c10 (N)" in report and "final FID (N)" in report and "no run recorded it" not in report
