"""The AKOD arm's driver: broker, training and the PPO learner, in one process (DESIGN 2).

Phases of :func:`train_akod` (Ray Train workers) and :func:`train_akod_local` (one process,
no Ray Train: benchmarks and tests):

1. setup: the run's broker (restoring its state after a driver restart), the probe pool and
   the DKO observer, PPO (resuming its policy from the latest Train checkpoint's plain tensors,
   never from a pickle);
2. training starts in a thread: segment after segment with the schedules the broker hands
   out, posting each segment's (or branch's) result;
3. :func:`run_ppo`: PPO iterations while enough segments are left for another; after each, the
   DKO state (weights + latest context) is published to the broker (so every checkpoint holds
   it) and the deterministic learned schedule is exported; with branches, it also trains the
   trunk's next segment;
4. the deterministic learned schedule at the latest observation goes to the workers as
   ``final`` for the rest of the run; the broker closes when training returns.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from akod_ray.config import Config, save_config
from akod_ray.data.parquet import load_images, to_model_range
from akod_ray.data.procedural import procedural_images
from akod_ray.diffusion.dko import DKOContext, DKOObserver, learned_schedule
from akod_ray.diffusion.schedules import save_schedule
from akod_ray.rl.broker import BrokerClient, broker_name, get_or_create_broker
from akod_ray.rl.env import make_env_config
from akod_ray.rl.env import make_observer as env_observer
from akod_ray.rl.ppo import broker_error, build_ppo, load_rl_state_dict, policy_state
from akod_ray.rl.worker_source import make_broker_schedule
from akod_ray.errors import CheckpointError
from akod_ray.training.checkpoint import atomic_torch_save, latest_checkpoint, load_state

# ----------------------------------------------------------------- 1. setup


def load_probe_pool(cfg: Config, data_dir: str | None) -> torch.Tensor:
    """The DKO's probe pool: dko.probe_pool real training images in [-1, 1] (seeded)."""
    n, seed = cfg.dko.probe_pool, cfg.data.seed + 7
    if cfg.data.source == "procedural":
        return to_model_range(procedural_images(n, seed=seed))
    return to_model_range(load_images(data_dir, "train", count=n, seed=seed))


def probe_pool_of(cfg: Config, train_images: torch.Tensor) -> torch.Tensor:
    """The probe pool drawn from training images already in memory (uint8 [N, C, H, W]; seeded)."""
    g = torch.Generator().manual_seed(cfg.data.seed + 7)
    idx = torch.randperm(train_images.shape[0], generator=g)[: cfg.dko.probe_pool]
    return to_model_range(train_images[idx])


def make_observer(cfg: Config, pool: torch.Tensor) -> DKOObserver:
    """The DKO observer of a config (the same one the env builds from its env_config)."""
    return env_observer(make_env_config(cfg, pool, cfg.run.name))


def load_broker_state(path: Path) -> dict:
    """The broker's saved state (plain data, ``weights_only``); anything else is a CheckpointError naming the file."""
    from akod_ray.training.checkpoint import load_plain  # torch.load without its warnings on stderr

    try:
        state = load_plain(path)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad or hostile file
        raise CheckpointError(f"broker state {str(path)!r} is not plain data ({type(e).__name__}); "
                              "remove it to restart the AKOD run's PPO bookkeeping") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"broker state {str(path)!r} holds a {type(state).__name__}, not a mapping")
    return state


def resume_policy(algo, run_dir: Path) -> dict | None:
    """Load the DKO state of the run's latest checkpoint into PPO (plain tensors); returns it, or None."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    dko = load_state(path).get("schedule_source", {}).get("dko")
    if dko and dko.get("module"):
        load_rl_state_dict(algo, dko["module"])
    return dko


# ----------------------------------------------------------------- 3. PPO


def latest_context(client, total_steps: int) -> DKOContext:
    """The DKO's latest observation state: the latest posted result and the probe of its request."""
    result = client.latest_result() or {}
    return DKOContext.from_dict(result.get("context")).updated(result, total_steps)


def publish(cfg: Config, algo, client, observer: DKOObserver, run_dir: Path, iteration: int,
            final: bool = False) -> tuple[dict, torch.Tensor]:
    """The DKO state at the latest observation, to the broker (for checkpoints) and schedule.json.

    The schedule is rebuilt from the published state itself, so what the trunk trains with,
    the exported file and a rebuild from a checkpoint are the same numbers.
    """
    state = policy_state(algo, latest_context(client, cfg.train.steps))
    betas = learned_schedule(state, observer, cfg.dko.hidden)
    client.publish_policy(state)
    save_schedule(run_dir / "schedule.json", betas, source="akod", iteration=iteration, final=final)
    return state, betas


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_ppo(cfg: Config, algo, client, observer: DKOObserver, run_dir: Path, training_alive: Callable[[], bool],
            after_iteration: Callable[[], None] | None = None) -> int:
    """Phases 3 and 4: PPO while another iteration fits, then the final schedule. Returns the iteration count."""
    K, steps, M = cfg.rl.segment_steps, cfg.train.steps, cfg.rl.branches
    segments_per_iteration = cfg.rl.train_batch // M if M else cfg.rl.train_batch
    rl_dir = run_dir / "rl"
    iteration = len(read_jsonl(rl_dir / "iterations.jsonl"))
    t0 = time.perf_counter()
    while training_alive():
        done = (client.latest_result() or {}).get("step", 0)
        if math.ceil((steps - done) / K) <= segments_per_iteration:
            break
        try:
            result = algo.train()
            iteration += 1
            state, betas = publish(cfg, algo, client, observer, run_dir, iteration)
            if M > 0:  # the trunk's next segment with the updated policy's deterministic schedule
                client.wait_result(client.submit({"betas": betas.tolist(), "kind": "trunk", "context": state["context"],
                                                  "dko": state}))
        except Exception as e:
            if broker_error(e) is not None and not training_alive():
                break  # training finished (a time budget) or failed while PPO waited for a reward
            raise
        if after_iteration is not None:
            after_iteration()
        env_runners = result.get("env_runners", {})
        learner = result.get("learners", {}).get("default_policy", {})
        _append_jsonl(rl_dir / "iterations.jsonl", {
            "iteration": iteration, "episode_return_mean": env_runners.get("episode_return_mean"),
            "num_episodes": env_runners.get("num_episodes"),
            # (observation, action, reward) samples in this iteration's train batch (each of the K - 1 knots of an
            # episode is one), and the sample-updates PPO made of them (num_epochs passes over its minibatches)
            "samples_trained": int(env_runners.get("num_env_steps_sampled", 0)),
            "sample_updates": int(learner.get("num_module_steps_trained", 0)),
            "wall_s": time.perf_counter() - t0,
        })
    if training_alive():  # 4. the learned schedule at the latest observation, for the rest of the run
        state, betas = publish(cfg, algo, client, observer, run_dir, iteration, final=True)
        client.submit({"betas": betas.tolist(), "final": True, "context": state["context"], "dko": state})
    return iteration


