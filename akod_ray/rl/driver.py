"""The AKOD arm's driver: broker, training and the PPO learner, in one process (DESIGN 2).

Phases of :func:`train_akod` (Ray Train workers) and :func:`train_akod_local` (one process,
no Ray Train: benchmarks and tests):

1. setup: the run's broker (restoring its state after a driver restart) and PPO (resuming its
   policy from the latest Train checkpoint's plain tensors, never from a pickle);
2. training starts in a thread: decision window after decision window, each with the decisions
   and DKO state of one PPO episode, posting each window's rewards;
3. :func:`run_ppo`: PPO iterations for as long as training runs; after each, the DKO state (weights,
   the latest context, the iteration) is published to the broker, so the next windows train with it
   and every checkpoint holds it (``rl.frozen``: the same episodes, no updates);
4. the broker closes when training returns, which ends PPO.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from akod_ray import storage
from akod_ray.config import Config, save_config
from akod_ray.data.parquet import to_model_range
from akod_ray.diffusion.dko import DKOContext
from akod_ray.rl.broker import BrokerClient, broker_name, for_a_new_driver, get_or_create_broker
from akod_ray.rl.env import make_env_config
from akod_ray.rl.ppo import broker_error, build_ppo, explore_without_learning, load_rl_state_dict, policy_state
from akod_ray.rl.worker_source import make_broker_schedule
from akod_ray.errors import CheckpointError
from akod_ray.storage import StoragePath
from akod_ray.training.checkpoint import atomic_torch_save, latest_checkpoint, load_state, registered_checkpoint

# ----------------------------------------------------------------- 1. setup


def probe_pool_of(cfg: Config, train_images: torch.Tensor) -> torch.Tensor:
    """The DKO's image pool drawn from training images already in memory (uint8 [N, C, H, W]; seeded), as
    :meth:`akod_ray.data.stream.BatchStream.pool` draws it: the images the exported schedule averages over."""
    g = torch.Generator().manual_seed(cfg.data.seed + 7)
    idx = torch.randperm(train_images.shape[0], generator=g)[: cfg.dko.probe_pool]
    return to_model_range(train_images[idx])


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


def resume_policy(algo, path: StoragePath | None) -> dict | None:
    """Load the DKO state of the checkpoint ``path`` (the one the trunk resumes from) into PPO (plain tensors);
    returns it, or None when there is no checkpoint."""
    if path is None:
        return None
    dko = load_state(path).get("schedule_source", {}).get("dko")
    if dko and dko.get("module"):
        load_rl_state_dict(algo, dko["module"])
    return dko


# ----------------------------------------------------------------- 3. PPO


def latest_context(client) -> DKOContext:
    """The context of the workers' latest state (progress, the probe's metric)."""
    return DKOContext.from_dict((client.latest_result() or {}).get("context"))


def _plain(v):
    """A JSON-ready scalar: RLlib's metrics come as numpy or torch scalars."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
        if isinstance(v, (bool, int)):
            return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _append_jsonl(path: Path, record: dict) -> None:
    storage.append_jsonl(path, {k: _plain(v) for k, v in record.items()})


def read_jsonl(path: Path) -> list[dict]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _ended(training_alive: Callable[[], bool], grace_s: float = 10.0) -> bool:
    """Has training ended? The broker closes just before the training thread returns: allow it a moment."""
    deadline = time.monotonic() + grace_s
    while training_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not training_alive()


