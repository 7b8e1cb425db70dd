"""AKOD end to end (issue 4): PPO proposes schedules, Ray Train workers train with them.

- Through a real local Ray (`akod train` subprocess on 2 CPUs): the rewards PPO saw are
  the reference losses the workers posted; the learned schedule is valid and samples.
- A Train worker SIGKILLed mid-segment: the broker re-delivers the request in flight, the
  workers resume from their checkpoint, PPO keeps waiting, the run completes.
- Reward gaming, in plain PyTorch: the literal paper reward (the loss under the proposed
  schedule) prefers a degenerate schedule; the reference reward does not.

The broker timeout with the workers gone is covered in tests/test_rl_env.py
(test_env_fails_within_the_timeout_when_no_worker_answers).
"""

from __future__ import annotations

import copy
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
REPLAYED = re.compile(r"\[akod\] replaying (\d+) answered segment\(s\), steps (\d+) to (\d+)")


def akod_args(root, name: str, *layers: dict) -> list[str]:
    return ["train", CONFIG, *overrides(TINY, {
        "run.root": str(root), "run.name": name, "train.num_workers": 1, "train.cpus_per_worker": 1,
        "dko.probe_size": 8, "rl.segment_steps": K, "rl.train_batch": 2, "rl.broker_timeout_s": 300,
    }, *layers)]


def check_posted(run_dir, steps: int) -> list[dict]:
    """Every schedule request answered exactly once, in order; reward = rl.reward_scale times the
    relative fall of the reward metric over the segment (rl.reward=improvement, the default), with
    credit per knot summing to it."""
    from akod_ray.config import load_config
    from akod_ray.rl.reward import metric_value

    rl = load_config(run_dir / "config.yaml").rl
    posted = read_jsonl(run_dir / "rl" / "posted.jsonl")
    assert [p["request_id"] for p in posted] == list(range(len(posted)))
    for prev, p in zip([None] + posted[:-1], posted):
        assert p["kind"] == "trunk" and p["after_profile"] == p["loss_profile"]
        assert len(p["loss_profile"]) == len(p["profile_logsnr"]) == rl.reward_grid
        assert p["ref_loss"] == pytest.approx(sum(p["loss_profile"]) / rl.reward_grid, rel=1e-12)
        if prev is not None:  # a segment starts where the previous one ended
            assert p["before_profile"] == prev["loss_profile"]
        before, after = (metric_value(rl.reward_metric, p[k], p["profile_logsnr"]) for k in ("before_profile", "after_profile"))
        assert p["reward"] == pytest.approx(rl.reward_scale * (before - after) / before, rel=1e-9)
        if "knot_rewards" in p:  # proposals of the DKO (the final schedule's too)
            assert sum(p["knot_rewards"]) == pytest.approx(p["reward"], rel=1e-9, abs=1e-12)
        assert p["step"] % K == 0 and 0 < p["step"] <= steps
    assert [p["step"] for p in posted] == sorted(p["step"] for p in posted)
    assert posted[-1]["step"] == steps
    return posted


