"""ScheduleBroker: the one actor between the PPO env and the Ray Train workers (DESIGN 2).

One broker per run (per Tune trial), a named async actor. The env submits a window's decisions
(the DKO's bins for the window's decision images) and waits for their rewards; rank 0 of the Train
workers takes the next request, the workers train the window with it, and rank 0 posts the result.
Rank 0 also posts the trunk's *state* (the next window's decision slots and context) before its first
request (``post_state``); every result carries the next state too, and the env reads the latest
(``wait_state``) when an episode starts.

A request moves through three states::

    submit() -> pending --next_request()--> in flight --post_result()--> answered
                              ^                 |
                              '--resume=True----'   (the worker group restarted)

Fault tolerance. A request that rank 0 took but did not answer stays "in flight". After a
worker is SIGKILLed, Ray Train rebuilds the whole group; the new rank 0 passes
``resume=True`` on its first ``next_request`` and gets the in-flight requests back, oldest
first, so the env waiting for that reward is answered after all. The first result posted
for a request wins; a late result from a worker of the old group is ignored.

Timeouts. Every wait takes a timeout in seconds. ``next_request`` returns None on timeout
(the worker decides what to do), ``wait_result`` returns None (the synchronous
:class:`BrokerClient` turns that into :class:`~akod_ray.errors.BrokerTimeoutError`). The
broker records every worker contact (next_request, post_result, heartbeat), so the env
tells "workers gone" (silent for the whole timeout) apart from "slow" (still heartbeating).

Replay. A restarted group resumes from the latest checkpoint Ray Train registered, which
can be a window or more behind the step the killed group reached: windows it trained and
answered after that checkpoint are gone from the weights, but their rewards already reached
PPO. The broker keeps every answered window (:class:`TrunkLog`); the new rank 0 asks
``replay_from(step)`` for those that end after its checkpoint and trains them again with
their own requests, without posting, before it takes the requests in flight. The trunk then
stands where the killed group left it, and the next window starts where the previous
answered one ended.

Closing. ``close()`` wakes every waiter; afterwards every wait fails fast with
:class:`BrokerClosedError`.

State. ``get_state()`` returns plain data (ints, floats, strings, lists, dicts), so it
can be stored in a Train checkpoint and read with ``torch.load(weights_only=True)``;
``set_state()`` restores it into a new broker, in-flight requests becoming pending again.

Inside the actor every wait is an ``await`` on one asyncio.Condition, never a blocking
``ray.get``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict

import ray

from akod_ray.errors import BrokerTimeoutError

STATE_VERSION = 1
MAX_UNCLAIMED_RESULTS = 256  # results nobody waits for (after a restore, a cancel) are kept, bounded
RPC_SLACK_S = 30.0  # extra time for the actor call itself on top of the wait it was asked for
MAX_TRUNK_LOG = 256  # answered windows kept for a restarted group to replay (TrunkLog)
POLL_S = 5.0  # longest single wait_result call of the client; it re-checks worker liveness in between


class BrokerClosedError(RuntimeError):
    """The broker was closed (training finished or the run was stopped) or its actor is gone."""


def broker_name(run_id: str) -> str:
    """The broker's actor name for a run or Tune trial id: ``akod-broker-<run_id>``."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"broker run id must be a non-empty string, got {run_id!r}")
    return "akod-broker-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)


def _now() -> float:
    return time.monotonic()


class TrunkLog:
    """The requests of the decision windows the trunk answered so far, by the step each ended at (bounded).

    A result with ``kind == "trunk"`` (a window the trunk trained) is recorded with the request it was
    trained with (its decisions and DKO state: enough to train it again to the bit).
    """

    def __init__(self, entries: list | None = None):
        self._entries: OrderedDict[int, dict] = OrderedDict()
        for rid, schedule, end_step in entries or []:
            self._entries[int(rid)] = {"schedule": dict(schedule), "end_step": int(end_step)}

    def record(self, request_id: int, schedule: dict | None, result: dict) -> None:
        if schedule is None or result.get("kind") != "trunk" or not isinstance(result.get("step"), int):
            return
        self._entries[request_id] = {"schedule": schedule, "end_step": result["step"]}
        while len(self._entries) > MAX_TRUNK_LOG:
            self._entries.popitem(last=False)

    def after(self, step: int) -> list[list]:
        """``[request_id, request, end_step]`` of the answered windows ending after ``step``, in step order."""
        return sorted((row for row in self.state() if row[2] > step), key=lambda row: row[2])

    def state(self) -> list[list]:
        return [[rid, e["schedule"], e["end_step"]] for rid, e in self._entries.items()]