def run_ppo(cfg: Config, algo, client, run_dir: Path, training_alive: Callable[[], bool],
            after_iteration: Callable[[], None] | None = None) -> int:
    """Phase 3: PPO iterations (or, with ``rl.frozen``, the same episodes without updates) while training runs.
    Returns the iteration count."""
    rl_dir = run_dir / "rl"
    iteration = len(read_jsonl(rl_dir / "iterations.jsonl"))
    t0 = time.perf_counter()
    while training_alive():
        try:
            result = explore_without_learning(algo, cfg.rl.train_batch) if cfg.rl.frozen else algo.train()
            iteration += 1
            if not cfg.rl.frozen:
                client.publish_policy(policy_state(algo, latest_context(client), iteration))
        except Exception as e:
            if broker_error(e) is not None and _ended(training_alive):
                break  # training finished (a time budget) or failed while PPO waited for rewards
            raise
        if after_iteration is not None:
            after_iteration()
        env_runners = result.get("env_runners", {})
        learner = result.get("learners", {}).get("default_policy", {})
        _append_jsonl(rl_dir / "iterations.jsonl", {
            "iteration": iteration, "episode_return_mean": env_runners.get("episode_return_mean"),
            "num_episodes": env_runners.get("num_episodes"),
            # decisions (one reward each) in this iteration's train batch, and the sample-updates PPO made of them
            "samples_trained": int(env_runners.get("num_env_steps_sampled", 0)),
            "sample_updates": int(learner.get("num_module_steps_trained", 0)),
            "prior_kl": learner.get("prior_kl"), "entropy": learner.get("entropy"),
            "vf_explained_var": learner.get("vf_explained_var"), "frozen": cfg.rl.frozen,
            "wall_s": time.perf_counter() - t0,
        })
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


def _drive(cfg: Config, algo, client, run_dir: Path, thread: TrainingThread,
           after_iteration: Callable[[], None] | None = None) -> int:
    thread.start()
    try:
        iterations = run_ppo(cfg, algo, client, run_dir, thread.is_alive, after_iteration)
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
    if storage.exists(broker_state):
        client.set_state(for_a_new_driver(load_broker_state(broker_state)), only_if_fresh=True)
    algo = build_ppo(cfg, make_env_config(cfg, run_id))
    dko = resume_policy(algo, registered_checkpoint(run_dir))  # where Ray Train resumes the trunk
    if dko is not None:
        client.publish_policy(dko)
    setup_s = time.perf_counter() - t0
    # 2. The Ray Train workers, in a thread; 3-4. PPO here.
    loop_config = loop_config_for(cfg, data_dir, run_dir, broker_name=broker_name(run_id),
                                  source_factory=make_broker_schedule)
    trainer = build_trainer(cfg, loop_config, callbacks)
    thread = TrainingThread(lambda: fit(trainer), client)
    iterations = _drive(cfg, algo, client, run_dir, thread,
                        after_iteration=lambda: atomic_torch_save(client.get_state(), broker_state))
    last = last_record(read_metrics(run_dir))
    last["ppo_iterations"] = iterations
    _append_jsonl(run_dir / "rl" / "driver_timing.jsonl", {"wall_s": time.perf_counter() - t0, "rl_setup_s": setup_s})
    return last


def train_akod_local(cfg: Config, data, device: str | torch.device = "cpu") -> dict:
    """The AKOD arm in this process: the loop (LocalEnv) in a thread, PPO here, a LocalBroker between.

    Every cost of the arm (training, credits, the probe gradient, PPO) lands in this one process, so a
    ``train.budget_clock=cpu`` budget counts all of it. ``data`` is a TrainingData.
    """
    from akod_ray.rl.local_broker import LocalBroker, local_broker_client
    from akod_ray.rl.worker_source import BrokerSchedule
    from akod_ray.training.local import LocalEnv
    from akod_ray.training.loop import run_training

    run_dir = cfg.run_dir
    save_config(cfg, run_dir)
    broker = LocalBroker(cfg.rl.broker_timeout_s, name=broker_name(f"local-{run_dir.resolve()}"))
    env_config = make_env_config(cfg, f"local-{run_dir.resolve()}", broker_client_factory=local_broker_client)
    algo = build_ppo(cfg, env_config)
    dko = resume_policy(algo, latest_checkpoint(run_dir))  # where LocalEnv resumes the trunk
    if dko is not None:
        broker.publish_policy(dko)
    env = LocalEnv(run_dir, cfg.train.num_to_keep, device)
    source = BrokerSchedule(cfg, env, broker, run_dir)
    thread = TrainingThread(lambda: run_training(cfg, data, env, run_dir, source), broker)
    iterations = _drive(cfg, algo, broker, run_dir, thread)
    return dict(thread.result or {}, ppo_iterations=iterations)
