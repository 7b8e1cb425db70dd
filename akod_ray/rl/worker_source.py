"""The AKOD schedule source on the Ray Train workers: schedules come from the PPO learner.

Rank 0 takes the next proposed schedule from the run's ScheduleBroker and broadcasts it;
all workers train a segment of K = rl.segment_steps steps with it; the segment's reward
(the reference loss by default, DESIGN 1.4) is all-reduced by the loop and rank 0 posts it
back. A request marked ``final`` (the deterministic learned schedule, sent when PPO's
budget is spent) is used for the rest of the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from akod_ray.config import Config
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClient
from akod_ray.training.loop import Segment

HEARTBEAT_EVERY_S = 5.0
POLL_S = 5.0


def reward_from(result: dict, kind: str) -> float:
    """reference: -(reference loss); paper: -(validation loss under the proposed schedule)."""
    return -float(result["paper_loss"] if kind == "paper" else result["ref_loss"])


class BrokerSchedule:
    def __init__(self, cfg: Config, env, broker_name: str, run_dir: Path | None = None):
        self.cfg = cfg
        self.env = env
        self.T = cfg.diffusion.T
        self.K = cfg.rl.segment_steps
        self.client = BrokerClient.connect(broker_name, cfg.rl.broker_timeout_s) if env.rank == 0 else None
        self.first_request = True
        self.last_beat = 0.0
        self.posted_log = None if run_dir is None or env.rank != 0 else Path(run_dir) / "rl" / "posted.jsonl"

    def _take(self) -> tuple[int, bool, list[float]]:
        """Rank 0: wait for the next request, giving up after rl.broker_timeout_s of silence."""
        start = time.monotonic()
        while True:
            req = self.client.next_request(POLL_S, resume=self.first_request)
            self.first_request = False
            if req is not None:
                rid, schedule = req
                return rid, bool(schedule.get("final", False)), schedule["betas"]
            waited = time.monotonic() - start
            if waited > self.cfg.rl.broker_timeout_s:
                raise BrokerTimeoutError(
                    f"the PPO learner sent no schedule within rl.broker_timeout_s={self.cfg.rl.broker_timeout_s} s "
                    "(the trial driver is gone or stuck)")

    def next_segment(self, step: int, steps_left: int) -> Segment:
        msg = torch.zeros(self.T + 2, dtype=torch.float64, device=self.env.device)
        if self.env.rank == 0:
            rid, final, betas = self._take()
            msg[0], msg[1] = rid, float(final)
            msg[2:] = torch.tensor(betas, dtype=torch.float64)
        msg = self.env.broadcast(msg).cpu()
        rid, final = int(msg[0].item()), bool(msg[1].item())
        length = steps_left if final else min(self.K, steps_left)
        return Segment(DiffusionProcess(msg[2:].clone()), length, rid)

    def heartbeat(self, step: int) -> None:
        if self.client is not None and time.monotonic() - self.last_beat > HEARTBEAT_EVERY_S:
            self.client.heartbeat({"step": step})
            self.last_beat = time.monotonic()

    def finish_segment(self, segment: Segment, result: dict) -> None:
        if self.client is None:
            return
        result = dict(result, reward=reward_from(result, self.cfg.rl.reward), request_id=segment.request_id)
        self.client.post_result(segment.request_id, result)
        if self.posted_log is not None:
            self.posted_log.parent.mkdir(parents=True, exist_ok=True)
            with self.posted_log.open("a") as f:
                f.write(json.dumps(result) + "\n")

    def state_dict(self) -> dict:
        return {}  # the broker's own state is saved by the trial driver, which owns the actor

    def load_state_dict(self, state: dict) -> None:
        pass
