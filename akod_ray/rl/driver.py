"""The AKOD arm: broker, Ray Train workers and the PPO learner, in one process (DESIGN 2).

1. Start the run's ScheduleBroker (restoring its state and PPO's after a driver restart).
2. Start the TorchTrainer in a thread: the workers train segment after segment with the
   schedules the broker hands out and post each segment's reward.
3. In this thread, PPO (env runners = 0: the ScheduleEnv lives here) trains while enough
   segments are left for another iteration; after each iteration it saves itself, the
   broker's state and the deterministic learned schedule.
4. Then the deterministic learned schedule goes to the workers as ``final`` for the rest
   of the run; the broker is closed when the trainer returns.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import torch

from akod_ray.config import Config, save_config
from akod_ray.data.parquet import load_images, to_model_range
from akod_ray.data.procedural import procedural_images
from akod_ray.diffusion.schedules import save_schedule
from akod_ray.rl.broker import BrokerClient, broker_name, get_or_create_broker
from akod_ray.rl.env import make_env_config
from akod_ray.rl.ppo import broker_error, build_ppo, deterministic_schedule, restore_algorithm, save_algorithm
from akod_ray.training.checkpoint import atomic_torch_save
from akod_ray.training.trainer import (build_trainer, data_dir_for, ensure_ray, fit, last_record, loop_config_for,
                                       read_metrics)


def load_probe(cfg: Config, data_dir: str | None) -> torch.Tensor:
    """The DKO's probe batch: dko.probe_size real training images in [-1, 1] (seeded)."""
    n, seed = cfg.dko.probe_size, cfg.data.seed + 7
    if cfg.data.source == "procedural":
        return to_model_range(procedural_images(n, seed=seed))
    return to_model_range(load_images(data_dir, "train", count=n, seed=seed))


class TrainerThread(threading.Thread):
    def __init__(self, trainer):
        super().__init__(name="akod-train", daemon=True)
        self.trainer = trainer
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fit(self.trainer)
        except BaseException as e:  # handed to the main thread
            self.error = e


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_akod(cfg: Config, data_dir_flag: str | None = None, run_id: str | None = None, callbacks: list | None = None) -> dict:
    """Train the AKOD arm; returns the last metrics record. ``run_id`` names the broker (a Tune trial id)."""
    data_dir = data_dir_for(cfg, data_dir_flag)
    run_dir = cfg.run_dir.resolve()
    rl_dir = run_dir / "rl"
    save_config(cfg, run_dir)
    ensure_ray(cfg)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. Broker and PPO, restored if this run was interrupted.
    run_id = run_id or cfg.run.name
    broker = get_or_create_broker(run_id)  # this process owns the actor: keep the handle alive
    client = BrokerClient(broker, cfg.rl.broker_timeout_s)
    broker_state = rl_dir / "broker_state.pt"
    if broker_state.exists():
        client.set_state(torch.load(broker_state, weights_only=True), only_if_fresh=True)
    env_config = make_env_config(cfg, load_probe(cfg, data_dir).numpy(), run_id)
    algo_dir = rl_dir / "algorithm"
    algo = restore_algorithm(cfg, env_config, algo_dir) if algo_dir.exists() else build_ppo(cfg, env_config)
    timing["rl_setup_s"] = time.perf_counter() - t0

    # 2. The Ray Train workers, in a thread.
    trainer = build_trainer(cfg, loop_config_for(cfg, data_dir, run_dir, broker_name=broker_name(run_id)), callbacks)
    thread = TrainerThread(trainer)
    thread.start()

    # 3. PPO while another iteration fits into the remaining segments.
    K, steps = cfg.rl.segment_steps, cfg.train.steps
    iteration = len(read_jsonl(rl_dir / "iterations.jsonl"))
    ppo_s = 0.0
    try:
        while thread.is_alive():
            done = (client.latest_result() or {}).get("step", 0)
            if math.ceil((steps - done) / K) <= cfg.rl.train_batch:
                break
            t = time.perf_counter()
            try:
                result = algo.train()
            except Exception as e:
                if broker_error(e) is not None and not thread.is_alive():
                    break  # the workers finished (or failed) while PPO waited for a reward
                raise
            iteration += 1
            env_runners = result.get("env_runners", {})
            save_algorithm(algo, algo_dir)
            atomic_torch_save(client.get_state(), broker_state)
            betas = deterministic_schedule(algo, env_config)
            save_schedule(run_dir / "schedule.json", betas, source="akod", iteration=iteration)
            ppo_s += time.perf_counter() - t
            _append_jsonl(rl_dir / "iterations.jsonl", {
                "iteration": iteration,
                "episode_return_mean": env_runners.get("episode_return_mean"),
                "num_episodes": env_runners.get("num_episodes"),
                "wall_s": time.perf_counter() - t0,
            })
        # 4. The learned schedule for the rest of the run.
        if thread.is_alive():
            betas = deterministic_schedule(algo, env_config)
            save_schedule(run_dir / "schedule.json", betas, source="akod", iteration=iteration, final=True)
            client.submit({"betas": betas.tolist(), "final": True})
        thread.join()
    finally:
        client.close("the Ray Train run ended")
        algo.stop()
    if thread.error is not None:
        raise thread.error
    last = last_record(read_metrics(run_dir))
    last["ppo_iterations"] = iteration
    _append_jsonl(rl_dir / "driver_timing.jsonl", {"wall_s": time.perf_counter() - t0, **timing})
    return last


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