def check_iterations(run_dir, posted: list[dict], batch: int = 2) -> list[dict]:
    """Iteration i's mean episode return is the mean reward of its ``batch`` requests."""
    iterations = read_jsonl(run_dir / "rl" / "iterations.jsonl")
    assert len(iterations) >= 2
    assert [it["iteration"] for it in iterations] == list(range(1, len(iterations) + 1))
    for i, it in enumerate(iterations):
        rewards = [p["reward"] for p in posted[batch * i: batch * (i + 1)]]
        assert len(rewards) == batch and it["num_episodes"] == batch
        assert it["episode_return_mean"] == pytest.approx(sum(rewards) / batch, rel=1e-9, abs=1e-12), i
    return iterations


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_akod_run_end_to_end(tmp_path, akod_runs, capsys):
    require_cifar()
    run_dir = tmp_path / "akod"
    steps = 60  # iterations while > 2 segments are left: at steps 0 and 20; then the final schedule
    run, rc = run_akod(akod_runs, akod_args(tmp_path, "akod", {
        "train.steps": steps, "train.log_every": K, "train.ckpt_every": 2 * K, "train.sample_every": steps}), 360)
    assert rc == 0, run.tail()
    assert re.search(rf"\[akod\] run finished: \S+  \(step {steps}, ref_loss 0\.\d+\)", run.stdout), run.stdout[-2000:]

    posted = check_posted(run_dir, steps)
    iterations = check_iterations(run_dir, posted)
    assert len(iterations) == 2
    assert len(posted) == 5  # 2 iterations x 2 segments, then one final segment of 20 steps
    assert [p["step"] for p in posted] == [10, 20, 30, 40, 60]
    # a segment's reward is measured at its last step, where the run logs its metrics record
    logged = {r["step"]: r["ref_loss"] for r in interval_records(run_dir)}
    assert sorted(logged) == list(range(K, steps + 1, K))
    assert {p["step"] for p in posted} <= set(logged)
    at_step = {p["step"]: p for p in posted}

    # the learned schedule: valid, the one the workers trained the last segment with, and it samples
    from akod_ray.diffusion.schedules import load_schedule

    betas = load_schedule(run_dir / "schedule.json", 1000)
    state = load_state(run_dir / f"checkpoint_{steps:08d}")
    assert state["step"] == steps
    torch.testing.assert_close(state["betas"].to(torch.float64), betas.to(torch.float64), rtol=1e-12, atol=0)
    # ... and the checkpoint's DKO (plain tensors) rebuilds it exactly, at the observation it was made at:
    # the latest result the workers had posted when PPO stopped (the segment ending at step 40)
    from akod_ray.config import load_config
    from akod_ray.diffusion.dko import learned_schedule
    from akod_ray.rl.driver import load_probe_pool, make_observer
    from ray_helpers import CIFAR_DIR

    cfg = load_config(run_dir / "config.yaml")
    dko = state["schedule_source"]["dko"]
    assert dko["context"]["progress"] == pytest.approx(40 / steps) and dko["context"]["loss_profile"]
    assert dko["context"]["ref_loss"] == pytest.approx(at_step[40]["ref_loss"], rel=1e-12)
    assert dko["context"]["loss_profile"] == pytest.approx(at_step[40]["loss_profile"], rel=1e-12)
    rebuilt = learned_schedule(dko, make_observer(cfg, load_probe_pool(cfg, str(CIFAR_DIR))), cfg.dko.hidden)
    assert torch.equal(rebuilt, state["betas"])
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
    steps, every = 80, 2 * K  # PPO iterations at steps 0, 20 and 40, the final schedule from step 60
    run = akod_runs(akod_args(tmp_path, "akodfault", {
        "train.steps": steps, "train.log_every": 1, "train.ckpt_every": every, "train.sample_every": steps,
        "train.max_failures": 2}), "akodfault")

    # kill rank 0 mid-segment (its request in flight) more than a segment after a registered checkpoint,
    # so the restarted group has answered segments to replay
    ckpt_seen, step_at_kill, pid = wait_for_registered_checkpoint(run_dir, run, 360, mid=lambda step: step % K != 0,
                                                                  beyond=K)
    kill_pid(pid, run)
    assert step_at_kill < steps - 2 * K, "the kill must come before PPO's last iteration ends"

    rc = run.wait(480)
    assert rc == 0, run.tail()
    out = run.stdout + run.stderr
    assert "[FailurePolicy] RETRY" in out
    resumed = [int(s) for s in RESUMED.findall(run.stdout)]
    assert len(resumed) == 1 and ckpt_seen <= resumed[0] <= step_at_kill, (resumed, ckpt_seen, step_at_kill)
    assert read_pid(run_dir / "workers" / "rank0.pid") != pid

    # the request in flight at the kill was delivered again and answered once; no request was lost.
    # Segments answered after the checkpoint the group resumed from were replayed, not posted again:
    # every segment starts where the previous answered one ended (check_posted), at the same steps
    # as an uninterrupted run
    posted = check_posted(run_dir, steps)
    assert [p["step"] for p in posted] == [10, 20, 30, 40, 50, 60, 80]
    replays = [tuple(map(int, m)) for m in REPLAYED.findall(run.stdout)]
    answered_after = [p["step"] for p in posted if resumed[0] < p["step"] <= step_at_kill]
    assert len(replays) == 1 if answered_after else len(replays) <= 1, replays  # the kill may land just past a segment end
    for n, start, end in replays:
        assert start == resumed[0] and end >= max(answered_after, default=start)
        assert n == len([p for p in posted if start < p["step"] <= end]), (replays, posted)
    check_iterations(run_dir, posted)
    broker = torch.load(run_dir / "rl" / "broker_state.pt", weights_only=True)
    assert broker["num_redelivered"] >= 1
    assert [r["step"] for r in interval_records(run_dir)] == list(range(1, steps + 1))


