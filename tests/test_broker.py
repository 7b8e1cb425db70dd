"""ScheduleBroker through a real Ray actor: round trip, timeouts, liveness, re-delivery, state, close."""

from __future__ import annotations

import io
import threading
import time

import pytest
import ray
import torch

from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClient, BrokerClosedError, broker_name, get_or_create_broker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()


def client(run_id: str, timeout_s: float = 10.0) -> BrokerClient:
    return BrokerClient(get_or_create_broker(run_id), timeout_s=timeout_s, name=broker_name(run_id))


def schedule(i: int) -> dict:
    """A window's request: its decisions (bins), as the env submits it."""
    return {"decisions": [i, i + 1, i + 2], "episode": i}


def test_broker_name_is_derived_from_the_run_id():
    assert broker_name("trial_00001") == "akod-broker-trial_00001"
    assert broker_name("a/b c") == "akod-broker-a_b_c"
    with pytest.raises(ValueError, match="non-empty"):
        broker_name("")


def test_submit_take_post_wait_round_trip():
    c = client("round-trip")
    rid = c.submit(schedule(0))
    assert c.next_request(5.0) == (rid, schedule(0))
    result = {"reward": -0.125, "ref_loss": 0.125, "paper_loss": 0.5, "step": 500, "wall_s": 1.5}
    assert c.post_result(rid, result) is True
    assert c.wait_result(rid) == result
    assert c.latest_result() == {**result, "request_id": rid}
    with pytest.raises(ValueError, match="already collected"):
        c.wait_result(rid)
    assert c.submit(schedule(1)) == rid + 1  # ids are monotone


def test_next_request_returns_none_on_timeout():
    c = client("idle")
    t0 = time.monotonic()
    assert c.next_request(0.3) is None
    assert 0.25 <= time.monotonic() - t0 < 20.0  # returns (not blocks); generous for a loaded box


def test_wait_without_workers_fails_within_the_timeout():
    c = client("no-workers", timeout_s=2.0)
    rid = c.submit(schedule(0))
    t0 = time.monotonic()
    with pytest.raises(BrokerTimeoutError, match=f"no result for schedule request {rid} from the Ray Train "
                                                  "workers within 2 s; the workers are gone or stuck"):
        c.wait_result(rid)
    assert 2.0 <= time.monotonic() - t0 < 2.0 + 3.0
    assert c.status()["num_pending"] == 0  # the timed-out request was withdrawn


def test_heartbeats_tell_slow_workers_from_gone_ones():
    """A segment longer than the timeout is fine while rank 0 heartbeats; silence is not."""
    c = client("slow", timeout_s=1.0)
    rid = c.submit(schedule(0))
    took = c.next_request(5.0)
    assert took is not None

    def slow_rank0():
        worker = BrokerClient(c.handle, timeout_s=10.0)
        for _ in range(12):  # 3 s of "training", a heartbeat every 0.25 s
            time.sleep(0.25)
            worker.heartbeat({"step": 1})
        worker.post_result(rid, {"reward": 1.0})

    th = threading.Thread(target=slow_rank0)
    th.start()
    t0 = time.monotonic()
    assert c.wait_result(rid) == {"reward": 1.0}
    assert time.monotonic() - t0 > 2.0  # outlived the 1 s timeout thanks to the heartbeats
    th.join()
    assert c.status()["worker_info"] == {"step": 1}

    rid2 = c.submit(schedule(1))
    c.next_request(5.0)  # taken, then the workers fall silent
    with pytest.raises(BrokerTimeoutError, match="took it .* ago and did not answer; the workers were last seen"):
        c.wait_result(rid2)


@ray.remote(num_cpus=0)
class Rank0:
    """Stands in for rank 0 of a Ray Train worker group."""

    def __init__(self, run_id: str):
        self.c = BrokerClient(ray.get_actor(broker_name(run_id)), timeout_s=10.0)

    def take(self, resume: bool):
        return self.c.next_request(5.0, resume=resume)

    def post(self, rid: int, result: dict) -> bool:
        return self.c.post_result(rid, result)


