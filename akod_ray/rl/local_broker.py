"""LocalBroker: the ScheduleBroker's protocol inside one process, for the AKOD arm without Ray Train.

The PPO env (main thread) and the training loop (a thread, :class:`~akod_ray.training.local.LocalEnv`)
talk through it exactly as they talk through the broker actor on a cluster: the env
submits schedules and waits for rewards, rank 0 takes requests and posts results. One
``threading.Condition`` guards everything. Used by ``bench/akod_science.py``, where every
cost of an arm must land in one process's clock, and by tests.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClosedError, TrunkLog


_REGISTRY: dict[str, "LocalBroker"] = {}


def local_broker_client(env_config: dict) -> "LocalBroker":
    """The env's ``broker_client_factory`` for a LocalBroker: a module-level function, so RLlib can
    serialize the env_config (the broker itself holds locks), looked up by ``broker_name``."""
    return _REGISTRY[env_config["broker_name"]]


class LocalBroker:
    """Implements the BrokerClient methods the env, the worker source and the driver use.

    ``name`` registers it for :func:`local_broker_client` until :meth:`close`.
    """

    def __init__(self, timeout_s: float, name: str | None = None):
        self.name = name
        if name is not None:
            _REGISTRY[name] = self
        self.timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._next_id = 0
        self._pending: OrderedDict[int, dict] = OrderedDict()
        self._results: dict[int, dict] = {}
        self._taken: dict[int, dict] = {}  # taken by the loop, not answered
        self._trunk = TrunkLog()
        self._latest: dict | None = None
        self._policy: dict | None = None
        self._closed: str | None = None
        self._worker_seen = time.monotonic()

    # env side
    def submit(self, schedule: dict) -> int:
        with self._cond:
            self._raise_if_closed("submit")
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = dict(schedule)
            self._cond.notify_all()
            return rid

    def latest_result(self) -> dict | None:
        with self._cond:
            return None if self._latest is None else dict(self._latest)

    def wait_state(self, timeout_s: float | None = None, after_step: int | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        with self._cond:
            start = time.monotonic()
            while self._latest is None or (after_step is not None and self._latest.get("step", -1) <= after_step):
                self._raise_if_closed("wait for the workers' state")
                idle = time.monotonic() - max(self._worker_seen, start)
                if idle >= timeout_s:
                    raise BrokerTimeoutError(f"the training loop posted no state within {timeout_s:g} s")
                self._cond.wait(timeout=min(timeout_s - idle, 1.0))
            self._raise_if_closed("wait for the workers' state")
            return dict(self._latest)

    def wait_result(self, request_id: int, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        with self._cond:
            start = time.monotonic()
            while request_id not in self._results:
                self._raise_if_closed(f"wait for the result of schedule request {request_id}")
                idle = time.monotonic() - max(self._worker_seen, start)
                if idle >= timeout_s:
                    raise BrokerTimeoutError(f"no result for schedule request {request_id} within {timeout_s:g} s; "
                                             "the training loop is gone or stuck")
                self._cond.wait(timeout=min(timeout_s - idle, 1.0))
            return self._results.pop(request_id)

    # worker side
    def next_request(self, timeout_s: float, resume: bool = False) -> tuple[int, dict] | None:
        with self._cond:
            self._worker_seen = time.monotonic()
            self._cond.wait_for(lambda: self._pending or self._closed is not None, timeout=timeout_s)
            self._raise_if_closed("next_request")
            if not self._pending:
                return None
            rid, schedule = self._pending.popitem(last=False)
            self._taken[rid] = schedule
            return rid, schedule

    def post_result(self, request_id: int, result: dict) -> bool:
        with self._cond:
            self._worker_seen = time.monotonic()
            self._trunk.record(request_id, self._taken.pop(request_id, None), result)
            self._results[request_id] = dict(result)
            self._latest = dict(result)
            self._cond.notify_all()
            return True

    def post_state(self, state: dict) -> None:
        with self._cond:
            self._worker_seen = time.monotonic()
            self._latest = dict(state)
            self._cond.notify_all()

    def replay_from(self, step: int) -> list[list]:
        """The answered trunk segments ending after ``step`` (see :class:`~akod_ray.rl.broker.TrunkLog`)."""
        with self._cond:
            return self._trunk.after(int(step))

    def heartbeat(self, info: dict | None = None) -> None:
        with self._cond:
            self._worker_seen = time.monotonic()

    # driver side
    def publish_policy(self, state: dict) -> None:
        with self._cond:
            self._policy = state

    def policy_state(self) -> dict | None:
        with self._cond:
            return self._policy

    def close(self, reason: str = "training finished") -> None:
        with self._cond:
            self._closed = self._closed or reason
            self._cond.notify_all()
        if self.name is not None and _REGISTRY.get(self.name) is self:
            del _REGISTRY[self.name]

    def _raise_if_closed(self, what: str) -> None:
        if self._closed is not None:
            raise BrokerClosedError(f"cannot {what}: the schedule broker is closed ({self._closed})")
