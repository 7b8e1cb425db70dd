"""The AKOD schedule source on the training workers: schedules come from the PPO learner.

Rank 0 takes the next request from the run's ScheduleBroker and broadcasts it; every
worker acts on it in lockstep. A request is one of:

=========  ==================================================================================
episode    a schedule the PPO env proposed. Without branches (``rl.branches = 0``) the trunk
           trains the next segment of K = rl.segment_steps steps with it and rank 0 posts the
           segment's result. With branches it is a branch rollout: rl.branch_steps steps from
           the trunk's weights (same batches and noise for every branch of the round), scored
           by the reference protocol and undone; the trunk waits for a ``trunk`` request.
trunk      the deterministic DKO schedule the driver sends after each PPO update (branch mode):
           the trunk trains a segment with it, and rank 0 posts the segment's result.
final      the deterministic learned schedule when PPO's budget is spent: the rest of the run.
replay     (rank 0's own, after a restart) a trunk segment the killed group trained and answered
           after the checkpoint this group resumed from: trained again with its own schedule up to
           the step it ended at, and not posted again (its reward already reached PPO); see
           :mod:`akod_ray.rl.broker`, Replay. The requests in flight come after the replays.
=========  ==================================================================================

Every result carries the reward probe's profiles before and after the proposal (what the reward
is made of), the reward itself (:func:`akod_ray.rl.reward.reward_from`) and, with
``rl.credit=knot``, its share per knot (:func:`akod_ray.rl.reward.knot_rewards`); the trunk's
state (step, mean probe loss, probe profile: the DKO's next observation); and it echoes the
request's DKO context.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

import torch

from akod_ray.config import Config
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClient
from akod_ray.rl.reward import knot_rewards, reward_from
from akod_ray.training.loop import Segment, Trunk

HEARTBEAT_EVERY_S = 5.0
POLL_S = 5.0
KINDS = ("episode", "trunk", "final", "replay")


class BrokerSchedule:
    """``client``: a BrokerClient-like object (rank 0 only; None on the other ranks)."""

    def __init__(self, cfg: Config, env, client, run_dir: Path | None = None):
        self.cfg = cfg
        self.env = env
        self.T = cfg.diffusion.T
        self.K = cfg.rl.segment_steps
        self.client = client if env.rank == 0 else None
        self.first_request = True
        self.last_beat = 0.0
        self.posted_log = None if run_dir is None or env.rank != 0 else Path(run_dir) / "rl" / "posted.jsonl"
        self._before: dict | None = None  # the trunk's reward-probe profile at the current segment's start
        self._requests: dict[int, dict] = {}  # rank 0: request metadata to echo in its result
        self._policy: dict | None = None  # the DKO state restored from a checkpoint, until the driver publishes
        self._segment_policy: dict | None = None  # the DKO state of the trunk's current (deterministic) schedule
        self._replay: deque = deque()  # rank 0: answered segments to train again after a restart
        self._replay_asked = False

    def _take(self, step: int, steps_left: int) -> tuple[int, str, list[float], int]:
        """Rank 0: the next segment ``(request_id, kind, betas, length)``: first the replays (the first
        call only asks for them), then requests, waiting up to rl.broker_timeout_s of silence."""
        if not self._replay_asked:
            self._replay_asked = True
            self._replay = deque(self.client.replay_from(step))
            self._check_replay(step)
        if self._replay:
            rid, schedule, end_step = self._replay.popleft()
            self._requests[rid] = {"dko": schedule.get("dko")}
            return rid, "replay", schedule["betas"], end_step - step
        start = time.monotonic()
        while True:
            req = self.client.next_request(POLL_S, resume=self.first_request)
            self.first_request = False
            if req is not None:
                rid, schedule = req
                kind = "final" if schedule.get("final") else schedule.get("kind", "episode")
                self._requests[rid] = {"context": schedule.get("context"), "dko": schedule.get("dko"),
                                       "knot_logsnr": schedule.get("knot_logsnr")}
                return rid, kind, schedule["betas"], steps_left if kind == "final" else min(self.K, steps_left)
            if time.monotonic() - start > self.cfg.rl.broker_timeout_s:
                raise BrokerTimeoutError(
                    f"the PPO learner sent no schedule within rl.broker_timeout_s={self.cfg.rl.broker_timeout_s} s "
                    "(the trial driver is gone or stuck)")

    def _check_replay(self, step: int) -> None:
        """Rank 0: say what is replayed, and warn when the replay cannot restore the killed group's
        trunk exactly (segments longer than rl.segment_steps: the broker's log was truncated)."""
        if not self._replay:
            return
        ends = [step] + [end for _, _, end in self._replay]
        print(f"[akod] replaying {len(self._replay)} answered segment(s), steps {step} to {ends[-1]}, trained "
              "after the checkpoint this restart resumed from", flush=True)
        long = [(a, b) for (a, b), (_, schedule, _) in zip(zip(ends, ends[1:]), self._replay)
                if b - a > self.K and not schedule.get("final")]
        if long:
            print(f"[akod] warning: replayed segments {long} are longer than rl.segment_steps={self.K}; "
                  "the trunk will differ from the one the killed group trained", flush=True)

    def _receive(self, step: int, steps_left: int) -> tuple[int, str, DiffusionProcess, int]:
        msg = torch.zeros(self.T + 3, dtype=torch.float64, device=self.env.device)
        if self.env.rank == 0:
            rid, kind, betas, length = self._take(step, steps_left)
            msg[0], msg[1], msg[2] = rid, KINDS.index(kind), length
            msg[3:] = torch.tensor(betas, dtype=torch.float64)
        msg = self.env.broadcast(msg).cpu()
        return (int(msg[0].item()), KINDS[int(msg[1].item())], DiffusionProcess(msg[3:].clone()),
                int(msg[2].item()))

    def next_segment(self, step: int, steps_left: int, trunk: Trunk) -> Segment:
        while True:
            rid, kind, process, length = self._receive(step, steps_left)
            if kind == "episode" and self.cfg.rl.branches > 0:
                before = trunk.reward_profile()
                scored = trunk.branch(process, self.cfg.rl.branch_steps)
                # the trunk did not move: its state (the DKO's next observation) is the branch's start
                self._post(rid, before, before, {**scored, "kind": "branch"})
                continue
            dko = (self._requests.get(rid) or {}).get("dko")
            if dko is not None:  # the DKO state that made this deterministic schedule: what checkpoints store
                self._segment_policy = dko
            if kind == "replay":  # answered before the restart: trained again, not posted
                self._requests.pop(rid, None)
                return Segment(process, length, None)
            self._before = trunk.reward_profile()  # cached: the previous segment's end computed it
            return Segment(process, length, rid)

    def finish_segment(self, segment: Segment, result: dict) -> None:
        """The segment's end: ``result`` is the trunk's reward-probe profile now (profile, profile_logsnr, step, ...)."""
        extra = {k: v for k, v in result.items() if k not in ("profile", "profile_logsnr", "step")}
        self._post(segment.request_id, self._before, result, {**extra, "after_profile": result["profile"],
                                                               "kind": "trunk"})

    def _post(self, rid: int, before: dict, trunk_now: dict, result: dict) -> None:
        """Post the result of request ``rid``: the probe ``before`` it, the trunk's state ``trunk_now``
        and what the proposal scored (``after_profile``, ``paper_loss``)."""
        if self.client is None:
            return
        rl = self.cfg.rl
        meta = self._requests.pop(rid, {})
        profile = trunk_now["profile"]
        result = dict(result, before_profile=before["profile"], profile_logsnr=before["profile_logsnr"],
                      step=trunk_now["step"], ref_loss=sum(profile) / len(profile), loss_profile=profile,
                      request_id=rid, context=meta.get("context"))
        result["reward"] = reward_from(result, rl.reward, rl.reward_metric, rl.reward_scale)
        if rl.credit == "knot" and meta.get("knot_logsnr"):
            result["knot_rewards"] = knot_rewards(result, rl.reward_metric, meta["knot_logsnr"], rl.reward_scale)
        self.client.post_result(rid, result)
        if self.posted_log is not None:
            self.posted_log.parent.mkdir(parents=True, exist_ok=True)
            with self.posted_log.open("a") as f:
                f.write(json.dumps(result) + "\n")

    def heartbeat(self, step: int) -> None:
        if self.client is not None and time.monotonic() - self.last_beat > HEARTBEAT_EVERY_S:
            self.client.heartbeat({"step": step})
            self.last_beat = time.monotonic()

    def state_dict(self) -> dict:
        """Rank 0: the DKO state (weights and context) for the checkpoint: the one that made the trunk's
        current schedule when that is the deterministic DKO's (``trunk``/``final``), else the latest published."""
        if self._segment_policy is not None:
            return {"dko": self._segment_policy}
        if self.client is not None:
            self._policy = self.client.policy_state() or self._policy
        return {"dko": self._policy} if self._policy is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._policy = state.get("dko")


def make_broker_schedule(cfg: Config, env, loop_config: dict) -> BrokerSchedule:
    """The worker-side source for a Ray Train worker: connects to the run's named broker actor."""
    client = BrokerClient.connect(loop_config["broker_name"], cfg.rl.broker_timeout_s) if env.rank == 0 else None
    return BrokerSchedule(cfg, env, client, loop_config.get("run_dir"))
