"""The AKOD arm in one process (LocalBroker, LocalEnv, real RLlib PPO): branch rollouts, the reward,
and the schedule kept (issue 11): what the trunk trained with after PPO stopped, the exported
schedule.json and the schedule rebuilt from a checkpoint's DKO state are the same numbers, and
they are the DKO's deterministic output at the latest observation."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from akod_ray.config import load_config
from akod_ray.data.sources import load_training_data
from akod_ray.diffusion.dko import DKOContext, learned_schedule
from akod_ray.diffusion.schedules import load_schedule
from akod_ray.rl.driver import make_observer, probe_pool_of, train_akod_local
from akod_ray.rl.reward import metric_value
from akod_ray.rl.worker_source import BrokerSchedule
from akod_ray.training.checkpoint import latest_checkpoint, load_state
from akod_ray.training.local import LocalEnv
from ray_helpers import TUNE_CONFIGS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def tiny(tmp_path, name: str, *extra: str):
    return load_config(TUNE_CONFIGS / "tiny_akod.yaml", [
        "data.source=procedural", "data.train_subset=128", "data.val_size=8", "train.batch_size=8",
        f"run.root={tmp_path}", f"run.name={name}", "train.log_every=4", "train.sample_every=1000",
        "rl.segment_steps=4", "dko.probe_pool=32", "dko.probe_size=8", "eval.fid_samples=8", "eval.sampler_steps=2",
        *extra])


def test_branch_rollouts_share_their_start_and_the_trunk_keeps_the_dko_that_made_its_schedule(
        tmp_path, local_ray, torch_single_thread):
    cfg = tiny(tmp_path, "branches", "train.steps=12", "train.ckpt_every=4", "rl.branches=2", "rl.branch_steps=2",
               "rl.train_batch=2", "rl.minibatch_size=6")
    data = load_training_data(cfg, None)
    last = train_akod_local(cfg, data)
    assert last["step"] == 12 and last["other_branches_s"] > 0
    posted = [json.loads(x) for x in (cfg.run_dir / "rl" / "posted.jsonl").read_text().splitlines()]
    kinds = [p["kind"] for p in posted]
    # PPO while another iteration fits (12 steps, segments of 4): rounds at steps 0 and 4, then the final
    assert kinds == ["branch", "branch", "trunk", "branch", "branch", "trunk", "trunk"], kinds
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metric = lambda p, key: metric_value(cfg.rl.reward_metric, p[key], p["profile_logsnr"])  # noqa: E731
    for round_ in (posted[0:2], posted[3:5]):
        # the branches start from the trunk's probe profile, shared, and the trunk did not move
        assert round_[0]["before_profile"] == round_[1]["before_profile"] == round_[0]["loss_profile"]
        assert round_[0]["ref_loss"] == mean(round_[0]["loss_profile"])
        for p in round_:
            before, after = metric(p, "before_profile"), metric(p, "after_profile")
            assert p["reward"] == pytest.approx(cfg.rl.reward_scale * (before - after) / before, rel=1e-12)
    assert posted[3]["before_profile"] == posted[2]["loss_profile"]  # the next round starts where the trunk segment ended
    assert posted[6]["before_profile"] == posted[5]["loss_profile"]  # so does the final segment

    # the schedule the trunk trained with after PPO stopped == schedule.json == rebuilt from the checkpoint
    state = load_state(latest_checkpoint(cfg.run_dir))
    dko = state["schedule_source"]["dko"]
    exported = load_schedule(cfg.run_dir / "schedule.json", cfg.diffusion.T)
    observer = make_observer(cfg, probe_pool_of(cfg, data.train))
    rebuilt = learned_schedule(dko, observer, cfg.dko.hidden)
    assert torch.equal(rebuilt, state["betas"]) and torch.equal(exported, state["betas"])
    assert json.loads((cfg.run_dir / "schedule.json").read_text())["final"] is True
    # ... made at the latest observation: the trunk segment that ended at step 8 and the last episode's probe
    ctx = DKOContext.from_dict(dko["context"])
    assert ctx.progress == pytest.approx(8 / 12) and ctx.ref_loss == posted[5]["ref_loss"]
    assert ctx.loss_profile and ctx.probe_seed == posted[5]["context"]["probe_seed"]
    # a resumed worker restores the same DKO state into its next checkpoint
    source = BrokerSchedule(cfg, LocalEnv(cfg.run_dir), None)
    source.load_state_dict(state["schedule_source"])
    assert source.state_dict()["dko"] is dko


def test_without_branches_the_trunk_segments_are_the_episodes(tmp_path, local_ray, torch_single_thread):
    cfg = tiny(tmp_path, "episodes", "train.steps=16", "train.ckpt_every=8", "rl.train_batch=2", "rl.minibatch_size=6")
    last = train_akod_local(cfg, load_training_data(cfg, None))
    posted = [json.loads(x) for x in (cfg.run_dir / "rl" / "posted.jsonl").read_text().splitlines()]
    # one iteration (the segments ending at 4 and 8), then the final schedule for the remaining 8 steps
    assert last["ppo_iterations"] == 1 and [p["kind"] for p in posted] == ["trunk"] * 3
    assert [p["step"] for p in posted] == [4, 8, 16]
    iterations = [json.loads(x) for x in (cfg.run_dir / "rl" / "iterations.jsonl").read_text().splitlines()]
    assert iterations[0]["episode_return_mean"] == pytest.approx((posted[0]["reward"] + posted[1]["reward"]) / 2)


class Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_akod_resume_never_unpickles_what_is_planted_in_the_run_folder(tmp_path, local_ray, torch_single_thread):
    """Issue 12: the AKOD driver's resume reads the Train checkpoint and the broker state as plain data only;
    a payload planted in the broker state or in an RLlib checkpoint folder never runs."""
    import pickle

    from akod_ray.errors import CheckpointError
    from akod_ray.rl.driver import load_broker_state, resume_policy
    from akod_ray.rl.env import make_env_config
    from akod_ray.rl.ppo import build_ppo, rl_state_dict

    cfg = tiny(tmp_path, "payload", "train.steps=8", "train.ckpt_every=4", "rl.train_batch=1", "rl.minibatch_size=3")
    data = load_training_data(cfg, None)
    train_akod_local(cfg, data)
    marker = tmp_path / "payload_ran"
    rl = cfg.run_dir / "rl"
    (rl / "algorithm").mkdir()
    for name in ("algorithm_state.pkl", "rllib_checkpoint.json", "class_and_ctor_args.pkl"):
        (rl / "algorithm" / name).write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"x": Payload(marker)}, rl / "broker_state.pt")

    with pytest.raises(CheckpointError, match="broker_state.pt' is not plain data"):
        load_broker_state(rl / "broker_state.pt")
    algo = build_ppo(cfg, make_env_config(cfg, probe_pool_of(cfg, data.train).numpy(), "payload"))
    try:
        dko = resume_policy(algo, cfg.run_dir)  # the policy comes back from the checkpoint's plain tensors
        assert dko is not None
        restored = rl_state_dict(algo)
        assert all(torch.equal(restored[k], v) for k, v in dko["module"].items())
    finally:
        algo.stop()
    assert not marker.exists()


def test_credit_per_knot_reaches_the_learner_and_every_sample_and_cost_is_counted(tmp_path, local_ray,
                                                                                   torch_single_thread):
    """AKOD v2 in miniature: short trunk decisions, the reward probe, credit per knot. Every PPO iteration
    trains on rl.train_batch episodes of K - 1 samples each; the knot rewards the workers post sum to the
    episode's reward; the probe's and the schedule waits' costs are in the metrics."""
    cfg = tiny(tmp_path, "knots", "train.steps=24", "train.ckpt_every=8", "rl.train_batch=2", "rl.minibatch_size=6",
               "rl.credit=knot", "rl.reward_grid=6", "rl.reward_images=4", "dko.prior=laplace",
               "rl.reward_metric=eps_edm")
    last = train_akod_local(cfg, load_training_data(cfg, None))
    K1 = cfg.dko.num_knots - 1
    posted = [json.loads(x) for x in (cfg.run_dir / "rl" / "posted.jsonl").read_text().splitlines()]
    iterations = [json.loads(x) for x in (cfg.run_dir / "rl" / "iterations.jsonl").read_text().splitlines()]
    # one decision per segment; with two segments left (no room for another iteration) the final schedule
    assert [p["step"] for p in posted] == [4, 8, 12, 16, 24]
    assert len(iterations) == last["ppo_iterations"] == 2
    assert all(i["samples_trained"] == cfg.rl.train_batch * K1 for i in iterations)
    for p in posted[: 2 * len(iterations)]:
        assert len(p["knot_rewards"]) == K1
        assert sum(p["knot_rewards"]) == pytest.approx(p["reward"], rel=1e-9, abs=1e-12)
        assert len(p["before_profile"]) == len(p["after_profile"]) == 6
    # PPO saw the posted rewards (the same sum per episode, whatever the split)
    first = iterations[0]["episode_return_mean"]
    assert first == pytest.approx((posted[0]["reward"] + posted[1]["reward"]) / 2, rel=1e-6)
    assert last["other_reward_s"] > 0 and last["other_schedule_wait_s"] > 0
