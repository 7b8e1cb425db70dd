"""The AKOD worker source after a restart (akod_ray/rl/worker_source.py): replay, then re-delivery.

Ray Train resumes a rebuilt group from the latest checkpoint it registered, which can be a segment
or more behind the step the killed group reached. The new rank 0 first trains the segments answered
after that checkpoint again, with their own schedules and without posting them, then takes the
requests in flight: the next result starts where the last answered segment ended. (The same
through a real Ray Train worker SIGKILL: tests/test_akod_ray.py::test_akod_survives_a_killed_train_worker.)
"""

from __future__ import annotations

import torch

from akod_ray.config import load_config
from akod_ray.diffusion.schedules import fixed_schedule
from akod_ray.rl.worker_source import BrokerSchedule
from akod_ray.training.local import LocalEnv

T, K = 1000, 10


def schedule(scale: float, **extra) -> dict:
    return {"betas": (fixed_schedule("linear", T) * scale).tolist(), **extra}


class FakeClient:
    """The broker as rank 0 sees it: answered segments to replay, then the requests in flight."""

    def __init__(self, replay: list, requests: list):
        self.replay, self.requests = replay, list(requests)
        self.asked: list[int] = []
        self.resumes: list[bool] = []
        self.posted: list[tuple[int, dict]] = []

    def replay_from(self, step: int) -> list:
        self.asked.append(step)
        return [row for row in self.replay if row[2] > step]

    def next_request(self, timeout_s: float, resume: bool = False):
        self.resumes.append(resume)
        return self.requests.pop(0)

    def post_result(self, rid: int, result: dict) -> bool:
        self.posted.append((rid, result))
        return True


class FakeTrunk:
    def __init__(self):
        self.step = 0

    def reward_profile(self) -> dict:
        return {"profile": [1.0 / (1 + self.step)] * 3, "profile_logsnr": [-1.0, 0.0, 1.0], "step": self.step}


def source(tmp_path, client: FakeClient) -> BrokerSchedule:
    cfg = load_config(None, [f"rl.segment_steps={K}", "rl.reward_grid=3"])
    return BrokerSchedule(cfg, LocalEnv(tmp_path), client, tmp_path)


def run_segments(src: BrokerSchedule, trunk: FakeTrunk, start: int, steps: int, n: int) -> list:
    """``n`` segments from step ``start`` as the training loop runs them: (start, length, request_id, betas[0])."""
    out, trunk.step = [], start
    for _ in range(n):
        seg = src.next_segment(trunk.step, steps - trunk.step, trunk)
        out.append((trunk.step, seg.length, seg.request_id, round(float(seg.process.betas[0]), 10)))
        trunk.step += seg.length
        if seg.request_id is not None:
            src.finish_segment(seg, trunk.reward_profile())
    return out


def test_a_restarted_group_replays_the_answered_segments_then_takes_the_request_in_flight(tmp_path, capsys):
    a, b, c = schedule(1.0), schedule(0.5, dko={"w": torch.ones(2)}), schedule(0.25)
    client = FakeClient(replay=[[1, a, 20], [2, b, 30], [3, b, 40]], requests=[(4, c)])
    src = source(tmp_path, client)
    beta0 = lambda s: round(s["betas"][0], 10)  # noqa: E731
    # resumed from the checkpoint at step 20: the segments ending at 30 and 40 were answered after it
    assert run_segments(src, FakeTrunk(), 20, 80, 3) == [
        (20, K, None, beta0(b)), (30, K, None, beta0(b)), (40, K, 4, beta0(c))]
    assert client.asked == [20] and client.resumes == [True]  # asked once; the first request re-delivers
    [(rid, result)] = client.posted  # the replays were not posted again
    assert rid == 4 and result["before_profile"] == [1.0 / 41] * 3 and result["step"] == 50
    assert "replaying 2 answered segment(s), steps 20 to 40" in capsys.readouterr().out
    assert src.state_dict()["dko"]["w"].sum() == 2  # a checkpoint now stores the replayed schedule's DKO


def test_a_replayed_final_segment_runs_to_its_end_and_a_gap_is_reported(tmp_path, capsys):
    final = schedule(0.5, final=True)
    client = FakeClient(replay=[[6, final, 80]], requests=[])
    assert run_segments(source(tmp_path, client), FakeTrunk(), 60, 80, 1) == [(60, 20, None, round(final["betas"][0], 10))]
    assert "warning" not in capsys.readouterr().out  # a final segment is longer than K by design

    # the broker's log lost the segment ending at 30: the replay from 20 cannot be exact, and says so
    client = FakeClient(replay=[[3, schedule(1.0), 40]], requests=[(4, schedule(0.25))])
    assert run_segments(source(tmp_path, client), FakeTrunk(), 20, 80, 2)[0][:3] == (20, 20, None)
    assert "warning: replayed segments [(20, 40)] are longer than rl.segment_steps=10" in capsys.readouterr().out


def test_a_fresh_run_has_nothing_to_replay(tmp_path):
    client = FakeClient(replay=[], requests=[(0, schedule(1.0)), (1, schedule(0.5))])
    src = source(tmp_path, client)
    assert [s[2] for s in run_segments(src, FakeTrunk(), 0, 80, 2)] == [0, 1]
    assert client.asked == [0] and client.resumes == [True, False]


def test_the_local_broker_keeps_answered_trunk_segments_like_the_actor():
    from akod_ray.rl.local_broker import LocalBroker

    broker = LocalBroker(timeout_s=5.0)
    rids = [broker.submit(schedule(s)) for s in (1.0, 0.5, 0.25)]
    for rid, step, kind in zip(rids, (10, 10, 20), ("trunk", "branch", "trunk")):
        assert broker.next_request(1.0)[0] == rid
        broker.post_result(rid, {"reward": 0.0, "step": step, "kind": kind})
    assert broker.replay_from(0) == [[rids[0], schedule(1.0), 10], [rids[2], schedule(0.25), 20]]
    assert broker.replay_from(10) == [[rids[2], schedule(0.25), 20]]
