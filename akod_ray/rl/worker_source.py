"""The AKOD schedule source on the training workers: every image's noise level comes from the DKO.

The trunk trains in *decision windows* of ``rl.segment_steps`` steps, one PPO episode each. A window's
request from the learner holds the DKO state (weights and context) the window trains with and the
learner's own decisions: the bins of the *decision images* (the first ``rl.decision_images`` images
of rank 0's share of every ``rl.decision_every``-th step), which RLlib drew from that same policy.
Every other image's bin is drawn by the worker from that policy (:class:`DKOWindow`). So the trunk
trains on exactly the distribution the policy means, decision images included.

At a decision step rank 0 measures each decision image's credit before the update
(:mod:`akod_ray.training.credit`) along u = P grad M, taken once per window on the reward probe; at
the window's end it posts the result: one reward per decision (:func:`akod_ray.rl.reward.decision_rewards`),
what was trained (the realised counts of every image's bin) against what the policy meant (the sum
of its probabilities), the probe's metric, and the *slots* of the next window: the log sigma_local of
its decision images (peeked from the data stream, which is deterministic), which the env shows the
policy as its next observations. Before the first window rank 0 posts the first slots alone.

Request kinds:

=======  ==================================================================================
window   a decision window from the learner: trained, its result posted.
replay   (rank 0's own, after a restart) a window the killed group trained and answered after the
         checkpoint this group resumed from: trained again with its own request (the same draws, so
         the same trunk) and not posted again (:mod:`akod_ray.rl.broker`, Replay).
=======  ==================================================================================
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import torch

from akod_ray import storage
from akod_ray.config import Config
from akod_ray.data.parquet import to_model_range
from akod_ray.diffusion.dko import DKO, DKOContext, DKOPolicy, NoiseBins, anchor_betas, learned_schedule, log_sigma_local
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import save_schedule
from akod_ray.errors import BrokerTimeoutError
from akod_ray.rl.broker import BrokerClient
from akod_ray.rl.reward import decision_rewards
from akod_ray.training.adaptation import Drawn, draw_noise
from akod_ray.training.loop import Segment, Trunk

HEARTBEAT_EVERY_S = 5.0
POLL_S = 5.0
KINDS = ("window", "replay")
FEATURE_ATOL = 1e-4  # a decision image's feature as trained against the slot the policy saw


def prior_process(cfg: Config) -> DiffusionProcess:
    """The table the learned arms train on: the prior anchor's steps (``dko.prior``)."""
    d = cfg.diffusion
    return DiffusionProcess(anchor_betas(cfg.dko.prior, d.T, cfg.dko.logsnr_max, cfg.dko.logsnr_min, d.laplace_scale))


def decision_steps(cfg: Config, length: int) -> list[int]:
    """The decision steps (indices within a window of ``length`` steps)."""
    return list(range(0, length, cfg.rl.decision_every))


def flat_weights(weights: dict | None, bins: int, hidden: tuple[int, ...]) -> torch.Tensor:
    """The DKO's weights as one float64 vector (the initial DKO's for None): what rank 0 broadcasts."""
    net = DKO(bins, hidden)
    if weights:
        net.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in weights.items()})
    return torch.cat([p.detach().double().reshape(-1) for p in net.state_dict().values()])


def weights_from_flat(flat: torch.Tensor, bins: int, hidden: tuple[int, ...]) -> dict:
    net = DKO(bins, hidden)
    out, i = {}, 0
    for k, v in net.state_dict().items():
        out[k] = flat[i:i + v.numel()].reshape(v.shape).float().clone()
        i += v.numel()
    return out


