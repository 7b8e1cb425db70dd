"""The AKOD worker source (akod_ray/rl/worker_source.py): every image's noise level from the DKO's policy,
the learner's decisions where it made them, the slots it saw, the posted result, and restarts.

Ray Train resumes a rebuilt group from the latest checkpoint it registered, which can be a window or more
behind the step the killed group reached. The new rank 0 first trains the windows answered after that
checkpoint again, with their own requests and without posting them, then takes the requests in flight.
(The same through a real Ray Train worker SIGKILL: tests/test_akod_ray.py::test_akod_survives_a_killed_train_worker.)
"""

from __future__ import annotations

import pytest
import torch

from akod_ray.config import load_config
from akod_ray.data.procedural import procedural_images
from akod_ray.data.stream import BatchStream
from akod_ray.diffusion.dko import DKO, DKOPolicy, log_sigma_local, w1_logsnr
from akod_ray.rl.worker_source import BrokerSchedule, decision_steps, prior_process
from akod_ray.training.local import LocalEnv

W, B, N = 10, 8, 4  # window, batch, decision images

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def config(*extra):
    return load_config(None, ["diffusion.schedule=akod", "data.source=procedural", "data.train_subset=256",
                              f"train.batch_size={B}", "train.steps=80", "train.ckpt_every=10",
                              f"rl.segment_steps={W}", "rl.decision_every=5", f"rl.decision_images={N}", "dko.bins=16",
                              "dko.probe_pool=32", "dko.hidden=[8]", *extra])


class FakeTrunk:
    """What the source uses of the trunk: its step, data stream, probe direction, credits, learning rate."""

    def __init__(self, cfg):
        self.step = 0
        self.stream = BatchStream(procedural_images(256, seed=0), B, seed=0)
        self.credited: list[tuple] = []

    def probe_direction(self, seed):
        return [], 0.5

    def image_credits(self, x0, t, noise, direction):
        self.credited.append((self.step, t.clone()))
        return torch.arange(x0.shape[0], dtype=torch.float64), torch.full((x0.shape[0],), 0.2, dtype=torch.float64)

    def learning_rate(self):
        return 1e-3


class FakeClient:
    """The broker as rank 0 sees it: answered windows to replay, then the requests in flight."""

    def __init__(self, replay: list, requests: list):
        self.replay, self.requests = replay, list(requests)
        self.asked: list[int] = []
        self.resumes: list[bool] = []
        self.posted: list[tuple[int, dict]] = []
        self.states: list[dict] = []

    def replay_from(self, step: int) -> list:
        self.asked.append(step)
        return [row for row in self.replay if row[2] > step]

    def post_state(self, state):
        self.states.append(state)

    def next_request(self, timeout_s: float, resume: bool = False):
        self.resumes.append(resume)
        return self.requests.pop(0)

    def post_result(self, rid: int, result: dict) -> bool:
        self.posted.append((rid, result))
        return True


def request(decisions, **extra) -> dict:
    return {"decisions": list(decisions), "context": {"progress": 0.0, "probe_loss": 0.5}, "kind": "window", **extra}


def run_windows(src: BrokerSchedule, trunk: FakeTrunk, n: int, steps: int = 80) -> list:
    """``n`` windows as the training loop runs them; returns (start, length, request_id, t of each step)."""
    out = []
    g = torch.Generator()
    for _ in range(n):
        start = trunk.step
        seg = src.next_segment(trunk.step, steps - trunk.step, trunk)
        ts = []
        for k in range(seg.length):
            batch = trunk.stream.next()
            g.manual_seed(1000 + trunk.step)
            ts.append(seg.sampler.draw(trunk, batch, g, k).t[0])
            trunk.step += 1
        out.append((start, seg.length, seg.request_id, ts))
        if seg.request_id is not None:
            src.finish_segment(seg, {"step": trunk.step, "wall_s": 0.0}, trunk)
    return out


def test_decision_images_train_at_the_learners_bins_and_are_the_slots_it_saw(tmp_path):
    cfg = config()
    trunk = FakeTrunk(cfg)
    client = FakeClient([], [])
    src = BrokerSchedule(cfg, LocalEnv(tmp_path), client, tmp_path)
    src._announce(trunk, 80)
    slots = client.states[0]["slots"]
    assert len(slots) == N * len(decision_steps(cfg, W)) == 8
    # the slots are the log sigma_local of the first N images of steps 0 and 5
    peek = BatchStream(procedural_images(256, seed=0), B, seed=0)
    images = [peek.next()[0] for _ in range(6)]
    want = torch.cat([log_sigma_local(images[0][:N], 7), log_sigma_local(images[5][:N], 7)])
    assert slots == pytest.approx(want.tolist(), abs=1e-5)
    decisions = [0, 15, 3, 7, 8, 8, 1, 2]
    client.requests = [(0, request(decisions, slots=slots))]
    [(_, _, rid, ts)] = run_windows(src, trunk, 1)
    bins = src.bins
    assert bins.of_step(ts[0][:N]).tolist() == decisions[:N] and bins.of_step(ts[5][:N]).tolist() == decisions[N:]
    [(posted_rid, result)] = client.posted
    assert posted_rid == rid == 0 and result["step"] == W and result["decisions"] == decisions
    # one reward per decision: the credit of d_i = i (the fake), lr 1e-3, batch 8, M 0.5, scale 1e4
    assert result["rewards"] == pytest.approx([1e4 * 1e-3 * i / (B * 0.5) for i in range(N)] * 2)
    assert [s for s, _ in trunk.credited] == [0, 5]
    assert sum(result["realised"]) == W * B and sum(result["intended"]) == pytest.approx(W * B, rel=1e-5)
    assert len(result["slots"]) == 8 and result["context"]["progress"] == pytest.approx(W / 80)


