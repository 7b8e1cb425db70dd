"""Where the figures come from (issue 18): evaluation in eval mode, every random draw of a step under
(seed, rank, step), a divergence guard that sees gradients, and no step evaluated twice.

One process, no Ray (``run_training`` with a :class:`LocalEnv`); dropout 0.1 wherever randomness is
the point, so that a mask drawn from an uncontrolled generator shows in the weights. The two-worker
cases are in tests/test_two_workers.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from akod_ray.cli import main
from akod_ray.config import save_config
from akod_ray.data.sources import load_training_data
from akod_ray.errors import TrainingDivergedError
from akod_ray.training.checkpoint import checkpoint_dir_name, latest_checkpoint, load_state
from akod_ray.training.local import LocalEnv
from akod_ray.training.loop import TrainingRun, global_seed, step_seed
from akod_ray.training.schedule_source import fixed_betas, fixed_source
from test_train_local import N, SegmentedSchedule, tiny_config, train_local

pytestmark = pytest.mark.usefixtures("torch_single_thread_module")

DETERMINISTIC = ("step", "loss", "ref_loss", "lr", "fid_c10", "fid_c10_n")  # what a record holds besides clocks


def with_dropout(cfg, dropout: float = 0.1, **eval_changes):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=dropout),
                               eval=dataclasses.replace(cfg.eval, **eval_changes))


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in DETERMINISTIC} for line in lines if line.strip()]


def build(cfg, env=None, source=None) -> TrainingRun:
    save_config(cfg, cfg.run_dir)
    env = env or LocalEnv(cfg.run_dir, num_to_keep=10)
    return TrainingRun(cfg, load_training_data(cfg, None), env, cfg.run_dir, source or fixed_source(cfg))


# --------------------------------------------------------------------------- resume and branches (items 2, 3)


@pytest.fixture(scope="module")
def straight_and_resumed_with_dropout(tmp_path_factory):
    """2N steps straight, and N steps then N more after a resume; dropout 0.1, fid_c10 (so an
    evaluation model is built) at step N in both."""
    root = tmp_path_factory.mktemp("runs")
    straight = with_dropout(tiny_config(root, "straight", 2 * N), fid_every=N)
    train_local(straight)
    train_local(with_dropout(tiny_config(root, "resumed", N), fid_every=N))
    resumed = with_dropout(tiny_config(root, "resumed", 2 * N), fid_every=N)
    train_local(resumed)
    return straight.run_dir, resumed.run_dir


def test_a_resumed_run_with_dropout_is_the_uninterrupted_run_bit_for_bit(straight_and_resumed_with_dropout):
    straight_dir, resumed_dir = straight_and_resumed_with_dropout
    a = load_state(straight_dir / checkpoint_dir_name(2 * N))
    b = load_state(resumed_dir / checkpoint_dir_name(2 * N))
    start = load_state(straight_dir / checkpoint_dir_name(N))
    assert max((a["model"][k] - start["model"][k]).abs().max().item() for k in a["model"]) > 1e-4  # it trained
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]))
    ra, rb = records(straight_dir), records(resumed_dir)
    assert [r["step"] for r in ra] == [2, 4, 4, 6, 8, 8]  # interval records, fid_c10 at N and 2N
    assert sum("fid_c10" in r for r in ra) == 2
    assert ra == rb  # losses, reference losses, learning rates and fid_c10, exactly


def test_branch_replays_with_dropout_are_identical(tmp_path):
    cfg = with_dropout(tiny_config(tmp_path, "branches", 4))
    run = build(cfg)
    run.process = fixed_source(cfg).process
    for step in range(2):  # a trunk that has trained, so that the global generator has moved
        run.train_one_step(run.process, step_seed(cfg.train.seed, 0, step))
        run.step += 1
    first, second = run.branch(run.process, 2), run.branch(run.process, 2)
    assert first == second  # the branch's reference loss, exactly

    snapshot, data = run.runner.snapshot(), copy.deepcopy(run.stream.state_dict())
    weights = []
    for _ in range(2):
        run.stream.load_state_dict(data)
        for j in range(2):
            run.train_one_step(run.process, 1000 + j)
        weights.append([p.detach().clone() for p in run.raw.parameters()])
        run.runner.restore(snapshot)
    assert all(torch.equal(p, q) for p, q in zip(*weights))
    # ... and dropout is at work: one step with the same batch, t and noise but another global seed
    # trains other weights
    one_step = []
    for rng_seed in (global_seed(1000), 1):
        run.stream.load_state_dict(data)
        run.runner(run.stream.next(run.env.device), run.process, torch.Generator().manual_seed(1000), rng_seed=rng_seed)
        one_step.append([p.detach().clone() for p in run.raw.parameters()])
        run.runner.restore(snapshot)
    assert not all(torch.equal(p, q) for p, q in zip(*one_step))


# --------------------------------------------------------------------------- ranks (item 4)


def global_seeds_of_a_step(cfg, rank: int, world_size: int) -> tuple[int, int]:
    """The global generator's seed when the model runs at step 0 on ``rank``, and the t/noise seed."""

    class Env(LocalEnv):
        pass

    Env.rank, Env.world_size = rank, world_size
    run = build(cfg, Env(cfg.run_dir))
    seen = []
    run.raw.register_forward_pre_hook(lambda module, args: seen.append(torch.initial_seed()))
    run.process = fixed_source(cfg).process
    seed = step_seed(cfg.train.seed, rank, 0)
    run.train_one_step(run.process, seed)
    assert len(seen) == 1
    return seen[0], seed


