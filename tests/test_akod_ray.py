"""AKOD end to end (issues 4, 21): PPO decides the noise levels of the decision images, Ray Train workers
train with the DKO's distribution and post one reward per decision.

- Through a real local Ray (`akod train` subprocess on 2 CPUs): every window answered once, in order;
  every decision rewarded with the credit the workers measured; PPO saw exactly those rewards; the
  trunk trained on every image of every step; the exported schedule is the checkpoint's, and samples.
- A Train worker SIGKILLed mid-window: the broker re-delivers the request in flight, the new group
  replays the windows answered after its checkpoint, PPO keeps waiting, the run completes, and every
  window starts where the previous answered one ended.

The broker timeout with the workers gone is covered in tests/test_rl_env.py
(test_env_fails_within_the_timeout_when_no_worker_answers); the null-reward control and the paper's
gameable reward in tests/test_akod_local.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from akod_ray.training.checkpoint import load_state
from ray_helpers import (  # noqa: F401 - akod_runs is a fixture
    TINY,
    TUNE_CONFIGS,
    akod_runs,
    interval_records,
    kill_pid,
    overrides,
    read_jsonl,
    read_pid,
    require_cifar,
    run_akod,
    wait_for_registered_checkpoint,
)

CONFIG = str(TUNE_CONFIGS / "tiny_akod.yaml")
K = 10  # rl.segment_steps
RESUMED = re.compile(r"\[akod\] resumed from the checkpoint at step (\d+)")
REPLAYED = re.compile(r"\[akod\] replaying (\d+) answered window\(s\), steps (\d+) to (\d+)")
DECISIONS = 3 * 4  # decision steps 0, 4, 8 of a 10-step window, 4 images each (tiny_akod.yaml)


def akod_args(root, name: str, *layers: dict) -> list[str]:
    return ["train", CONFIG, *overrides(TINY, {
        "run.root": str(root), "run.name": name, "train.num_workers": 1, "train.cpus_per_worker": 1,
        "rl.segment_steps": K, "rl.train_batch": 2, "rl.minibatch_size": 12, "rl.broker_timeout_s": 300,
        "dko.probe_pool": 32, "rl.probe_pairs": 8,
    }, *layers)]


def check_posted(run_dir, steps: int) -> list[dict]:
    """Every window answered exactly once, in order, each starting where the previous one ended; one reward per
    decision, the credit of the derivative the workers measured: rl.reward_scale x lr d_i / (B M)."""
    from akod_ray.config import load_config
    from akod_ray.training.step import lr_at

    cfg = load_config(run_dir / "config.yaml")
    posted = read_jsonl(run_dir / "rl" / "posted.jsonl")
    assert [p["request_id"] for p in posted] == list(range(len(posted)))
    for prev, p in zip([None] + posted[:-1], posted):
        assert p["kind"] == "trunk" and p["step"] % K == 0 and 0 < p["step"] <= steps
        assert len(p["rewards"]) == len(p["decisions"]) == len(p["derivatives"]) == DECISIONS
        # the decision steps' learning rate: the window's steps are past the warm-up but its first
        lrs = [lr_at(p["step"] - K + k, cfg.train.lr, cfg.train.warmup_steps) for k in (0, 4, 8) for _ in range(4)]
        want = [cfg.rl.reward_scale * lr * d / (cfg.train.batch_size * p["probe_loss_start"])
                for lr, d in zip(lrs, p["derivatives"])]
        assert p["rewards"] == pytest.approx(want, rel=1e-9)
        assert sum(p["realised"]) == K * cfg.train.batch_size  # every image of the window had its bin
        assert sum(p["intended"]) == pytest.approx(K * cfg.train.batch_size, rel=1e-5)
        if prev is not None:  # a window starts where the previous one ended: the same probe, measured once
            assert p["probe_loss_start"] == prev["probe_loss"]
    assert [p["step"] for p in posted] == list(range(K, steps + 1, K))
    return posted


def check_iterations(run_dir, posted: list[dict], batch: int = 2) -> list[dict]:
    """Iteration i trained on its ``batch`` windows' decisions, each with its reward about its window's mean (so
    the episodes' returns are 0)."""
    iterations = read_jsonl(run_dir / "rl" / "iterations.jsonl")
    assert len(iterations) >= 2
    assert [it["iteration"] for it in iterations] == list(range(1, len(iterations) + 1))
    for i, it in enumerate(iterations):
        assert len(posted[batch * i: batch * (i + 1)]) == batch
        assert it["num_episodes"] == batch and it["samples_trained"] == batch * DECISIONS
        assert it["episode_return_mean"] == pytest.approx(0.0, abs=1e-9), i
    return iterations


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_akod_run_end_to_end(tmp_path, akod_runs, capsys):
    require_cifar()
    run_dir = tmp_path / "akod"
    steps = 60
    run, rc = run_akod(akod_runs, akod_args(tmp_path, "akod", {
        "train.steps": steps, "train.log_every": K, "train.ckpt_every": 2 * K, "train.sample_every": steps}), 360)
    assert rc == 0, run.tail()
    assert re.search(rf"\[akod\] run finished: \S+  \(step {steps}, ref_loss 0\.\d+\)", run.stdout), run.stdout[-2000:]

    posted = check_posted(run_dir, steps)
    iterations = check_iterations(run_dir, posted)
    assert len(iterations) == 3 and len(posted) == 6  # 3 iterations of 2 windows: the run's 60 steps
    # the exported schedule is the one the last window's policy gave, the checkpoint's, and it samples
    from akod_ray.diffusion.schedules import load_schedule

    betas = load_schedule(run_dir / "schedule.json", 1000)
    state = load_state(run_dir / f"checkpoint_{steps:08d}")
    assert state["step"] == steps
    torch.testing.assert_close(state["betas"].to(torch.float64), betas.to(torch.float64), rtol=1e-12, atol=0)
    dko = state["schedule_source"]["dko"]
    assert set(dko) >= {"weights", "context", "module", "iteration"} and dko["iteration"] == 2
    assert dko["context"] == posted[-2]["context"]  # the last window observed the state at its start
    from akod_ray.cli import main

    out = tmp_path / "akod.png"
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--schedule", str(run_dir / "schedule.json"), "--out", str(out),
                 "--n", "4", "--steps", "3"]) == 0, capsys.readouterr().err
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (70, 70)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_akod_survives_a_killed_train_worker(tmp_path, akod_runs):
    require_cifar()
    run_dir = tmp_path / "akodfault"
    steps, every = 80, 2 * K  # 8 windows, 4 PPO iterations
    run = akod_runs(akod_args(tmp_path, "akodfault", {
        "train.steps": steps, "train.log_every": 1, "train.ckpt_every": every, "train.sample_every": steps,
        "train.max_failures": 2}), "akodfault")

    # kill rank 0 mid-window (its request in flight) more than a window after a registered checkpoint,
    # so the restarted group has answered windows to replay
    ckpt_seen, step_at_kill, pid = wait_for_registered_checkpoint(run_dir, run, 360, mid=lambda step: step % K != 0,
                                                                  beyond=K)
    kill_pid(pid, run)
    assert step_at_kill < steps - 2 * K, "the kill must come before the last iteration's windows"

    rc = run.wait(480)
    assert rc == 0, run.tail()
    out = run.stdout + run.stderr
    assert "[FailurePolicy] RETRY" in out
    resumed = [int(s) for s in RESUMED.findall(run.stdout)]
    assert len(resumed) == 1 and ckpt_seen <= resumed[0] <= step_at_kill, (resumed, ckpt_seen, step_at_kill)
    assert read_pid(run_dir / "workers" / "rank0.pid") != pid

    # the request in flight at the kill was delivered again and answered once; no request was lost.
    # Windows answered after the checkpoint the group resumed from were replayed, not posted again:
    # every window starts where the previous answered one ended (check_posted: the same probe loss, to
    # the bit), at the same steps as an uninterrupted run
    posted = check_posted(run_dir, steps)
    replays = [tuple(map(int, m)) for m in REPLAYED.findall(run.stdout)]
    answered_after = [p["step"] for p in posted if resumed[0] < p["step"] <= step_at_kill]
    assert len(replays) == 1 if answered_after else len(replays) <= 1, replays  # the kill may land just past a window end
    for n, start, end in replays:
        assert start == resumed[0] and end >= max(answered_after, default=start)
        assert n == len([p for p in posted if start < p["step"] <= end]), (replays, posted)
    check_iterations(run_dir, posted)
    broker = torch.load(run_dir / "rl" / "broker_state.pt", weights_only=True)
    assert broker["num_redelivered"] >= 1
    assert [r["step"] for r in interval_records(run_dir)] == list(range(1, steps + 1))