def test_request_in_flight_is_delivered_again_after_the_worker_is_killed():
    env = client("redeliver", timeout_s=30.0)
    rid = env.submit(schedule(7))
    old = Rank0.remote("redeliver")
    assert tuple(ray.get(old.take.remote(True))) == (rid, schedule(7))
    ray.kill(old, no_restart=True)  # SIGKILL of the worker that held the request

    # The env keeps waiting; Ray Train rebuilds the group and the new rank 0 resumes.
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(result=env.wait_result(rid)))
    waiter.start()
    new = Rank0.remote("redeliver")
    assert ray.get(new.take.remote(False)) is None  # a plain call does not steal in-flight work
    assert tuple(ray.get(new.take.remote(True))) == (rid, schedule(7))
    assert ray.get(new.post.remote(rid, {"reward": -0.5})) is True
    waiter.join(timeout=30)
    assert got["result"] == {"reward": -0.5}
    assert env.status()["num_redelivered"] == 1
    assert env.post_result(rid, {"reward": 9.0}) is False  # a late answer from the old group is ignored
    assert env.latest_result() == {"reward": -0.5, "request_id": rid}


def test_state_round_trip_with_pending_in_flight_and_answered_requests():
    a = client("state-a")
    r0, r1, r2 = (a.submit(schedule(i)) for i in range(3))
    assert a.next_request(5.0)[0] == r0
    a.post_result(r0, {"reward": -1.0, "step": 10})  # answered, not yet collected
    assert a.next_request(5.0)[0] == r1  # in flight
    state = a.get_state()

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain data, fit for a Train checkpoint

    b = client("state-b")
    assert b.set_state(state, only_if_fresh=True) is True
    assert b.wait_result(r0) == {"reward": -1.0, "step": 10}
    assert b.latest_result() == {"reward": -1.0, "step": 10, "request_id": r0}
    assert b.next_request(5.0) == (r1, schedule(1))  # the request in flight comes first
    assert b.next_request(5.0) == (r2, schedule(2))
    assert b.submit(schedule(3)) == 3
    assert b.set_state(state, only_if_fresh=True) is False  # a live broker is never rolled back
    with pytest.raises(ValueError, match="version"):
        b.set_state({"next_id": 0})


