"""One Tune trial: one arm trained with Ray Train (Train V2: the trial function builds the
TorchTrainer, TuneReportCallback carries the workers' reports to Tune).

A trial's config is the sweep's base config plus its point of the search space; the run
folder and the broker are named from the trial's point and Tune's trial id, never a
timestamp, so a restored trial resumes its own run.
"""

from __future__ import annotations

import dataclasses
import math


from akod_ray.config import ARM_SPECS, Config, config_from_dict, config_to_dict
from akod_ray.evaluation.metrics import read_metrics, time_to_target


def search_space(cfg: Config) -> list[dict]:
    """The sweep's points: each fixed arm per seed, each learned-schedule arm per (filter size, seed)."""
    points = []
    for seed in cfg.sweep.seeds:
        for arm in cfg.sweep.arms:
            for k in cfg.sweep.kernel_sizes if ARM_SPECS[arm].schedule == "akod" else (None,):
                points.append({"arm": arm, "kernel_size": k, "seed": seed})
    return points


def point_name(point: dict) -> str:
    k = f"_k{point['kernel_size']}" if point["kernel_size"] is not None else ""
    return f"{point['arm']}{k}_s{point['seed']}"


def trial_config(base: Config, point: dict, run_root: str, trial_id: str, searched: dict | None = None) -> Config:
    """The base config with the point's arm (its schedule and network switches, ARM_SPECS), filter
    size and seed, the sweep's equal budget, and a search's values (``{"diffusion.laplace_scale": 1.2}``)."""
    d = config_to_dict(base)
    for key, value in (searched or {}).items():
        section, name = key.split(".")
        d[section][name] = value
    spec = ARM_SPECS[point["arm"]]
    for section, fields in spec.switches().items():  # the arm's switches, never the base's
        d[section].update(fields)
    d["diffusion"]["min_snr_gamma"] = base.sweep.min_snr_gamma if spec.min_snr else None
    if point["kernel_size"] is not None:
        d["dko"]["kernel_size"] = point["kernel_size"]
    d["train"]["seed"] = point["seed"]
    d["data"]["seed"] = point["seed"]
    if base.sweep.budget_kind == "images":
        d["train"]["steps"] = max(1, int(base.sweep.budget // base.train.batch_size))
    else:
        d["train"]["max_wall_s"] = float(base.sweep.budget)
    d["run"]["root"] = run_root
    d["run"]["name"] = f"{point_name(point)}-{trial_id}"
    return config_from_dict(d)


def summarize(cfg: Config, point: dict, searched: dict | None = None) -> dict:
    """The trial's final numbers for Tune and the sweep table (with a search's values for this trial)."""
    records = read_metrics(cfg.run_dir / "metrics.jsonl")
    last = {}
    for r in records:  # later records win; fid lines carry only the fid keys
        last.update({k: v for k, v in r.items() if v is not None})
    out = {
        "arm": point["arm"], "kernel_size": point["kernel_size"] or 0, "seed": point["seed"],
        "schedule": cfg.diffusion.schedule, "msfi": cfg.model.msfi, "beta_modulation": cfg.model.beta_modulation,
        "min_snr_gamma": cfg.diffusion.min_snr_gamma, "adaptation": cfg.diffusion.adaptation, "frozen": cfg.rl.frozen,
        "step": last.get("step", 0), "wall_s": last.get("wall_s", math.nan),
        "ref_loss": last.get("ref_loss", math.nan), "fid_c10": last.get("fid_c10", math.nan),
        "fid_c10_n": last.get("fid_c10_n", 0), "fid": last.get("fid", math.nan), "fid_n": last.get("fid_n", 0),
        "run_dir": str(cfg.run_dir), **(searched or {}),
    }
    if cfg.eval.target_ref_loss is not None:
        out["time_to_ref_loss_s"] = time_to_target(records, "ref_loss", cfg.eval.target_ref_loss)
    if cfg.eval.target_fid is not None:
        out["time_to_fid_c10_s"] = time_to_target(records, "fid_c10", cfg.eval.target_fid)
    return out


REFEREE_SEED = 10_000  # + train.seed: the referee's starting noise (bench/akod_science.py's final fid_c10 too)


def samples_fid_c10(cfg: Config, model, process, n: int, seed: int, grid: str) -> float:
    """fid_c10 of ``n`` samples of ``model`` with the run's sampler on ``grid``, all drawn from one generator seeded
    ``seed``: the referee of a search (:func:`referee`) and of bench/akod_science.py."""
    import torch

    from akod_ray.evaluation.fid import default_c10_reference, fid_c10
    from akod_ray.evaluation.sampling import sample_as_configured

    images = sample_as_configured(cfg, model, process, n, torch.Generator().manual_seed(seed), "cpu", grid=grid)
    return fid_c10(images.float(), default_c10_reference())


def referee(cfg: Config, n: int) -> dict:
    """fid_c10 of ``n`` EMA samples from the run's final checkpoint on the common grid, from the same starting noise
    for every run of a seed: exactly bench/akod_science.py's ``final_fid`` on the common grid."""
    from akod_ray.training.checkpoint import latest_checkpoint, load_for_sampling

    model, process, _ = load_for_sampling(latest_checkpoint(cfg.run_dir))
    return {"fid_c10_final": samples_fid_c10(cfg, model, process, n, REFEREE_SEED + cfg.train.seed, "common"),
            "fid_c10_final_n": n}


def replace_sweep(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, **changes))
