"""The training loop without Ray (LocalEnv, procedural data): resume exactness, corrupt checkpoints.

No Ray here: ``run_training`` with a :class:`LocalEnv` is the same loop the Ray Train
workers run, with checkpoints written to the run folder by the env.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pytest
import torch

from akod_ray.config import (Config, DataConfig, DiffusionConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig,
                             save_config)
from akod_ray.data.sources import load_training_data
from akod_ray.errors import CheckpointError
from akod_ray.training.checkpoint import STATE_FILE, checkpoint_dir_name, latest_checkpoint, load_state
from akod_ray.training.local import LocalEnv
from akod_ray.training.loop import run_training
from akod_ray.training.schedule_source import fixed_source

N = 4  # steps before the interruption; the straight run trains 2N


def tiny_config(root: Path, name: str, steps: int, **train) -> Config:
    """A U-Net of width 8-16 on 64 procedural images; checkpoints every N steps, a log line every 2."""
    return Config(
        run=RunConfig(name=name, root=str(root), dashboard=False),
        diffusion=DiffusionConfig(T=100, schedule="cosine"),
        model=ModelConfig(channels=(8, 8, 16, 16), bottleneck_channels=16, num_res_blocks=1,
                          attention_resolutions=(), dropout=0.0),
        data=DataConfig(source="procedural", train_subset=64, val_size=8),
        train=TrainConfig(**{"steps": steps, "batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "log_every": 2,
                             "ckpt_every": N, "sample_every": 10_000, "num_to_keep": 10, "ref_grid": 2,
                             "ema_decay": 0.9, **train}),
        eval=EvalConfig(sampler_steps=2, grid_size=1, fid_samples=16),
    )


def train_local(cfg: Config) -> dict:
    run_dir = cfg.run_dir
    save_config(cfg, run_dir)  # as the driver does before the workers start
    env = LocalEnv(run_dir, num_to_keep=cfg.train.num_to_keep)
    return run_training(cfg, load_training_data(cfg, None), env, run_dir, fixed_source(cfg))


def metrics(run_dir: Path) -> list[dict]:
    """The interval records of metrics.jsonl (not the fid_c10 records written beside them at a run's end)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    """The same run trained 2N steps straight, and N steps then resumed for N more (a new loop)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("runs")
        straight = tiny_config(root, "straight", 2 * N)
        train_local(straight)
        first = tiny_config(root, "resumed", N)
        train_local(first)
        at_n = load_state(latest_checkpoint(first.run_dir))
        second = tiny_config(root, "resumed", 2 * N)  # the same run folder: resumes from checkpoint N
        last = train_local(second)
    finally:
        torch.set_num_threads(before)
    return straight.run_dir, second.run_dir, at_n, last


def test_resume_continues_from_the_checkpoint_step_with_the_same_data_positions(straight_and_resumed):
    straight_dir, resumed_dir, at_n, last = straight_and_resumed
    assert at_n["step"] == N
    assert last["step"] == 2 * N
    for step in (N, 2 * N):
        a = load_state(straight_dir / checkpoint_dir_name(step))
        b = load_state(resumed_dir / checkpoint_dir_name(step))
        assert a["step"] == b["step"] == step
        assert a["data"] == b["data"], f"data position at step {step}"
    # 2N batches of 8 from 64 images: epoch 0 holds 8 batches
    assert load_state(resumed_dir / checkpoint_dir_name(2 * N))["data"] == {"epoch": 0, "offset": 2 * N * 8}
    # every logged step exactly once, in order, in both runs
    assert [r["step"] for r in metrics(straight_dir)] == list(range(2, 2 * N + 1, 2))
    assert [r["step"] for r in metrics(resumed_dir)] == list(range(2, 2 * N + 1, 2))


def test_resume_is_exact(straight_and_resumed):
    """Resumed weights equal the straight run's: same data, same t and noise (seeded by the step), same optimizer."""
    straight_dir, resumed_dir, _, _ = straight_and_resumed
    a = load_state(straight_dir / checkpoint_dir_name(2 * N))
    b = load_state(resumed_dir / checkpoint_dir_name(2 * N))
    start = load_state(straight_dir / checkpoint_dir_name(N))
    moved = max((a["model"][k] - start["model"][k]).abs().max().item() for k in a["model"])
    assert moved > 1e-4  # the second half did train
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for sa, sb in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        torch.testing.assert_close(sb, sa, rtol=0, atol=1e-6)
    ra, rb = metrics(straight_dir), metrics(resumed_dir)
    for x, y in zip(ra, rb):
        assert x["step"] == y["step"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5), f"train loss at step {x['step']}"
        assert y["ref_loss"] == pytest.approx(x["ref_loss"], abs=1e-5), f"ref loss at step {x['step']}"


def test_resuming_from_a_corrupt_latest_checkpoint_names_the_file(tmp_path, torch_single_thread):
    cfg = tiny_config(tmp_path, "corrupt", N)
    train_local(cfg)
    state_file = cfg.run_dir / checkpoint_dir_name(N) / STATE_FILE
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError) as info:
        train_local(tiny_config(tmp_path, "corrupt", 2 * N))
    assert str(state_file) in str(info.value)
    assert "corrupt or truncated" in str(info.value)


