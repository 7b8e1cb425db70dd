"""Training-step throughput of the paper-width U-Net on this CPU (issue "foundation").

    .venv/bin/python bench/train_step.py [--batch 64] [--warmup 3] [--reps 5] [--threads 2]
                                         [--compile] [--no-write]

Variants, built side by side and timed interleaved (A B C D, D C B A, ...), medians:

  naive            fp32, contiguous NCHW, eager, AdamW(foreach=False)      -- the baseline
  bf16_cl          bf16 autocast + channels_last + fused AdamW (make_optimizer), eager
  bf16_cl_compile  the same, the U-Net wrapped in torch.compile (inductor, CPU); only with
                   --compile: it compiles in 2-5 minutes here and was no faster than eager
                   (BENCHMARKS.md)
  *_nomsfi         the fastest mode on the same U-Net with msfi=False (beta_modulation unchanged)

Every variant runs the project's own ``train_step`` (t and noise draws, loss, backward, grad
clipping, optimizer step) on the same real CIFAR-10 batch (procedural images when the data
folder is missing), model config ``ModelConfig()`` (the paper's width, 67,151,043 parameters).

Figures merged into bench/results.json:
  cpu_train_speedup_vs_naive_fp32   images/s of the fastest mode / images/s of naive
  cpu_train_img_per_s               images/s of the fastest mode (read by ray_train.py)
  cpu_train_naive_img_per_s
  cpu_train_gflops                  FLOPs of one training step (FlopCounterMode, forward +
                                    backward) / median step time of the fastest mode
  cpu_bf16_matmul_peak_gflops       best of several 4096^3 bf16 torch.matmul, same run
  cpu_train_gflops_over_bf16_peak
  msfi_step_time_ratio              step time with MSFI / without, fastest mode
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
from common import ROOT, interleaved, loadavg, median, merge_results, meta_record  # noqa: E402

import torch  # noqa: E402

from akod_ray.config import ModelConfig  # noqa: E402
from akod_ray.diffusion.process import DiffusionProcess  # noqa: E402
from akod_ray.diffusion.schedules import linear_betas  # noqa: E402
from akod_ray.models.unet import UNet, count_parameters  # noqa: E402
from akod_ray.training.step import StepOptions, make_optimizer, train_step  # noqa: E402

DATA_DIR = ROOT.parent / "shared" / "data" / "cifar10"


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


def bf16_matmul_peak(n: int = 4096, tries: int = 6) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
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
    if not args.no_msfi_ratio:
        cfg_off = dataclasses.replace(cfg, msfi=False)
        variants[fast_mode + "_nomsfi"] = make_variant(cfg_off, x, process, fast=True, compile_=args.compile)

    # Compile outside the timing: one step of each compiled variant first.
    compile_s = {}
    for name, fn in variants.items():
        if "compile" in name:
            t = time.perf_counter()
            fn()
            compile_s[name] = time.perf_counter() - t
            print(f"[bench] {name}: first step (compilation) {compile_s[name]:.1f}s", flush=True)

    cpu0 = {}
    cpu_times: dict[str, list[float]] = {n: [] for n in variants}

    def timed(name, fn):
        def run():
            c = time.process_time()
            fn()
            cpu_times[name].append(time.process_time() - c)
        return run

    loads = []
    times = interleaved({n: timed(n, f) for n, f in variants.items()}, args.warmup, args.reps,
                        log=lambda s: (loads.append(os.getloadavg()[0]), print(s, flush=True)))
    for n in cpu_times:
        cpu_times[n] = cpu_times[n][args.warmup:]
    del cpu0

    med = {n: median(v) for n, v in times.items()}
    cpu_med = {n: median(v) for n, v in cpu_times.items()}
    fast_candidates = [n for n in med if n.startswith("bf16") and not n.endswith("_nomsfi")]
    fastest = min(fast_candidates, key=med.get)
    img_s = {n: args.batch / med[n] for n in med}

    peaks = [bf16_matmul_peak() for _ in range(2)]
    peak = max(peaks)
    flops = count_step_flops(cfg, process, args.batch)
    gflops = flops / med[fastest] / 1e9
    load_end = loadavg()

    for n in med:
        print(f"[bench] {n:24s} median {med[n]:.2f}s/step ({img_s[n]:.2f} img/s), cpu {cpu_med[n]:.2f}s, "
              f"all {['%.2f' % v for v in times[n]]}", flush=True)
    speedup = med["naive"] / med[fastest]
    results = {
        "unet_paper_params": params,
        "cpu_train_speedup_vs_naive_fp32": round(speedup, 3),
        "cpu_train_img_per_s": round(img_s[fastest], 3),
        "cpu_train_naive_img_per_s": round(img_s["naive"], 3),
        "cpu_train_gflops": round(gflops, 1),
        "cpu_bf16_matmul_peak_gflops": round(peak, 1),
        "cpu_train_gflops_over_bf16_peak": round(gflops / peak, 3),
    }
    msfi_key = fastest + "_nomsfi"
    if msfi_key not in med and not args.no_msfi_ratio:
        msfi_key = fast_mode + "_nomsfi"  # the msfi=False twin of the mode named on the command line
        with_msfi = fast_mode
    else:
        with_msfi = fastest
    if msfi_key in med:
        results["msfi_step_time_ratio"] = round(med[with_msfi] / med[msfi_key], 3)
    details = {
        "batch": args.batch, "threads": args.threads, "warmup": args.warmup, "reps": args.reps, "data": source,
        "fastest_mode": fastest, "msfi_ratio_mode": with_msfi if msfi_key in med else None,
        "step_s_median": {n: round(v, 3) for n, v in med.items()},
        "step_s_all": {n: [round(v, 3) for v in times[n]] for n in times},
        "cpu_s_median": {n: round(v, 3) for n, v in cpu_med.items()},
        "cpu_time_speedup_vs_naive": round(cpu_med["naive"] / cpu_med[fastest], 3),
        "compile_first_step_s": {n: round(v, 1) for n, v in compile_s.items()},
        "step_gflop": round(flops / 1e9, 1), "bf16_matmul_peaks": [round(v, 1) for v in peaks],
        "loadavg_start": load_start, "loadavg_end": load_end,
        "loadavg_1min_during": [round(min(loads), 2), round(median(loads), 2), round(max(loads), 2)],
        "torch": torch.__version__,
    }
    print(f"[bench] fastest mode {fastest}: speedup {speedup:.2f}x over naive fp32 (target >= 2.2); "
          f"{gflops:.0f} GFLOP/s = {gflops / peak:.2f} of the bf16 matmul peak {peak:.0f} GFLOP/s (target >= 0.45)", flush=True)
    if "msfi_step_time_ratio" in results:
        print(f"[bench] msfi step-time ratio {results['msfi_step_time_ratio']:.3f} (target <= 1.05)", flush=True)
    print(f"[bench] load average: start {load_start}, end {load_end}", flush=True)
    if not args.no_write:
        merge_results(results, meta_record(loadavg=load_end, loadavg_start=load_start))
        merge_results({"_details_train_step": details})
    from common import command_line

    print(f"[bench] command: {command_line()}", flush=True)
    gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