class DKOWindow:
    """One window's sampler (:class:`~akod_ray.training.adaptation.StepSampler`): each image's bin from the
    policy, the learner's decisions on rank 0's decision images, credits measured before each decision step.

    ``decisions``: the request's bins, in slot order (None on the other ranks and for replays' credits)."""

    def __init__(self, source: "BrokerSchedule", policy: DKOPolicy, decisions: list[int] | None, length: int,
                 score: bool, direction=None, probe_loss: float | None = None, slots: list[float] | None = None):
        self.source, self.policy, self.length = source, policy, length
        self.decisions = decisions
        self.score = score and decisions is not None
        self.direction, self.probe_loss = direction, probe_loss
        self.slots = slots
        self.steps = set(decision_steps(source.cfg, length))
        J = source.bins.J
        self.realised = torch.zeros(J, dtype=torch.float64)
        self.intended = torch.zeros(J, dtype=torch.float64)
        self.rewards: list[float] = []
        self.derivatives: list[float] = []
        self.losses: list[float] = []
        self._used = 0
        self._overhead = 0.0

    def draw(self, trunk: Trunk, micro_batches, generator, k) -> Drawn:
        cfg, bins = self.source.cfg, self.source.bins
        t_all, noise_all = [], []
        for i, x0 in enumerate(micro_batches):
            features = log_sigma_local(x0, cfg.dko.kernel_size)
            probs = self.policy.probs(features)
            j = torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)
            n = 0
            if self.decisions is not None and i == 0 and k in self.steps:
                n = min(cfg.rl.decision_images, x0.shape[0])
                given = torch.tensor(self.decisions[self._used:self._used + n], dtype=torch.long, device=j.device)
                if self.slots is not None:
                    expect = torch.tensor(self.slots[self._used:self._used + n], dtype=features.dtype)
                    if not torch.allclose(features[:n].cpu(), expect, atol=FEATURE_ATOL):
                        raise RuntimeError(f"the decision images of step {trunk.step} are not the ones the learner saw "
                                           "(the data stream and the posted slots disagree)")
                j = torch.cat([given, j[n:]])
                self._used += n
            t = bins.draw_steps(j, generator)
            noise = draw_noise(x0, generator)
            self.realised += torch.bincount(j.cpu(), minlength=bins.J).double()
            self.intended += probs.double().sum(0).cpu()
            if n and self.score:
                start = time.perf_counter()
                d, loss = trunk.image_credits(x0[:n], t[:n], noise[:n], self.direction)
                loss = None if loss is None else loss.cpu()
                rl = cfg.rl
                self.rewards += decision_rewards(rl.reward, d.cpu(), loss, trunk.learning_rate(),
                                                 cfg.train.batch_size, self.probe_loss, rl.reward_scale)
                self.derivatives += d.cpu().tolist()
                self.losses += [] if loss is None else loss.tolist()
                self._overhead += time.perf_counter() - start
            t_all.append(t)
            noise_all.append(noise)
        return Drawn(t_all, noise_all)

    def observe(self, losses) -> None:
        pass

    def pop_overhead_s(self) -> float:
        out, self._overhead = self._overhead, 0.0
        return out