# ----------------------------------------------------------------- reward gaming


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_paper_reward_can_be_gamed_and_the_reference_reward_cannot(cifar_dir, torch_single_thread):
    """A schedule that drops to pure noise in its first segment scores best under the paper's reward.

    eps-prediction is trivial at high noise (x_t is almost eps), so the loss under a schedule that
    spends 7/8 of its steps there is small whatever the model learned. The reference reward
    measures every model on the same fixed log-SNR grid: it is identical for two schedules with
    the same weights, and after a segment of K steps trained with each schedule (as the workers
    do) it prefers the sensible ones, because the degenerate schedule taught the model almost
    nothing about the low-noise steps.
    """
    from akod_ray.config import Config, DKOConfig, ModelConfig
    from akod_ray.data.parquet import load_images, to_model_range
    from akod_ray.diffusion.dko import logsnr_knots, schedule_from_knots
    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import fixed_schedule
    from akod_ray.models.unet import UNet
    from akod_ray.rl.reward import reward_from
    from akod_ray.training.loop import reference_process
    from akod_ray.training.step import ReferenceProtocol, StepOptions, make_optimizer, schedule_loss, train_step

    T, seed, pretrain, segment = 1000, 0, 60, 40
    dko = DKOConfig(num_knots=8)
    cfg = Config(dko=dko)
    train = to_model_range(load_images(cifar_dir, "train", count=1024, seed=0))
    val = to_model_range(load_images(cifar_dir, "test", count=32, seed=1))

    def from_actions(actions):
        knots = logsnr_knots(actions, dko.num_knots, dko.logsnr_max, dko.logsnr_min, dko.min_segment_share)
        return DiffusionProcess(schedule_from_knots(knots, T)), knots

    uniform, _ = from_actions([0.0] * (dko.num_knots - 1))  # the DKO's starting point (log-SNR linear in t)
    degenerate, knots = from_actions([10.0] + [0.0] * (dko.num_knots - 2))
    assert knots[1] < dko.logsnr_min + 2.0  # after the first of 8 segments: abar < 3e-4, almost pure noise
    schedules = {"cosine": DiffusionProcess(fixed_schedule("cosine", T)), "uniform": uniform, "degenerate": degenerate}

    def batches(n, s):
        g = torch.Generator().manual_seed(s)
        return [train[torch.randint(0, train.shape[0], (16,), generator=g)] for _ in range(n)]

    # a denoiser trained briefly with a sensible schedule
    torch.manual_seed(seed)
    model = UNet(ModelConfig(channels=(8, 8, 16, 16), bottleneck_channels=16, num_res_blocks=1,
                             attention_resolutions=(), dropout=0.0))
    opt = make_optimizer(model, 2e-3, 0.0)
    g = torch.Generator().manual_seed(seed)
    for x in batches(pretrain, seed):
        train_step(model, schedules["cosine"], [x], opt, StepOptions(), g)
    ref = ReferenceProtocol(reference_process(cfg), val, 8, seed=1234)

    # 1. the same weights: the paper reward already prefers the degenerate schedule; the reference can't tell
    paper_same = {k: schedule_loss(model, p, val) for k, p in schedules.items()}
    assert paper_same["degenerate"] < 0.7 * paper_same["uniform"], paper_same
    assert ref.loss(model) == ref.loss(model)  # no schedule enters it

    # 2. one segment of training from the same weights with each schedule (same batches, same noise seed)
    seg_batches = batches(segment, seed + 99)
    result = {}
    for name, process in schedules.items():
        m = copy.deepcopy(model)
        o = make_optimizer(m, 2e-3, 0.0)
        o.load_state_dict(opt.state_dict())
        gs = torch.Generator().manual_seed(seed + 7)
        for x in seg_batches:
            train_step(m, process, [x], o, StepOptions(), gs)
        after = ref.profile(m)
        result[name] = {"after_profile": after, "ref_loss": sum(after) / len(after),
                        "before_profile": ref.profile(model), "profile_logsnr": ref.grid_logsnr,
                        "paper_loss": schedule_loss(m, process, val)}
    paper = {k: reward_from(r, "paper") for k, r in result.items()}
    reference = {k: reward_from(r, "reference") for k, r in result.items()}
    improvement = {k: reward_from(r, "improvement") for k, r in result.items()}
    assert sorted(improvement, key=improvement.get) == sorted(reference, key=reference.get)  # same start: same ranking
    print("paper reward", paper, "reference reward", reference)

    # the paper reward prefers the degenerate schedule by a wide margin ...
    assert paper["degenerate"] > paper["cosine"] and paper["degenerate"] > paper["uniform"]
    assert result["degenerate"]["paper_loss"] < 0.85 * min(result["cosine"]["paper_loss"], result["uniform"]["paper_loss"])
    # ... the reference reward ranks it last
    assert reference["degenerate"] < reference["cosine"] and reference["degenerate"] < reference["uniform"]
    assert result["degenerate"]["ref_loss"] > 1.03 * result["cosine"]["ref_loss"]
    assert result["degenerate"]["ref_loss"] > 1.1 * result["uniform"]["ref_loss"]
