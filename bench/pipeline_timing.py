"""Sampling through AKODPipeline (diffusers) against `akod sample`'s code path, at 20 network evaluations.

    .venv/bin/python bench/pipeline_timing.py [--checkpoint RUN_OR_CKPT] [--n 16] [--rounds 7] [--sampler dpmpp_2m]

Without ``--checkpoint`` it builds a tiny model (``tune_configs/tiny.yaml``'s U-Net, random EMA weights:
time does not depend on the weights) in a temporary folder. The checkpoint is exported with ``akod export``
and loaded with ``AKODPipeline.from_pretrained``; then three ways of sampling ``--n`` images at 20 network
evaluations per image are timed in alternating rounds (A B C, C B A, ...; bench/common.py's ``interleaved``):

  akod_sample        evaluation.sampling.sample_checkpoint's sampling: sample_as_configured, the run's model
  pipeline_sampler   AKODPipeline(..., sampler=SAMPLER): the same sampler through the pipeline
  pipeline_scheduler AKODPipeline(...) with its diffusers scheduler object (DPM-Solver++ 2M, 20 steps)

and the pipeline's images are checked against akod sample's (the same seed). Figures go to
bench/results.json (``pipeline_*``); BENCHMARKS.md, section "Sampling through AKODPipeline".
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, interleaved, loadavg, write_figures  # noqa: E402

STEPS = 20  # network evaluations per image


def tiny_checkpoint(folder: Path, sampler: str) -> Path:
    """tune_configs/tiny.yaml's U-Net with random weights, as a run folder with one checkpoint."""
    import torch

    from akod_ray.config import config_to_dict, load_config
    from akod_ray.diffusion.schedules import cosine_betas
    from akod_ray.models.unet import UNet
    from akod_ray.training.checkpoint import checkpoint_dir_name, save_state
    from akod_ray.training.ema import EMA

    cfg = load_config(ROOT / "tune_configs" / "tiny.yaml", [f"run.root={folder}", f"eval.sampler={sampler}",
                                                            f"eval.sampler_steps={STEPS}"])
    torch.manual_seed(0)
    model = UNet(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {"model": model.state_dict(), "ema": EMA(model, 0.99).state_dict(), "optimizer": {}, "step": 1,
             "data": {"epoch": 0, "offset": 0}, "wall_s": 0.0, "betas": cosine_betas(cfg.diffusion.T),
             "config": config_to_dict(cfg), "schedule_source": {}}
    save_state(cfg.run_dir / checkpoint_dir_name(1), state)
    return cfg.run_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a run or checkpoint folder (default: a tiny random model)")
    p.add_argument("--n", type=int, default=16, help="images per call")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sampler", default="dpmpp_2m", help="the project's sampler the first two ways run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the timing is not a thread race)")
    p.add_argument("--no-write", action="store_true", help="print, do not merge into bench/results.json")
    args = p.parse_args(argv)

    import diffusers
    import torch

    from akod_ray.evaluation.sampling import sample_as_configured
    from akod_ray.export import export_checkpoint
    from akod_ray.pipeline import AKODPipeline
    from akod_ray.training.checkpoint import load_for_sampling, resolve_checkpoint

    torch.set_num_threads(args.threads)
    load_start = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.checkpoint or tiny_checkpoint(Path(tmp), args.sampler)
        ckpt = resolve_checkpoint(run)
        model, process, cfg = load_for_sampling(ckpt)
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sampler=args.sampler, sampler_steps=STEPS))
        pipe = AKODPipeline.from_pretrained(export_checkpoint(ckpt, Path(tmp) / "export"))
        pipe.set_progress_bar_config(disable=True)
        dpm = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

        def akod_sample():
            return sample_as_configured(cfg, model, process, args.n, torch.Generator().manual_seed(0))

        def pipeline_sampler():
            return pipe(batch_size=args.n, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                        sampler=args.sampler, output_type="pt").images

        def pipeline_scheduler():
            pipe.scheduler = dpm
            return pipe(batch_size=args.n, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                        output_type="pt").images

        same = (pipeline_sampler() - ((akod_sample() / 2 + 0.5).clamp(0, 1))).abs().max().item()
        print(f"[bench] AKODPipeline(sampler={args.sampler}) vs akod sample, same seed: max |diff| {same:.2e}", flush=True)
        fns = {"akod_sample": akod_sample, "pipeline_sampler": pipeline_sampler, "pipeline_scheduler": pipeline_scheduler}
        t0 = time.perf_counter()
        times = interleaved(fns, args.warmup, args.rounds, log=lambda m: print(m, flush=True))
        wall = time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median([a / b for a, b in zip(times[k], times["akod_sample"])])
              for k in ("pipeline_sampler", "pipeline_scheduler")}
    for k, v in med.items():
        print(f"[bench] {k}: {v / args.n * 1e3:.1f} ms per image (median of {args.rounds})", flush=True)
    for k, r in ratios.items():
        print(f"[bench] {k} / akod_sample: {r:.3f} (median of per-round ratios)", flush=True)
    results = {
        "pipeline_akod_sample_ms_per_image": round(med["akod_sample"] / args.n * 1e3, 3),
        "pipeline_sampler_ms_per_image": round(med["pipeline_sampler"] / args.n * 1e3, 3),
        "pipeline_scheduler_ms_per_image": round(med["pipeline_scheduler"] / args.n * 1e3, 3),
        "pipeline_sampler_over_akod_sample": round(ratios["pipeline_sampler"], 4),
        "pipeline_scheduler_over_akod_sample": round(ratios["pipeline_scheduler"], 4),
        "pipeline_sampler_max_abs_diff": same,
    }
    details = {"n": args.n, "rounds": args.rounds, "sampler": args.sampler, "nfe": STEPS, "threads": args.threads,
               "checkpoint": str(args.checkpoint or "tiny random model (tune_configs/tiny.yaml)"), "all_s": times,
               "wall_s": wall}
    write_figures("pipeline_timing", results, details, load_start, write=not args.no_write)


if __name__ == "__main__":
    main()