def test_mismatched_slots_are_refused(tmp_path):
    cfg = config()
    client = FakeClient([], [(0, request([1] * 8, slots=[0.0] * 8))])
    src = BrokerSchedule(cfg, LocalEnv(tmp_path), client, tmp_path)
    with pytest.raises(RuntimeError, match="not the ones the learner saw"):
        run_windows(src, FakeTrunk(cfg), 1)


def test_the_trunk_trains_on_the_distribution_the_policy_means(tmp_path):
    """Over a run of windows (every image's bin from a non-trivial policy, the learner's decisions drawn from the
    same policy), the bins the trunk trained on match the policy's summed probabilities: the realised
    distribution is the intended one, within sampling error."""
    cfg = config("train.steps=400")
    torch.manual_seed(3)
    net = DKO(16, (8,))
    torch.nn.init.normal_(net.head.weight, std=1.0)
    torch.nn.init.normal_(net.head.bias, std=1.0)
    dko = {"weights": net.state_dict(), "iteration": 1}
    src = BrokerSchedule(cfg, LocalEnv(tmp_path), FakeClient([], []), tmp_path)
    policy = DKOPolicy({"weights": net.state_dict(), "context": {"progress": 0.0, "probe_loss": 0.5}}, src.bins,
                       cfg.dko.floor, (8,), 7)
    trunk = FakeTrunk(cfg)
    g = torch.Generator().manual_seed(0)
    client = src.client
    src._announce(trunk, 400)
    for w in range(40):
        slots = client.states[-1]["slots"] if not client.posted else client.posted[-1][1]["slots"]
        p = policy.probs(torch.tensor(slots))
        decisions = torch.multinomial(p, 1, generator=g).squeeze(1).tolist()
        client.requests.append((w, request(decisions, slots=slots, dko=dko)))
        # the env's context is the one the learner observed; use the policy's fixed one for every window here
        run_windows(src, trunk, 1, steps=400)
    realised = torch.tensor([r["realised"] for _, r in client.posted]).sum(0)
    intended = torch.tensor([r["intended"] for _, r in client.posted]).sum(0)
    assert realised.sum() == intended.sum().round() == 400 * B
    chi2 = float(((realised - intended) ** 2 / intended).sum())
    assert chi2 < 45  # 15 degrees of freedom: p ~ 1e-4 beyond
    prior_t = prior_process(cfg).log_snr
    w1 = w1_logsnr(src.bins.step_distribution(realised), src.bins.step_distribution(intended), prior_t)
    moved = w1_logsnr(src.bins.step_distribution(intended), src.bins.step_distribution(src.bins.mass), prior_t)
    assert w1 < 0.05 and moved > 4 * w1  # the policy moved far from the prior; what was trained followed it


def test_a_restarted_group_replays_the_answered_windows_then_takes_the_request_in_flight(tmp_path, capsys):
    cfg = config()
    trunk = FakeTrunk(cfg)
    # what the killed group did: windows 0-20 answered (checkpoint at 10), window 20-30 in flight
    first = FakeClient([], [])
    src0 = BrokerSchedule(cfg, LocalEnv(tmp_path / "a"), first, tmp_path / "a")
    src0._announce(trunk, 80)
    reqs = []
    for w in range(3):
        slots = first.states[-1]["slots"] if not first.posted else first.posted[-1][1]["slots"]
        reqs.append(request([w % 16] * 8, slots=slots))
        first.requests.append((w, reqs[-1]))
        run_windows(src0, trunk, 1)
    replay = [[0, reqs[0], 10], [1, reqs[1], 20]]
    client = FakeClient(replay, [(2, reqs[2])])
    src = BrokerSchedule(cfg, LocalEnv(tmp_path / "b"), client, tmp_path / "b")
    trunk2 = FakeTrunk(cfg)
    trunk2.stream.load_state_dict({"epoch": 0, "offset": 10 * B})
    trunk2.step = 10
    out = run_windows(src, trunk2, 2)
    assert [(s, n, rid) for s, n, rid, _ in out] == [(10, W, None), (20, W, 2)]
    assert client.asked == [10] and client.resumes == [True]
    [(rid, result)] = client.posted  # the replay was not posted again
    assert rid == 2 and result["step"] == 30
    assert result["rewards"] == first.posted[2][1]["rewards"]
    assert "replaying 1 answered window(s), steps 10 to 20" in capsys.readouterr().out


def test_the_local_broker_keeps_answered_windows_like_the_actor():
    from akod_ray.rl.local_broker import LocalBroker

    broker = LocalBroker(timeout_s=5.0)
    rids = [broker.submit(request([i])) for i in range(3)]
    for rid, step, kind in zip(rids, (10, 10, 20), ("trunk", "other", "trunk")):
        assert broker.next_request(1.0)[0] == rid
        broker.post_result(rid, {"step": step, "kind": kind})
    assert broker.replay_from(0) == [[rids[0], request([0]), 10], [rids[2], request([2]), 20]]
    assert broker.replay_from(10) == [[rids[2], request([2]), 20]]