def test_workers_draw_distinct_dropout_masks_each_from_its_own_seed(tmp_path):
    cfg = with_dropout(tiny_config(tmp_path, "ranks", 4))
    rank0, noise0 = global_seeds_of_a_step(cfg, 0, 2)
    rank1, noise1 = global_seeds_of_a_step(cfg, 1, 2)
    assert rank0 != rank1  # distinct streams, as one process drawing masks for the whole batch
    assert rank0 not in (noise0, noise1) and rank1 not in (noise0, noise1)  # and not the t/noise seeds
    assert global_seeds_of_a_step(cfg, 1, 2)[0] == rank1  # a function of (seed, rank, step) only


# --------------------------------------------------------------------------- eval mode (item 1)


def test_in_run_fid_c10_equals_akod_fid_on_the_same_checkpoint_sampler_and_seed(tmp_path, capsys):
    from akod_ray.evaluation import fid
    from akod_ray.evaluation.feature_net import DEFAULT_C10_REFERENCE

    if not DEFAULT_C10_REFERENCE.is_file():
        pytest.skip("the shipped fid_c10 reference statistics are missing")
    cfg = with_dropout(tiny_config(tmp_path, "fid", N))
    train_local(cfg)
    [in_run] = [r for r in records(cfg.run_dir) if "fid_c10" in r]
    assert in_run["step"] == N and in_run["fid_c10_n"] == cfg.eval.fid_samples
    seed = cfg.train.seed * 7919 + N  # offline_fid's generator on rank 0 at step N
    ckpt = cfg.run_dir / checkpoint_dir_name(N)
    offline = fid.fid_from_checkpoint(ckpt, DEFAULT_C10_REFERENCE, n=cfg.eval.fid_samples, seed=seed)
    assert offline.value == in_run["fid_c10"]
    capsys.readouterr()
    assert main(["fid", str(ckpt), "--feature", "c10", "--ref", str(DEFAULT_C10_REFERENCE), "--n",
                 str(cfg.eval.fid_samples), "--seed", str(seed), "--sampler", cfg.eval.sampler, "--steps",
                 str(cfg.eval.sampler_steps)]) == 0
    assert re.search(rf"fid_c10 = {in_run['fid_c10']:.3f} \(N = {cfg.eval.fid_samples} samples", capsys.readouterr().out)


# --------------------------------------------------------------------------- the guard sees gradients (item 6)


def infinite_gradient_at(run: TrainingRun, call: int) -> None:
    """The first parameter's gradient is +inf at the ``call``-th backward pass; the loss stays finite."""
    calls = []

    def hook(grad):
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == call else grad

    next(run.raw.parameters()).register_hook(hook)


def test_an_infinite_gradient_on_a_checkpoint_step_is_never_checkpointed(tmp_path):
    cfg = tiny_config(tmp_path, "infgrad", 6, ckpt_every=2, log_every=10)
    run = build(cfg)
    infinite_gradient_at(run, 4)  # step 4: a checkpoint step, not a log step
    with pytest.raises(TrainingDivergedError, match=r"^training diverged: gradient norm is inf at step 4$"):
        run.resume()
        run.run()
    last = load_state(latest_checkpoint(cfg.run_dir))
    assert last["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(s).all() for s in last["ema"]["shadow"])


# --------------------------------------------------------------------------- the budget's end (item 8)


class CountingEnv(LocalEnv):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reports: list[int] = []
        self.with_checkpoint: list[bool] = []

    def report(self, metrics, state, step):
        self.reports.append(step)
        self.with_checkpoint.append(state is not None)
        super().report(metrics, state, step)


class SpendsTheBudgetAtStep(SegmentedSchedule):
    """Segments of ``length`` steps; the schedule wait at ``step`` spends the time budget (as branch
    rollouts may)."""

    def __init__(self, betas, length, step):
        super().__init__(betas, length)
        self.at = step

    def next_segment(self, step, steps_left, trunk):
        if step == self.at:
            trunk.budget_offset += 1e9
        return super().next_segment(step, steps_left, trunk)


def test_a_budget_spent_at_a_segment_start_evaluates_the_last_step_once(tmp_path):
    cfg = tiny_config(tmp_path, "budget", 8, log_every=2, ckpt_every=4, sample_every=4, max_wall_s=1e6)
    env = CountingEnv(cfg.run_dir, num_to_keep=10)
    run = build(cfg, env, SpendsTheBudgetAtStep(fixed_betas(cfg), length=4, step=4))
    run.resume()
    last = run.run()
    fid = [4] if "fid_c10" in last else []  # fid_c10 at the end, when the shipped classifier is there
    assert [r["step"] for r in records(cfg.run_dir)] == [2, 4] + fid  # each interval record once
    # a report at every evaluation (issue 22: Tune sees progress live), each once; one checkpoint, at the last step;
    # the final fid_c10 (due only once the run ends) reaches Tune in a report of its own
    assert list(zip(env.reports, env.with_checkpoint)) == [(2, False), (4, True)] + [(4, False) for _ in fid]
    assert sorted(p.name for p in (cfg.run_dir / "samples").iterdir()) == ["grid_00000004.png"]
    assert last["step"] == 4 and last["img_per_s"] > 0


def test_a_diverged_trunk_posts_no_segment_result(tmp_path):
    """The reward of a segment whose gradients went infinite would be NaN: the run stops at the segment end."""
    cfg = tiny_config(tmp_path, "reward", 8, log_every=10, ckpt_every=8)
    source = SegmentedSchedule(fixed_betas(cfg), length=4)
    run = build(cfg, source=source)
    infinite_gradient_at(run, 3)
    with pytest.raises(TrainingDivergedError, match=r"^training diverged: gradient norm is inf at step 3$"):
        run.resume()
        run.run()
    assert source.posted == []