def test_a_nan_loss_stops_the_local_loop_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, torch_single_thread):
    from akod_ray.errors import TrainingDivergedError

    cfg = tiny_config(tmp_path, "nan", 6, lr=1e30, grad_clip=0.0, ckpt_every=1, warmup_steps=0)
    with pytest.raises(TrainingDivergedError, match=r"^training diverged: loss is (nan|inf) at step (\d+)$") as info:
        train_local(cfg)
    bad_step = int(str(info.value).rsplit(" ", 1)[1])
    assert 2 <= bad_step <= 6
    last = latest_checkpoint(cfg.run_dir)
    state = load_state(last)
    assert state["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class SegmentedSchedule:
    """A schedule source that hands out the same schedule in segments of ``length`` steps, each
    with a request id, and keeps the results the loop posts (what the AKOD broker source does)."""

    def __init__(self, betas: torch.Tensor, length: int):
        from akod_ray.diffusion.process import DiffusionProcess

        self.process, self.length, self.posted = DiffusionProcess(betas), length, []

    def next_segment(self, step, steps_left, trunk):
        from akod_ray.training.loop import Segment

        return Segment(self.process, min(self.length, steps_left), request_id=len(self.posted))

    def finish_segment(self, segment, result, trunk):
        self.posted.append(dict(result, **trunk.reward_profile(), request_id=segment.request_id))

    def heartbeat(self, step):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_segment_end_scores_the_reward_probe_once_and_log_steps_the_reference(tmp_path, torch_single_thread,
                                                                                 monkeypatch):
    """A segment end hands the source the trunk at that step: the reward probe (rl.reward_images x
    rl.reward_grid) it asks for is evaluated once and cached for the step; every log step evaluates the
    reference loss (train.ref_grid x data.val_size) once for its record."""
    from akod_ray.training import credit as credit_module
    from akod_ray.training import step as step_module
    from akod_ray.training.schedule_source import fixed_betas

    calls = []

    def counting(cls):
        original = cls.profile

        def counted(self, model, bf16=False):
            value = original(self, model, bf16)
            calls.append(len(value))
            return value
        monkeypatch.setattr(cls, "profile", counted)

    counting(step_module.ReferenceProtocol)
    counting(credit_module.LevelProbe)
    cfg = tiny_config(tmp_path, "segments", 8, log_every=2)  # log steps 2, 4, 6, 8
    cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, reward_grid=5))
    source = SegmentedSchedule(fixed_betas(cfg), length=4)  # segment ends at 4 and 8
    save_config(cfg, cfg.run_dir)
    run_training(cfg, load_training_data(cfg, None), LocalEnv(cfg.run_dir, num_to_keep=10), cfg.run_dir, source)

    assert [p["step"] for p in source.posted] == [4, 8]
    assert all(len(p["profile"]) == 5 and len(p["profile_logsnr"]) == 5 for p in source.posted)
    records = {r["step"]: r for r in metrics(cfg.run_dir)}
    assert sorted(records) == [2, 4, 6, 8]
    ref = cfg.train.ref_grid
    assert sorted(calls) == sorted([ref] * 4 + [5] * 2)  # 4 log records, 2 segment ends: each evaluated once
    assert "other_reward_s" in records[8] and "other_metrics_s" in records[8]