class BrokerSchedule:
    """``client``: a BrokerClient-like object (rank 0 only; None on the other ranks)."""

    def __init__(self, cfg: Config, env, client, run_dir: Path | None = None):
        self.cfg = cfg
        self.env = env
        self.W = cfg.rl.segment_steps
        self.client = client if env.rank == 0 else None
        self.bins = NoiseBins(cfg.diffusion.T, cfg.dko.bins)
        self.process = prior_process(cfg)
        self.first_request = True
        self.last_beat = 0.0
        self.run_dir = None if run_dir is None or env.rank != 0 else storage.location(run_dir)
        self.posted_log = None if self.run_dir is None else self.run_dir / "rl" / "posted.jsonl"
        self._written: torch.Tensor | None = None  # the betas rank 0 last wrote to schedule.json
        self._requests: dict[int, dict] = {}  # rank 0: the requests taken and not yet answered
        self._policy: dict | None = None  # the DKO state of the window being trained (what checkpoints hold)
        self._replay: deque = deque()  # rank 0: answered windows to train again after a restart
        self._replay_asked = False
        self._next: tuple[int, list, float] | None = None  # rank 0: (step, u, M) measured at the last window's end
        self._pool_features: torch.Tensor | None = None
        self._window: DKOWindow | None = None

    # ------------------------------------------------------------------ rank 0: the broker

    def _probe(self, trunk: Trunk) -> tuple[list, float]:
        """u and M at the trunk's current step, measured once (the end of a window is the next one's start)."""
        if self._next is None or self._next[0] != trunk.step:
            u, m = trunk.probe_direction(seed=self.cfg.train.seed * 1_000_003 + trunk.step)
            self._next = (trunk.step, u, m)
        return self._next[1], self._next[2]

    def _context(self, trunk: Trunk) -> DKOContext:
        _, m = self._probe(trunk)
        return DKOContext(progress=min(max(trunk.step / max(self.cfg.train.steps, 1), 0.0), 1.0), probe_loss=m)

    def _slots(self, trunk: Trunk, steps_left: int) -> list[float]:
        """log sigma_local of the next window's decision images (rank 0's share), from the data stream."""
        length = min(self.W, steps_left)
        offsets = decision_steps(self.cfg, length)
        images = trunk.stream.peek(offsets, self.cfg.rl.decision_images)
        if not images:
            return []
        x0 = to_model_range(torch.cat(images)).to(self.env.device)
        return log_sigma_local(x0, self.cfg.dko.kernel_size).cpu().tolist()

    def _announce(self, trunk: Trunk, steps_left: int) -> None:
        """Rank 0, before its first request: the trunk's state and the first window's slots."""
        self.client.post_state({"kind": "state", "step": trunk.step, "context": self._context(trunk).to_dict(),
                                "slots": self._slots(trunk, steps_left)})

    def _take(self, trunk: Trunk, steps_left: int) -> tuple[int, str, dict, int]:
        """Rank 0: the next window ``(request_id, kind, request, length)``: first the replays (the first call
        asks for them), then the learner's requests, waiting up to rl.broker_timeout_s of silence."""
        step = trunk.step
        if not self._replay_asked:
            self._replay_asked = True
            self._replay = deque(self.client.replay_from(step))
            if self._replay:
                ends = [end for _, _, end in self._replay]
                print(f"[akod] replaying {len(self._replay)} answered window(s), steps {step} to {ends[-1]}, trained "
                      "after the checkpoint this restart resumed from", flush=True)
        if self._replay:
            rid, request, end_step = self._replay.popleft()
            return rid, "replay", request, end_step - step
        if self.first_request:
            self._announce(trunk, steps_left)
        start = time.monotonic()
        while True:
            req = self.client.next_request(POLL_S, resume=self.first_request)
            self.first_request = False
            if req is not None:
                rid, request = req
                return rid, "window", request, min(self.W, steps_left)
            if time.monotonic() - start > self.cfg.rl.broker_timeout_s:
                raise BrokerTimeoutError(
                    f"the PPO learner sent no decisions within rl.broker_timeout_s={self.cfg.rl.broker_timeout_s} s "
                    "(the trial driver is gone or stuck)")

    # ------------------------------------------------------------------ every rank: the window

    def _receive(self, trunk: Trunk, steps_left: int) -> tuple[int, str, int, dict | None, DKOContext, dict | None]:
        """Rank 0 takes the next window; every rank gets (request_id, kind, length, DKO weights, context) by
        broadcast; rank 0 also keeps the request."""
        d = self.cfg.dko
        size = flat_weights(None, d.bins, d.hidden).numel()
        msg = torch.zeros(6 + size, dtype=torch.float64, device=self.env.device)
        request = None
        if self.env.rank == 0:
            rid, kind, request, length = self._take(trunk, steps_left)
            dko = request.get("dko") or {}
            ctx = DKOContext.from_dict(request.get("context"))  # the context the learner observed the slots in
            msg[:6] = torch.tensor([rid, KINDS.index(kind), length, float(bool(dko.get("weights"))), ctx.progress,
                                    ctx.probe_loss], dtype=torch.float64)
            msg[6:] = flat_weights(dko.get("weights"), d.bins, d.hidden)
        msg = self.env.broadcast(msg).cpu()
        head = msg[:6].tolist()
        weights = weights_from_flat(msg[6:], d.bins, d.hidden) if head[3] else None
        return (int(head[0]), KINDS[int(head[1])], int(head[2]), weights,
                DKOContext(progress=head[4], probe_loss=head[5]), request)

    def next_segment(self, step: int, steps_left: int, trunk: Trunk) -> Segment:
        rid, kind, length, weights, ctx, request = self._receive(trunk, steps_left)
        state = {"weights": weights, "context": ctx.to_dict()} if weights is not None else {"context": ctx.to_dict()}
        d = self.cfg.dko
        policy = DKOPolicy(state, self.bins, d.floor, d.hidden, d.kernel_size)
        # what checkpoints hold: the weights and context the window trains with, and on rank 0 the rest of the
        # learner's published state (the whole RLModule, to resume PPO from; the iteration)
        published = {k: v for k, v in ((request or {}).get("dko") or {}).items() if k not in ("weights", "context")}
        self._policy = {**published, "weights": weights or {k: v.clone() for k, v in policy.net.state_dict().items()},
                        "context": ctx.to_dict()}
        decisions = slots = direction = probe_loss = None
        if request is not None:
            decisions = [int(a) for a in request.get("decisions", [])]
            slots = request.get("slots")
            if kind == "window":
                direction, probe_loss = self._probe(trunk)
                self._requests[rid] = request
        self._window = DKOWindow(self, policy, decisions, length, score=kind == "window", direction=direction,
                                 probe_loss=probe_loss, slots=slots)
        betas = self.learned_betas(trunk)
        if self.run_dir is not None and (self._written is None or not torch.equal(betas, self._written)):
            # the schedule the trunk trains with now (its policy at this window's context), exported
            iteration = int(((request or {}).get("dko") or {}).get("iteration", 0))
            save_schedule(self.run_dir / "schedule.json", betas, source="akod", iteration=iteration, step=step)
            self._written = betas
        return Segment(self.process, length, rid if kind == "window" else None, sampler=self._window,
                       sampling_process=DiffusionProcess(betas))

    def learned_betas(self, trunk: Trunk) -> torch.Tensor:
        """The schedule of the window's policy: its marginal over a fixed pool of training images."""
        if self._pool_features is None:
            images = trunk.stream.pool(self.cfg.dko.probe_pool, self.cfg.data.seed + 7)
            self._pool_features = log_sigma_local(to_model_range(images).to(self.env.device),
                                                  self.cfg.dko.kernel_size).cpu()
        d = self.cfg.dko
        return learned_schedule(self._policy, self._pool_features, self.bins, d.floor, d.hidden, d.kernel_size,
                                self.process.log_snr)

    def finish_segment(self, segment: Segment, result: dict, trunk: Trunk) -> None:
        """The window's end (rank 0 posts; every rank is here): rewards, realised and intended distributions,
        the next window's slots and the trunk's state."""
        if self.client is None:
            return
        window = self._window
        request = self._requests.pop(segment.request_id, {})
        steps_left = self.cfg.train.steps - trunk.step
        out = {"kind": "trunk", "step": trunk.step, "wall_s": result.get("wall_s"), "request_id": segment.request_id,
               "rewards": window.rewards, "derivatives": window.derivatives, "losses": window.losses,
               "decisions": request.get("decisions", []), "realised": window.realised.tolist(),
               "intended": window.intended.tolist(), "probe_loss_start": window.probe_loss,
               "context": self._context(trunk).to_dict(), "probe_loss": self._context(trunk).probe_loss,
               "slots": self._slots(trunk, steps_left) if steps_left > 0 else [],
               "window_context": request.get("context")}
        self.client.post_result(segment.request_id, out)
        if self.posted_log is not None:
            storage.append_jsonl(self.posted_log, {k: v for k, v in out.items() if k != "slots"})

    def heartbeat(self, step: int) -> None:
        if self.client is not None and time.monotonic() - self.last_beat > HEARTBEAT_EVERY_S:
            self.client.heartbeat({"step": step})
            self.last_beat = time.monotonic()

    def state_dict(self) -> dict:
        """The DKO state the trunk trains with now (weights and context): what a checkpoint rebuilds its schedule from."""
        return {"dko": self._policy} if self._policy is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._policy = state.get("dko")


def make_broker_schedule(cfg: Config, env, loop_config: dict) -> BrokerSchedule:
    """The worker-side source for a Ray Train worker: connects to the run's named broker actor."""
    client = BrokerClient.connect(loop_config["broker_name"], cfg.rl.broker_timeout_s) if env.rank == 0 else None
    return BrokerSchedule(cfg, env, client, loop_config.get("run_dir"))