@ray.remote(num_cpus=0, max_concurrency=64)
class ScheduleBroker:
    """Pending schedule requests, requests in flight, and results, behind one asyncio.Condition."""

    def __init__(self, run_id: str = ""):
        self._run_id = run_id
        self._cond = asyncio.Condition()
        self._next_id = 0
        self._pending: OrderedDict[int, dict] = OrderedDict()  # submitted, not yet taken
        self._in_flight: OrderedDict[int, dict] = OrderedDict()  # taken by rank 0, not answered
        self._results: OrderedDict[int, dict] = OrderedDict()  # answered, not yet collected
        self._waited: set[int] = set()  # request ids the env may still collect
        self._latest_result: dict | None = None
        self._num_answered = 0
        self._num_redelivered = 0
        self._closed_reason: str | None = None
        self._fresh = True  # no traffic and no set_state yet
        self._worker_seen: float | None = None  # monotonic time of the last worker contact
        self._worker_info: dict = {}
        self._policy: dict | None = None  # the DKO weights and context the driver published last
        self._trunk = TrunkLog()  # answered windows, for a restarted group to replay

    # ------------------------------------------------------------------ policy (driver -> checkpoints)

    async def publish_policy(self, state: dict) -> None:
        """The driver's latest DKO state (plain tensors/data); rank 0 stores it in every checkpoint."""
        self._policy = state

    async def policy_state(self) -> dict | None:
        return self._policy

    # ------------------------------------------------------------------ env side

    async def submit(self, schedule: dict) -> int:
        """Queue a request (a window's ``decisions``, plus metadata); returns its request id."""
        if not isinstance(schedule, dict) or "decisions" not in schedule:
            raise ValueError("a request must be a dict with a 'decisions' list")
        async with self._cond:
            self._raise_if_closed("submit")
            self._fresh = False
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = dict(schedule)
            self._waited.add(rid)
            self._cond.notify_all()
            return rid

    async def wait_result(self, request_id: int, timeout_s: float) -> dict | None:
        """The result posted for ``request_id`` (collected once), or None after ``timeout_s``."""
        async with self._cond:
            if request_id not in self._results and request_id not in self._waited:
                raise ValueError(f"schedule request {request_id} is unknown to the broker or its result was already collected")
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: request_id in self._results or self._closed_reason is not None),
                    timeout=max(float(timeout_s), 0.0),
                )
            except (asyncio.TimeoutError, TimeoutError):
                return None
            if request_id in self._results:
                self._waited.discard(request_id)
                return self._results.pop(request_id)
            self._raise_if_closed(f"wait for the result of schedule request {request_id}")
            return None  # unreachable: the predicate held

    async def cancel(self, request_id: int) -> bool:
        """Withdraw a request nobody will wait for; True if it was still pending (not yet taken)."""
        async with self._cond:
            self._waited.discard(request_id)
            self._results.pop(request_id, None)
            return self._pending.pop(request_id, None) is not None

    async def latest_result(self) -> dict | None:
        """The most recent result or state posted by the workers (the env's next slots and context)."""
        return None if self._latest_result is None else dict(self._latest_result)

    async def wait_state(self, timeout_s: float, after_step: int | None = None) -> dict | None:
        """The latest state or result once the workers posted one (with ``after_step``: one of a later step);
        None after ``timeout_s``."""
        def ready() -> bool:
            latest = self._latest_result
            return latest is not None and (after_step is None or latest.get("step", -1) > after_step)

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: ready() or self._closed_reason is not None),
                                       timeout=max(float(timeout_s), 0.0))
            except (asyncio.TimeoutError, TimeoutError):
                return None
            self._raise_if_closed("wait for the workers' state")
            return dict(self._latest_result)

    # ------------------------------------------------------------------ worker side

    async def next_request(self, timeout_s: float, resume: bool = False) -> tuple[int, dict] | None:
        """Take the oldest pending request: ``(request_id, schedule)``, or None after ``timeout_s``.

        ``resume=True`` (rank 0's first call after the worker group started or restarted)
        first puts every request in flight back at the head of the queue, so a request
        whose worker was killed is delivered again.
        """
        async with self._cond:
            self._raise_if_closed("take a schedule request")
            self._fresh = False
            self._touch_worker()
            if resume and self._in_flight:
                self._num_redelivered += len(self._in_flight)
                for rid, entry in reversed(self._in_flight.items()):
                    self._pending[rid] = entry["schedule"]
                    self._pending.move_to_end(rid, last=False)
                self._in_flight.clear()
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: bool(self._pending) or self._closed_reason is not None),
                    timeout=max(float(timeout_s), 0.0),
                )
            except (asyncio.TimeoutError, TimeoutError):
                self._touch_worker()
                return None
            self._raise_if_closed("take a schedule request")
            self._touch_worker()
            rid, schedule = self._pending.popitem(last=False)
            self._in_flight[rid] = {"schedule": schedule, "taken_at": _now()}
            return rid, schedule

    async def post_result(self, request_id: int, result: dict) -> bool:
        """Answer a request (``reward``, ``ref_loss``, ``paper_loss``, ``step``, ``wall_s``, ...).

        Returns True if this answered an outstanding request; False for a duplicate (a late
        answer from a worker of the old group) or a cancelled request, which change nothing.
        """
        if not isinstance(result, dict):
            raise ValueError(f"a schedule result must be a dict, got {type(result).__name__}")
        async with self._cond:
            self._fresh = False
            self._touch_worker()
            if request_id not in self._waited or request_id in self._results:
                return False
            taken = self._in_flight.pop(request_id, None)
            pending = self._pending.pop(request_id, None)  # answered by a worker of the old group after a resume
            self._trunk.record(request_id, taken["schedule"] if taken else pending, result)
            self._latest_result = dict(result, request_id=request_id)
            self._results[request_id] = dict(result)
            self._num_answered += 1
            while len(self._results) > MAX_UNCLAIMED_RESULTS:
                old, _ = self._results.popitem(last=False)
                self._waited.discard(old)
            self._cond.notify_all()
            return True

    async def post_state(self, state: dict) -> None:
        """Rank 0's state before its first request: the first window's slots and the trunk's context."""
        if not isinstance(state, dict):
            raise ValueError(f"a worker state must be a dict, got {type(state).__name__}")
        async with self._cond:
            self._fresh = False
            self._touch_worker()
            self._latest_result = dict(state)
            self._cond.notify_all()

    async def replay_from(self, step: int) -> list[list]:
        """The answered windows ending after ``step`` (a restarted group's checkpoint step):
        ``[request_id, schedule, end_step]``, in step order; see the module docstring, Replay."""
        self._touch_worker()
        return self._trunk.after(int(step))

    async def heartbeat(self, info: dict | None = None) -> None:
        """A sign of life from the workers (rank 0 calls it every few seconds of training)."""
        self._touch_worker()
        if info:
            self._worker_info = dict(info)

    async def last_worker_seen(self) -> float | None:
        """Seconds since the last worker contact, or None if no worker ever called."""
        return None if self._worker_seen is None else _now() - self._worker_seen

    # ------------------------------------------------------------------ lifecycle and state

    async def close(self, reason: str = "training finished") -> None:
        """Mark the broker closed and wake every waiter; later waits fail fast."""
        async with self._cond:
            self._closed_reason = reason
            self._cond.notify_all()

    async def status(self, request_id: int | None = None) -> dict:
        """Counters and liveness for diagnostics and metrics; with ``request_id``, where it stands."""
        out = {
            "run_id": self._run_id,
            "closed": self._closed_reason,
            "num_pending": len(self._pending),
            "num_in_flight": len(self._in_flight),
            "num_submitted": self._next_id,
            "num_answered": self._num_answered,
            "num_redelivered": self._num_redelivered,
            "worker_idle_s": None if self._worker_seen is None else _now() - self._worker_seen,
            "worker_info": dict(self._worker_info),
        }
        if request_id is not None:
            if request_id in self._results:
                out["request"] = "answered"
            elif request_id in self._in_flight:
                out["request"] = "in_flight"
                out["taken_s_ago"] = _now() - self._in_flight[request_id]["taken_at"]
            elif request_id in self._pending:
                out["request"] = "pending"
            else:
                out["request"] = "unknown"
        return out

    async def get_state(self) -> dict:
        """Plain-data snapshot (loads with torch.load(weights_only=True))."""
        return {
            "version": STATE_VERSION,
            "next_id": self._next_id,
            "pending": [[rid, s] for rid, s in self._pending.items()],
            "in_flight": [[rid, e["schedule"]] for rid, e in self._in_flight.items()],
            "results": [[rid, r] for rid, r in self._results.items()],
            "waited": sorted(self._waited),
            "latest_result": self._latest_result,
            "num_answered": self._num_answered,
            "num_redelivered": self._num_redelivered,
            "trunk_log": self._trunk.state(),
        }

    async def set_state(self, state: dict, only_if_fresh: bool = False) -> bool:
        """Restore a :meth:`get_state` snapshot; in-flight requests become pending (their worker is gone).

        With ``only_if_fresh`` the state is applied only to a broker that has seen no
        traffic yet, so a live broker is never rolled back. Returns whether it was applied.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"broker state must be a dict with version {STATE_VERSION}, got "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}")
        async with self._cond:
            if only_if_fresh and not self._fresh:
                return False
            self._fresh = False
            self._next_id = int(state["next_id"])
            self._pending = OrderedDict((int(rid), dict(s)) for rid, s in state["in_flight"])
            self._pending.update((int(rid), dict(s)) for rid, s in state["pending"])
            self._in_flight = OrderedDict()
            self._results = OrderedDict((int(rid), dict(r)) for rid, r in state["results"])
            self._waited = {int(r) for r in state["waited"]}
            self._latest_result = None if state["latest_result"] is None else dict(state["latest_result"])
            self._num_answered = int(state["num_answered"])
            self._num_redelivered = int(state["num_redelivered"])
            self._trunk = TrunkLog(state.get("trunk_log"))  # absent from states written before replay existed
            self._cond.notify_all()
            return True

    # ------------------------------------------------------------------ helpers

    def _touch_worker(self) -> None:
        self._worker_seen = _now()

    def _raise_if_closed(self, what: str) -> None:
        if self._closed_reason is not None:
            raise BrokerClosedError(f"cannot {what}: the schedule broker of run {self._run_id!r} is closed "
                                    f"({self._closed_reason})")


def for_a_new_driver(state: dict) -> dict:
    """A saved :meth:`ScheduleBroker.get_state` for the broker of a new driver (an AKOD run resumed after its driver
    died): the answered windows (the replay's TrunkLog) and the counters, without what belonged to the dead
    driver's PPO episodes. Its requests, pending or in flight, wait for an env that is gone, and their slots are
    those of the step the dead trunk had reached when the state was saved, which need not be the step of the
    checkpoint the new trunk resumes from (the two are saved apart); their unclaimed results have no reader; and
    its latest state would show the new learner those old slots before rank 0 announces its own."""
    return {**state, "pending": [], "in_flight": [], "results": [], "waited": [], "latest_result": None}


def get_or_create_broker(run_id: str, namespace: str | None = None) -> ray.actor.ActorHandle:
    """The run's broker actor, created on first call.

    The calling process owns it: keep the returned handle for the whole run (the actor is
    destroyed when the owner's last handle goes away or the owner exits).
    """
    return ScheduleBroker.options(name=broker_name(run_id), namespace=namespace, get_if_exists=True).remote(run_id)


class BrokerClient:
    """Synchronous access to a broker for the env and for rank 0 of the workers.

    Every call has a timeout; a broker that is closed or whose actor died raises
    :class:`BrokerClosedError`, a wait that finds the workers silent raises
    :class:`~akod_ray.errors.BrokerTimeoutError`.
    """

    def __init__(self, handle: ray.actor.ActorHandle, timeout_s: float, max_wait_s: float | None = None,
                 name: str = "schedule broker"):
        if not timeout_s > 0:
            raise ValueError(f"broker timeout must be > 0 s, got {timeout_s!r}")
        self.handle = handle
        self.timeout_s = float(timeout_s)
        self.max_wait_s = max_wait_s
        self.name = name

    @classmethod
    def connect(cls, name: str, timeout_s: float, namespace: str | None = None,
                max_wait_s: float | None = None) -> BrokerClient:
        """Look up the named broker actor (it must exist: the trial driver creates it first)."""
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            raise BrokerClosedError(f"no schedule broker actor named {name!r} in Ray namespace {namespace!r}; "
                                    "the trial driver creates it before PPO and the Train workers start") from None
        return cls(handle, timeout_s, max_wait_s, name=name)

    def _get(self, ref, wait_s: float, what: str):
        # The actor call itself may wait behind a starved machine (Ray's workers run niced): allow it the
        # run's own broker timeout (rl.broker_timeout_s), never less than RPC_SLACK_S.
        limit = wait_s + max(RPC_SLACK_S, self.timeout_s)
        try:
            return ray.get(ref, timeout=limit)
        except ray.exceptions.GetTimeoutError:
            raise BrokerTimeoutError(f"the {self.name} actor did not answer '{what}' within "
                                     f"{limit:g} s; it is overloaded or hung") from None
        except ray.exceptions.RayActorError as e:
            raise BrokerClosedError(f"the {self.name} actor is gone ({type(e).__name__}); "
                                    "its trial driver ended or it was killed") from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (BrokerClosedError, ValueError)):
                raise cause from None  # the broker's own message, without the remote traceback
            raise

    # ------------------------------------------------------------------ env side

    def submit(self, schedule: dict) -> int:
        return int(self._get(self.handle.submit.remote(schedule), 0.0, "submit"))

    def latest_result(self) -> dict | None:
        return self._get(self.handle.latest_result.remote(), 0.0, "latest_result")

    def wait_state(self, timeout_s: float | None = None, after_step: int | None = None) -> dict:
        """Block until the workers posted a state (the env's next slots; with ``after_step``, one of a later step);
        BrokerTimeoutError once they have been silent for ``timeout_s`` during this wait."""
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        start = _now()
        while True:
            elapsed = _now() - start
            st = self._get(self.handle.status.remote(None), 0.0, "status")
            idle = elapsed if st["worker_idle_s"] is None else min(st["worker_idle_s"], elapsed)
            budget = timeout_s - idle
            if budget <= 0:
                raise BrokerTimeoutError(f"the Ray Train workers posted no state within {timeout_s:g} s (they never "
                                         "started or are stuck; raise rl.broker_timeout_s if start-up is slow)")
            chunk = min(budget, POLL_S)
            out = self._get(self.handle.wait_state.remote(chunk, after_step), chunk, "wait_state")
            if out is not None:
                return out

    def wait_result(self, request_id: int, timeout_s: float | None = None) -> dict:
        """Block until the workers post the result of ``request_id``.

        Fails with BrokerTimeoutError once no worker has contacted the broker for
        ``timeout_s`` seconds during this wait (the workers are gone or stuck), or once the
        wait exceeds ``max_wait_s`` when that is set; keeps waiting while they heartbeat.
        """
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        start = _now()
        while True:
            elapsed = _now() - start
            st = self._get(self.handle.status.remote(request_id), 0.0, "status")
            # Silence counts from the start of this wait: contact before it says nothing about now.
            idle = elapsed if st["worker_idle_s"] is None else min(st["worker_idle_s"], elapsed)
            budget = timeout_s - idle
            if self.max_wait_s is not None:
                budget = min(budget, self.max_wait_s - elapsed)
            if budget <= 0:
                try:  # withdrawn before the error is raised, so a caller that reads status() sees it gone
                    ray.get(self.handle.cancel.remote(request_id), timeout=RPC_SLACK_S)
                except Exception:  # noqa: BLE001 - best effort: the actor may be gone or overloaded already
                    pass
                raise BrokerTimeoutError(self._timeout_message(request_id, timeout_s, elapsed, st))
            chunk = min(budget, POLL_S)
            res = self._get(self.handle.wait_result.remote(request_id, chunk), chunk,
                            f"wait_result({request_id})")
            if res is not None:
                return res

    def _timeout_message(self, request_id: int, timeout_s: float, elapsed: float, st: dict) -> str:
        msg = (f"no result for schedule request {request_id} from the Ray Train workers within {timeout_s:g} s; "
               f"the workers are gone or stuck")
        where = st.get("request")
        if where == "pending":
            detail = "rank 0 never took the request"
        elif where == "in_flight":
            detail = f"rank 0 took it {st['taken_s_ago']:.1f} s ago and did not answer"
        else:
            detail = f"request state: {where}"
        if st["worker_idle_s"] is None:
            detail += "; no worker has contacted the broker yet"
        else:
            detail += f"; the workers were last seen {st['worker_idle_s']:.1f} s ago"
        if self.max_wait_s is not None and elapsed >= self.max_wait_s:
            detail += f"; waited {elapsed:.1f} s, over the limit of {self.max_wait_s:g} s"
        return f"{msg} ({detail}; raise rl.broker_timeout_s if windows legitimately take longer)"

    # ------------------------------------------------------------------ worker side

    def next_request(self, timeout_s: float, resume: bool = False) -> tuple[int, dict] | None:
        """Rank 0: the next ``(request_id, schedule)`` or None after ``timeout_s``; see :meth:`ScheduleBroker.next_request`."""
        out = self._get(self.handle.next_request.remote(timeout_s, resume), timeout_s, "next_request")
        return None if out is None else (int(out[0]), out[1])

    def post_result(self, request_id: int, result: dict) -> bool:
        return bool(self._get(self.handle.post_result.remote(request_id, result), 0.0, "post_result"))

    def post_state(self, state: dict) -> None:
        self._get(self.handle.post_state.remote(state), 0.0, "post_state")

    def replay_from(self, step: int) -> list[list]:
        """Rank 0 after a restart: see :meth:`ScheduleBroker.replay_from`."""
        return self._get(self.handle.replay_from.remote(step), 0.0, "replay_from")

    def heartbeat(self, info: dict | None = None) -> None:
        """Fire and forget: never blocks the training loop."""
        self.handle.heartbeat.remote(info)

    def publish_policy(self, state: dict) -> None:
        self._get(self.handle.publish_policy.remote(state), 0.0, "publish_policy")

    def policy_state(self) -> dict | None:
        return self._get(self.handle.policy_state.remote(), 0.0, "policy_state")

    # ------------------------------------------------------------------ lifecycle and state

    def close(self, reason: str = "training finished") -> None:
        try:
            self._get(self.handle.close.remote(reason), 0.0, "close")
        except BrokerClosedError:
            pass  # already gone: closing is idempotent

    def status(self, request_id: int | None = None) -> dict:
        return self._get(self.handle.status.remote(request_id), 0.0, "status")

    def get_state(self) -> dict:
        return self._get(self.handle.get_state.remote(), 0.0, "get_state")

    def set_state(self, state: dict, only_if_fresh: bool = False) -> bool:
        return bool(self._get(self.handle.set_state.remote(state, only_if_fresh), 0.0, "set_state"))



__all__ = ["BrokerClient", "BrokerClosedError", "ScheduleBroker", "TrunkLog", "broker_name", "get_or_create_broker"]
