"""Training-step throughput of the paper-width U-Net on this CPU (issue "foundation").

    .venv/bin/python bench/train_step.py [--batch 64] [--warmup 3] [--reps 5] [--msfi-reps 6]
                                         [--threads 2] [--compile] [--no-write]

Variants, built side by side and timed interleaved (A B C, C B A, ...):

  naive            fp32, contiguous NCHW, eager, AdamW(foreach=False)      -- the baseline
  bf16_cl          bf16 autocast + channels_last + fused AdamW (make_optimizer), eager
  bf16_cl_compile  the same, the U-Net wrapped in torch.compile (inductor, CPU); only with
                   --compile: it compiles in 2-5 minutes here and was no faster than eager
                   (BENCHMARKS.md)
  *_nomsfi         the fastest mode on the same U-Net with msfi=False (beta_modulation unchanged);
                   --msfi-reps more rounds of this pair alone

Every variant runs the project's own ``train_step`` (t and noise draws, loss, backward, grad
clipping, optimizer step) on the same real CIFAR-10 batch (procedural images when the data
folder is missing), model config ``ModelConfig()`` (the paper's width, 67,151,043 parameters).

The box is shared with other jobs, so ratios are medians over rounds of the per-round ratio
(the two variants of a round ran back to back under the same load); the ratios of the medians
are kept in ``_details_train_step`` too.

Figures merged into bench/results.json:
  cpu_train_speedup_vs_naive_fp32   step time of naive / step time of the fastest mode
  cpu_train_img_per_s               images/s of the fastest mode (median step; read by ray_train.py)
  cpu_train_naive_img_per_s
  cpu_train_gflops                  FLOPs of one training step (FlopCounterMode, forward +
                                    backward) / median step time of the fastest mode
  cpu_bf16_matmul_peak_gflops       best of many 4096^3 bf16 torch.matmul tries spread over the run
  cpu_train_gflops_over_bf16_peak
  msfi_step_time_ratio              step time with MSFI / without, fastest mode
  msfi_step_flop_ratio              FLOPs of a training step with MSFI / without (FlopCounterMode)
  unet_paper_params
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, interleaved, loadavg, median, paired_ratios, write_figures  # noqa: E402

import torch  # noqa: E402

from akod_ray.config import ModelConfig  # noqa: E402
from akod_ray.diffusion.process import DiffusionProcess  # noqa: E402
from akod_ray.diffusion.schedules import linear_betas  # noqa: E402
from akod_ray.models.unet import UNet, count_parameters  # noqa: E402
from akod_ray.training.step import StepOptions, make_optimizer, train_step  # noqa: E402


def real_batch(n: int) -> tuple[torch.Tensor, str]:
    from akod_ray.data.parquet import to_model_range

    if (DATA_DIR / "train.parquet").is_file():
        from akod_ray.data.parquet import load_images

        return to_model_range(load_images(DATA_DIR, "train", count=n, seed=0)), "cifar10"
    from akod_ray.data.procedural import procedural_images

    return to_model_range(procedural_images(n, seed=0)), "procedural"


def make_variant(cfg: ModelConfig, x: torch.Tensor, process: DiffusionProcess, *, fast: bool, compile_: bool):
    """A closure doing one full training step (returns when the step is done: .item() syncs)."""
    torch.manual_seed(0)
    model = UNet(cfg)
    if fast:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, 1e-4, 0.0)  # fused AdamW, as in training
    else:
        x = x.contiguous()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=False, fused=False)
    net = torch.compile(model) if compile_ else model
    opts = StepOptions(min_snr_gamma=None, bf16=fast, grad_clip=1.0)
    gen = torch.Generator()
    state = {"i": 0}

    def step():
        gen.manual_seed(state["i"])
        state["i"] += 1
        loss = train_step(net, process, [x], optimizer, opts, gen)["loss"].item()
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError("non-finite loss in the benchmark")

    return step


def count_step_flops(cfg: ModelConfig, process: DiffusionProcess, batch: int, count_batch: int = 2) -> float:
    """FLOPs of one training step's forward + backward at ``batch`` (counted at ``count_batch``
    and scaled: every counted op -- convolutions, matmuls, attention -- is linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = UNet(cfg)
    x = torch.rand(count_batch, 3, 32, 32) * 2 - 1
    t = torch.randint(0, process.T, (count_batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        process.training_loss(model, x, t, torch.randn_like(x)).mean().backward()
    return counter.get_total_flops() * batch / count_batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed rounds of every variant")
    p.add_argument("--msfi-reps", type=int, default=6,
                   help="extra timed rounds of the MSFI pair only (its difference is a few percent: more pairs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="add the torch.compile variant (inductor; a few minutes of compilation on 2 cores)")
    p.add_argument("--no-msfi-ratio", action="store_true", help="leave out the msfi=False variant")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results.json alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = loadavg()

    cfg = ModelConfig()
    process = DiffusionProcess(linear_betas(1000))
    x, source = real_batch(args.batch)
    params = count_parameters(UNet(cfg))
    print(f"[bench] paper-width U-Net: {params:,} parameters; batch {args.batch} ({source}); "
          f"{args.threads} threads; load {load_start}", flush=True)

    fast_mode = "bf16_cl_compile" if args.compile else "bf16_cl"
    variants = {"naive": make_variant(cfg, x, process, fast=False, compile_=False),
                "bf16_cl": make_variant(cfg, x, process, fast=True, compile_=False)}
    if args.compile:
        variants["bf16_cl_compile"] = make_variant(cfg, x, process, fast=True, compile_=True)
    nomsfi = fast_mode + "_nomsfi"
    if not args.no_msfi_ratio:
        cfg_off = dataclasses.replace(cfg, msfi=False)
        variants[nomsfi] = make_variant(cfg_off, x, process, fast=True, compile_=args.compile)

    # Compile outside the timing: one step of each compiled variant first.
    compile_s = {}
    for name, fn in variants.items():
        if "compile" in name:
            t = time.perf_counter()
            fn()
            compile_s[name] = time.perf_counter() - t
            print(f"[bench] {name}: first step (compilation) {compile_s[name]:.1f}s", flush=True)

    cpu_times: dict[str, list[float]] = {n: [] for n in variants}

    def timed(name, fn):
        def run():
            c = time.process_time()
            fn()
            cpu_times[name].append(time.process_time() - c)
        return run

    # The bf16 matmul peak: a few tries after every round, so the best of them sees the calmest
    # moment of the run (a single burst at one moment is at the mercy of the box's other jobs).
    a = torch.randn(4096, 4096, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, dtype=torch.bfloat16)
    torch.matmul(a, b)
    peaks: list[float] = []

    def peak_tries(n: int = 3):
        for _ in range(n):
            t = time.perf_counter()
            torch.matmul(a, b)
            peaks.append(2 * 4096**3 / (time.perf_counter() - t) / 1e9)

    loads = []

    def log(s):
        loads.append(os.getloadavg()[0])
        print(s, flush=True)

    times = interleaved({n: timed(n, f) for n, f in variants.items()}, args.warmup, args.reps, log=log, between=peak_tries)
    for n in cpu_times:
        cpu_times[n] = cpu_times[n][args.warmup:]
    if nomsfi in variants and args.msfi_reps > 0:
        print(f"[bench] {args.msfi_reps} more rounds of {fast_mode} / {nomsfi}", flush=True)
        extra = interleaved({fast_mode: timed(fast_mode, variants[fast_mode]), nomsfi: timed(nomsfi, variants[nomsfi])},
                            0, args.msfi_reps, log=log, between=peak_tries)
    else:
        extra = {}
    peak_tries(6)

    med = {n: median(v) for n, v in times.items()}
    cpu_med = {n: median(v) for n, v in cpu_times.items()}
    fast_candidates = [n for n in med if n.startswith("bf16") and not n.endswith("_nomsfi")]
    fastest = min(fast_candidates, key=med.get)
    img_s = {n: args.batch / med[n] for n in med}

    peak = max(peaks)
    flops = count_step_flops(cfg, process, args.batch)
    gflops = flops / med[fastest] / 1e9
    load_end = loadavg()

    for n in med:
        print(f"[bench] {n:24s} median {med[n]:.2f}s/step ({img_s[n]:.2f} img/s), cpu {cpu_med[n]:.2f}s, "
              f"all {['%.2f' % v for v in times[n]]}", flush=True)
    # Estimators: ratios of the medians, and medians of the per-round ratios (the two variants of
    # a round ran next to each other, so a load change in the middle of the run cancels).
    speedup_paired = median(paired_ratios(times["naive"], times[fastest]))
    speedup_medians = med["naive"] / med[fastest]
    results = {
        "unet_paper_params": params,
        "cpu_train_speedup_vs_naive_fp32": round(speedup_paired, 3),
        "cpu_train_img_per_s": round(img_s[fastest], 3),
        "cpu_train_naive_img_per_s": round(img_s["naive"], 3),
        "cpu_train_gflops": round(gflops, 1),
        "cpu_bf16_matmul_peak_gflops": round(peak, 1),
        "cpu_train_gflops_over_bf16_peak": round(gflops / peak, 3),
    }
    details = {
        "batch": args.batch, "threads": args.threads, "warmup": args.warmup, "reps": args.reps, "data": source,
        "fastest_mode": fastest,
        "estimator": "median over rounds of the per-round ratio (variants interleaved, adjacent in time)",
        "speedup_ratio_of_medians": round(speedup_medians, 3),
        "speedup_per_round": [round(v, 3) for v in paired_ratios(times["naive"], times[fastest])],
        "step_s_median": {n: round(v, 3) for n, v in med.items()},
        "step_s_all": {n: [round(v, 3) for v in times[n]] for n in times},
        "cpu_s_median": {n: round(v, 3) for n, v in cpu_med.items()},
        "cpu_time_speedup_vs_naive": round(cpu_med["naive"] / cpu_med[fastest], 3),
        "compile_first_step_s": {n: round(v, 1) for n, v in compile_s.items()},
        "step_gflop": round(flops / 1e9, 1),
        "gflops_best_step": round(flops / min(times[fastest]) / 1e9, 1),
        "bf16_matmul_peak_tries": len(peaks),
        "bf16_matmul_peak_median_of_tries": round(median(peaks), 1),
        "loadavg_start": load_start, "loadavg_end": load_end,
        "loadavg_1min_during": [round(min(loads), 2), round(median(loads), 2), round(max(loads), 2)],
        "torch": torch.__version__,
    }
    if nomsfi in times:
        with_msfi = times[fast_mode] + extra.get(fast_mode, [])
        without = times[nomsfi] + extra.get(nomsfi, [])
        per_round = paired_ratios(with_msfi, without)
        results["msfi_step_time_ratio"] = round(median(per_round), 3)
        # The same ratio in counted FLOPs: deterministic, so it shows what the timing noise hides.
        results["msfi_step_flop_ratio"] = round(flops / count_step_flops(dataclasses.replace(cfg, msfi=False), process,
                                                                         args.batch), 4)
        details.update({
            "msfi_ratio_mode": fast_mode, "msfi_rounds": len(per_round),
            "msfi_ratio_per_round": [round(v, 3) for v in per_round],
            "msfi_ratio_of_medians": round(median(with_msfi) / median(without), 3),
            "msfi_step_s_all": {fast_mode: [round(v, 3) for v in with_msfi], nomsfi: [round(v, 3) for v in without]},
        })
    print(f"[bench] fastest mode {fastest}: speedup {speedup_paired:.2f}x over naive fp32 (median of per-round ratios; "
          f"ratio of medians {speedup_medians:.2f}; target >= 2.2); {gflops:.0f} GFLOP/s = {gflops / peak:.2f} of the "
          f"bf16 matmul peak {peak:.0f} GFLOP/s (best of {len(peaks)}; target >= 0.45)", flush=True)
    if "msfi_step_time_ratio" in results:
        print(f"[bench] msfi step-time ratio {results['msfi_step_time_ratio']:.3f} (median of {details['msfi_rounds']} "
              f"per-round ratios; ratio of medians {details['msfi_ratio_of_medians']:.3f}; target <= 1.05); "
              f"FLOP ratio {results['msfi_step_flop_ratio']:.4f}", flush=True)
    write_figures("train_step", results, details, load_start, not args.no_write)
    gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