# ----------------------------------------------------------------- 2. training in a thread


class TrainingThread(threading.Thread):
    """Runs ``fn`` (the training) and closes the broker when it returns, waking a waiting env."""

    def __init__(self, fn: Callable[[], object], client):
        super().__init__(name="akod-train", daemon=True)
        self.fn, self.client = fn, client
        self.error: BaseException | None = None
        self.result = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            self.client.close("the training run ended")


def _drive(cfg: Config, algo, client, observer: DKOObserver, run_dir: Path, thread: TrainingThread,
           after_iteration: Callable[[], None] | None = None) -> int:
    thread.start()
    try:
        iterations = run_ppo(cfg, algo, client, observer, run_dir, thread.is_alive, after_iteration)
        thread.join()
    finally:
        client.close("the AKOD driver stopped")
        algo.stop()
    if thread.error is not None:
        raise thread.error
    return iterations


def train_akod(cfg: Config, data_dir: str | None, run_id: str | None = None, callbacks: list | None = None) -> dict:
    """The AKOD arm on Ray Train; returns the last metrics record. ``run_id`` names the broker (a Tune trial id)."""
    from akod_ray.training.trainer import build_trainer, ensure_ray, fit, last_record, loop_config_for, read_metrics

    run_dir = cfg.run_dir.resolve()
    save_config(cfg, run_dir)
    ensure_ray(cfg)
    t0 = time.perf_counter()
    # 1. Broker, observer and PPO, restored if this run was interrupted.
    run_id = run_id or cfg.run.name
    broker = get_or_create_broker(run_id)  # this process owns the actor: keep the handle alive
    client = BrokerClient(broker, cfg.rl.broker_timeout_s)
    broker_state = run_dir / "rl" / "broker_state.pt"
    if broker_state.exists():
        client.set_state(load_broker_state(broker_state), only_if_fresh=True)
    pool = load_probe_pool(cfg, data_dir)
    algo = build_ppo(cfg, make_env_config(cfg, pool.numpy(), run_id))
    dko = resume_policy(algo, run_dir)
    if dko is not None:
        client.publish_policy(dko)
    setup_s = time.perf_counter() - t0
    # 2. The Ray Train workers, in a thread; 3-4. PPO here.
    loop_config = loop_config_for(cfg, data_dir, run_dir, broker_name=broker_name(run_id),
                                  source_factory=make_broker_schedule)
    trainer = build_trainer(cfg, loop_config, callbacks)
    thread = TrainingThread(lambda: fit(trainer), client)
    iterations = _drive(cfg, algo, client, make_observer(cfg, pool), run_dir, thread,
                        after_iteration=lambda: atomic_torch_save(client.get_state(), broker_state))
    last = last_record(read_metrics(run_dir))
    last["ppo_iterations"] = iterations
    _append_jsonl(run_dir / "rl" / "driver_timing.jsonl", {"wall_s": time.perf_counter() - t0, "rl_setup_s": setup_s})
    return last


def train_akod_local(cfg: Config, data, device: str | torch.device = "cpu") -> dict:
    """The AKOD arm in this process: the loop (LocalEnv) in a thread, PPO here, a LocalBroker between.

    Every cost of the arm (training, branches, rewards, PPO) lands in this one process, so a
    ``train.budget_clock=cpu`` budget counts all of it. ``data`` is a TrainingData.
    """
    from akod_ray.rl.local_broker import LocalBroker, local_broker_client
    from akod_ray.rl.worker_source import BrokerSchedule
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training

    run_dir = cfg.run_dir
    save_config(cfg, run_dir)
    broker = LocalBroker(cfg.rl.broker_timeout_s, name=broker_name(f"local-{run_dir.resolve()}"))
    pool = probe_pool_of(cfg, data.train)
    env_config = make_env_config(cfg, pool.numpy(), f"local-{run_dir.resolve()}", broker_client_factory=local_broker_client)
    algo = build_ppo(cfg, env_config)
    env = LocalEnv(run_dir, cfg.train.num_to_keep, device)
    source = BrokerSchedule(cfg, env, broker, run_dir)
    thread = TrainingThread(lambda: run_training(cfg, data, env, run_dir, source), broker)
    iterations = _drive(cfg, algo, broker, make_observer(cfg, pool), run_dir, thread)
    return dict(thread.result or {}, ppo_iterations=iterations)