def test_answered_trunk_segments_are_kept_for_a_restarted_group_to_replay():
    """A restarted group resumes from a checkpoint that can be behind the answered segments: the
    broker hands back every trunk segment ending after that step, with its schedule, in step order."""
    c = client("replay")
    rids = [c.submit(schedule(i)) for i in range(5)]
    for rid, step, kind in zip(rids, (10, 20, 20, 30), ("trunk", "trunk", "branch", "trunk")):
        assert c.next_request(5.0)[0] == rid
        c.post_result(rid, {"reward": 0.1, "step": step, "kind": kind})
    assert c.next_request(5.0)[0] == rids[4]  # in flight: not answered, so not replayed (it is re-delivered)
    assert c.replay_from(10) == [[rids[1], schedule(1), 20], [rids[3], schedule(3), 30]]  # a branch moves no trunk
    assert c.replay_from(30) == [] and c.replay_from(0)[0] == [rids[0], schedule(0), 10]

    buf = io.BytesIO()
    torch.save(c.get_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    d = client("replay-restored")
    assert d.set_state(state) is True and d.replay_from(10) == c.replay_from(10)  # a restarted driver replays too
    del state["trunk_log"]  # a state written before replay existed still loads
    e = client("replay-old-state")
    assert e.set_state(state) is True and e.replay_from(0) == []


def test_a_new_driver_restores_the_replay_and_counters_but_not_the_dead_drivers_requests():
    """An AKOD run resumed after its driver was killed: the saved state can be older than the checkpoint the trunk
    resumes from, so a request it holds may carry the slots of an earlier step. The dead driver's envs are gone:
    the new broker keeps the answered windows (replay) and the request ids, not the requests, their results or the
    latest state (which would show the new learner old slots before rank 0 announces its own)."""
    from akod_ray.rl.broker import for_a_new_driver

    old = client("dead-driver")
    rids = [old.submit(dict(schedule(i), slots=[float(i)])) for i in range(3)]
    assert old.next_request(5.0)[0] == rids[0]
    old.post_result(rids[0], {"reward": 0.1, "step": 10, "kind": "trunk"})
    assert old.next_request(5.0)[0] == rids[1]  # in flight when the driver died; rids[2] pending
    state = old.get_state()

    new = client("new-driver")
    assert new.set_state(for_a_new_driver(state), only_if_fresh=True) is True
    assert new.replay_from(0) == [[rids[0], dict(schedule(0), slots=[0.0]), 10]]
    assert new.next_request(0.2, resume=True) is None  # neither the one in flight nor the pending one
    assert new.latest_result() is None
    assert new.status()["num_answered"] == 1
    assert new.submit(schedule(7)) == rids[-1] + 1  # ids never repeat: a late answer can't be taken for a new one


def test_close_wakes_every_waiter_and_later_calls_fail_fast():
    c = client("close", timeout_s=60.0)
    rid = c.submit(schedule(0))
    c.next_request(5.0)
    errors: list[BaseException] = []

    def wait(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - collected for the assertions
            errors.append(e)

    threads = [threading.Thread(target=wait, args=(lambda: c.wait_result(rid),)),
               threading.Thread(target=wait, args=(lambda: c.next_request(60.0),))]
    for th in threads:
        th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    c.close("training finished at step 1000")
    for th in threads:
        th.join(timeout=10)
    assert time.monotonic() - t0 < 5.0
    assert len(errors) == 2 and all(isinstance(e, BrokerClosedError) for e in errors)
    assert all("closed (training finished at step 1000)" in str(e) for e in errors)
    with pytest.raises(BrokerClosedError, match="cannot submit"):
        c.submit(schedule(1))
    c.close()  # idempotent


def test_connect_to_a_missing_broker_is_a_clear_error():
    with pytest.raises(BrokerClosedError, match="no schedule broker actor named 'akod-broker-nope'"):
        BrokerClient.connect(broker_name("nope"), timeout_s=1.0)


def test_a_dead_broker_actor_is_a_clear_error():
    c = client("dead")
    ray.kill(c.handle, no_restart=True)
    with pytest.raises(BrokerClosedError, match="actor is gone"):
        for _ in range(50):  # ray.kill is asynchronous
            c.submit(schedule(0))
            time.sleep(0.1)


@pytest.mark.timeout(60)
def test_the_workers_state_reaches_a_waiting_env_and_a_later_state_can_be_waited_for():
    """post_state (rank 0's first slots) wakes wait_state; wait_state(after_step) waits for a newer one."""


    c = client("state")
    got = {}
    th = threading.Thread(target=lambda: got.update(first=c.wait_state(10.0)))
    th.start()
    time.sleep(0.5)
    c.post_state({"kind": "state", "step": 0, "slots": [-1.0], "context": {}})
    th.join(timeout=10)
    assert got["first"]["slots"] == [-1.0]
    th = threading.Thread(target=lambda: got.update(later=c.wait_state(10.0, after_step=0)))
    th.start()
    time.sleep(0.5)
    assert "later" not in got
    c.post_state({"kind": "state", "step": 30, "slots": [-2.0], "context": {}})
    th.join(timeout=10)
    assert got["later"]["step"] == 30
    c.close("done")
    with pytest.raises(BrokerClosedError):
        c.wait_state(5.0, after_step=30)
    with pytest.raises(ValueError, match="'decisions'"):
        client("state-bad").submit({"betas": [0.1]})
