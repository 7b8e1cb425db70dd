"""Training throughput on one GPU (issue 13): the project's step eager and compiled, at batches 64
and 256, and the training loop end to end against the bare step.

    python bench/gpu_train.py --out gpu_train.json                  # on a GPU: about 5-7 minutes
    python bench/gpu_train.py --out gpu_train.json --variants fast_reduce-overhead_b64,loop_b64
    python bench/gpu_train.py --device cpu --quick --out /tmp/g.json  # the script's own CPU check (seconds)

Pure PyTorch: it imports torch and akod_ray modules that never import Ray. Where the training
loop's optional imports are missing (Pillow, torchvision, TensorBoard: the GPU machine has none),
no-op stand-ins take their place; they would only write sample images and event files, and the
output lists them under ``stubbed_modules``.

Variants (each built afresh, warmed up -- compilation and capture happen there -- then timed over
``--rounds`` rounds of ``--steps`` steps with one synchronization per round; the median round counts):

  train_step_b<B>     the step as the loop ran it before issue 13: train_step, then loss.item() and
                      the EMA every step; bf16 autocast, channels_last, fused AdamW, images on the host
  fast_<mode>_b<B>    FastStep with train.compile=<mode> (eager | default | reduce-overhead): images on
                      the device (BatchStream.move_to), lr set every step, EMA inside the step, no host
                      synchronization; NCHW when compiled on CUDA (fast_step.use_channels_last)
  loop_b64            run_training (LocalEnv, no Ray) at train.compile=auto, paper width, batch 64: img/s
                      of its metrics records after the first (the first holds compilation), each
                      interval with its reference-loss evaluation

Every model is the paper-width U-Net (ModelConfig(): 67.2M parameters, MSFI and beta-modulation on),
T = 1000, linear schedule, on synthetic uint8 images of CIFAR-10's size (50,000 x 3 x 32 x 32: the
same 150 MB as CIFAR-10; throughput does not depend on their content). ``--quick`` shrinks the
model, the batches (4 and 8) and the step counts so that the whole script runs in seconds.

Figures (written to --out as JSON with the device name and the torch version, printed, and merged
into bench/results.json with --merge-results, which only a full run on a CUDA device may do):
  gpu_train_img_per_s_b64   images/s of the fastest fast_<mode> at batch 64
  gpu_mfu_b256              FLOPs of forward + backward per image (FlopCounterMode) x images/s of the
                            fastest fast_<mode> at batch 256 / the nominal dense bf16 peak of the device
                            (989.4 TFLOP/s for H100/H200 SXM, 312 for A100); ``mfu_vs_matmul_peak``
                            divides by a measured 8192^3 bf16 matmul instead
  gpu_loop_vs_step_ratio    loop_b64 images/s / fast_<what auto resolves to>_b64 images/s
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, merge_results, meta_record, today  # noqa: E402
from train_step import count_step_flops  # noqa: E402  (FLOPs of forward + backward, FlopCounterMode)

import torch  # noqa: E402

from akod_ray.config import ModelConfig  # noqa: E402
from akod_ray.diffusion.process import DiffusionProcess  # noqa: E402
from akod_ray.diffusion.schedules import linear_betas  # noqa: E402
from akod_ray.models.unet import UNet, count_parameters  # noqa: E402
from akod_ray.training.ema import EMA  # noqa: E402
from akod_ray.training.fast_step import FastStep, resolve_compile, use_channels_last  # noqa: E402
from akod_ray.training.step import StepOptions, lr_at, make_optimizer, train_step  # noqa: E402

T = 1000
MODES = ("eager", "default", "reduce-overhead")
NOMINAL_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, SXM; the 989 TFLOP/s
QUICK_MODEL = ModelConfig(channels=(16, 16, 32, 32), bottleneck_channels=32, num_res_blocks=1, attention_resolutions=(16,))


# --------------------------------------------------------------------------- setup


def stub_missing_modules() -> list[str]:
    """No-op stand-ins for the training loop's optional imports that this machine lacks."""
    stubbed = []

    def missing(name: str) -> bool:
        try:
            importlib.import_module(name)
            return False
        except ImportError:
            return True

    if missing("PIL"):
        pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")
        image.UnidentifiedImageError = type("UnidentifiedImageError", (OSError,), {})
        image.open = lambda *a, **k: (_ for _ in ()).throw(OSError("Pillow is not installed (bench stand-in)"))
        pil.Image, pil.UnidentifiedImageError = image, image.UnidentifiedImageError
        sys.modules.update({"PIL": pil, "PIL.Image": image})
        stubbed.append("PIL")
    if missing("torchvision"):
        tv, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        utils.save_image = lambda *a, **k: None
        utils.make_grid = lambda x, *a, **k: x
        tv.utils = utils
        sys.modules.update({"torchvision": tv, "torchvision.utils": utils})
        stubbed.append("torchvision")
    if missing("torch.utils.tensorboard"):
        tb = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:
            def __init__(self, *a, **k): pass
            def add_scalar(self, *a, **k): pass
            def flush(self): pass
            def close(self): pass

        tb.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = tb
        stubbed.append("tensorboard")
    return stubbed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine()


def nominal_peak(name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)


def matmul_peak(device: torch.device, n: int, reps: int) -> float:
    """Best of ``reps`` bf16 n^3 matmuls, in FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- variants


@dataclasses.dataclass
class Plan:
    device: torch.device
    model: ModelConfig
    images: torch.Tensor  # uint8, on the host
    process: DiffusionProcess
    warmup: int
    steps: dict  # batch -> timed steps per round
    rounds: int


def build_train_step(plan: Plan, batch: int):
    """The step as the loop ran it before issue 13."""
    from akod_ray.data.stream import BatchStream

    torch.manual_seed(0)
    model = UNet(plan.model).to(plan.device, memory_format=torch.channels_last)
    opt = make_optimizer(model, 1e-4, 0.0)
    ema = EMA(model, 0.9999)
    opts = StepOptions(None, bf16=True, grad_clip=1.0)
    stream = BatchStream(plan.images, batch, seed=0)  # images on the host, copied every step
    gen = torch.Generator(device=plan.device)
    state = {"i": 0, "loss": 0.0}

    def step():
        for g in opt.param_groups:
            g["lr"] = lr_at(state["i"], 1e-4, 1000)
        gen.manual_seed(state["i"])
        state["i"] += 1
        state["loss"] = train_step(model, plan.process, stream.next(plan.device, True), opt, opts, gen)["loss"].item()
        ema.update(model)

    return step, {"channels_last": True}, lambda: state["loss"]


def build_fast(plan: Plan, batch: int, mode: str):
    from akod_ray.data.stream import BatchStream

    torch.manual_seed(0)
    resolved, _ = resolve_compile(mode, plan.device)
    channels_last = use_channels_last(True, resolved, plan.device)
    model = UNet(plan.model).to(plan.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, 1e-4, 0.0)
    runner = FastStep(model, opt, StepOptions(None, bf16=True, grad_clip=1.0), T, compile=mode, ema=EMA(model, 0.9999))
    stream = BatchStream(plan.images, batch, seed=0)
    on_device = stream.move_to(plan.device)
    gen = torch.Generator(device=plan.device)
    state = {"i": 0}

    def step():
        for g in opt.param_groups:
            g["lr"] = lr_at(state["i"], 1e-4, 1000)
        gen.manual_seed(state["i"])
        state["i"] += 1
        runner(stream.next(plan.device, channels_last), plan.process, gen)

    info = {"channels_last": channels_last, "images_on_device": on_device}
    return step, info, lambda: runner.mean_loss().item(), runner


def count_syncs(step, device: torch.device, steps: int = 3) -> float | None:
    """Host synchronizations per step, as CUDA's sync debug mode reports them (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def time_variant(plan: Plan, name: str, batch: int, build) -> dict:
    built = build()
    step, info, read_loss = built[0], built[1], built[2]
    runner = built[3] if len(built) > 3 else None
    t0 = time.perf_counter()
    for _ in range(plan.warmup):
        step()
    synchronize(plan.device)
    warmup_s = time.perf_counter() - t0
    rounds = []
    for _ in range(plan.rounds):
        synchronize(plan.device)
        t = time.perf_counter()
        for _ in range(plan.steps[batch]):
            step()
        synchronize(plan.device)
        rounds.append((time.perf_counter() - t) / plan.steps[batch])
    loss = read_loss()
    syncs = count_syncs(step, plan.device) if runner is not None else None
    step_s = statistics.median(rounds)
    out = {"batch": batch, "img_per_s": batch / step_s, "step_ms": 1000 * step_s,
           "step_ms_rounds": [round(1000 * r, 3) for r in rounds], "warmup_s": round(warmup_s, 1),
           "loss": loss, "host_syncs_per_step": syncs, **info}
    if runner is not None:
        out["fast_step"] = runner.describe()
    if plan.device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(plan.device) / 2**30, 2)
    if not (loss == loss and abs(loss) != float("inf")):
        raise RuntimeError(f"{name}: non-finite loss {loss}")
    return out


def run_loop(plan: Plan, batch: int, steps: int, log_every: int, quick: bool) -> dict:
    """run_training end to end (LocalEnv, no Ray); images/s from its metrics records after the first.

    The end of the run (fid_c10 and a sample grid) comes after the last record and is not timed;
    where it fails for want of an evaluation package (pytorch-fid computes fid_c10's Frechet
    distance), the records are still there and the failure is noted."""
    from akod_ray.config import Config, DataConfig, EvalConfig, TrainConfig, config_to_dict
    from akod_ray.data.sources import TrainingData
    from akod_ray.training import loop
    from akod_ray.training.local import LocalEnv

    n_val = 16 if quick else 256
    cfg = Config(
        model=plan.model,
        data=DataConfig(source="procedural", val_size=n_val),
        train=TrainConfig(steps=steps, batch_size=batch, warmup_steps=1000, bf16=True, channels_last=True,
                          compile="auto", log_every=log_every, ckpt_every=steps, sample_every=steps,
                          val_batch=n_val, ref_grid=2 if quick else 8, use_gpu=plan.device.type == "cuda"),
        eval=EvalConfig(sampler_steps=5, fid_samples=2, grid_size=1),
    )
    end_of_run_error = None
    with tempfile.TemporaryDirectory(prefix="akod_gpu_bench_") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()  # as the driver's save_config does before the workers start
        t0 = time.perf_counter()
        try:
            loop.run_training(cfg, TrainingData(plan.images, plan.images[:n_val]), LocalEnv(run_dir, device=plan.device),
                              run_dir, loop.FixedSchedule(linear_betas(T)))
        except Exception as e:  # judged below by the records written before it
            end_of_run_error = f"{type(e).__name__}: {str(e).strip()[:300]}"
        wall = time.perf_counter() - t0
        path = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    records = [r for r in records if "img_per_s" in r]
    timed = records[1:]
    if not timed:
        raise RuntimeError(f"loop: {len(records)} metrics record(s), need 2 (steps / log_every >= 2); "
                           f"run ended with {end_of_run_error}")
    if timed[-1]["step"] != steps:  # an error before the last record is not an end-of-run failure
        raise RuntimeError(f"loop stopped at step {timed[-1]['step']} of {steps}: {end_of_run_error}")
    seconds = sum(log_every * batch / r["img_per_s"] for r in timed)
    return {"batch": batch, "img_per_s": len(timed) * log_every * batch / seconds, "steps": steps,
            "log_every": log_every, "records_img_per_s": [round(r["img_per_s"], 1) for r in records],
            "wall_s": round(wall, 1), "loss": records[-1]["loss"], "loop_uses_fast_step": "FastStep" in vars(loop),
            "end_of_run_error": end_of_run_error,
            "config": {k: v for k, v in config_to_dict(cfg)["train"].items()
                       if k in ("compile", "channels_last", "bf16", "val_batch", "ref_grid", "log_every")}}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--out", required=True, help="where the JSON goes")
    p.add_argument("--quick", action="store_true", help="small model, batches 4 and 8, few steps: checks the script")
    p.add_argument("--variants", default=None, help="comma-separated names to run (default: all; see the docstring)")
    p.add_argument("--loop-steps", type=int, default=None, help="loop_b64 steps (default 1500; quick: 6)")
    p.add_argument("--max-seconds", type=float, default=540.0, help="skip the variants that would start after this")
    p.add_argument("--merge-results", action="store_true", help="merge the figures into bench/results.json (CUDA, not quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (a busy small machine: 1)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --quick to check the script)")
    if args.merge_results and (device.type != "cuda" or args.quick):
        p.error("--merge-results: only a full run on a CUDA device writes bench/results.json")
    start = time.perf_counter()
    stubbed = stub_missing_modules()
    b_small, b_large = (4, 8) if args.quick else (64, 256)
    plan = Plan(device=device, model=QUICK_MODEL if args.quick else ModelConfig(),
                images=torch.randint(0, 256, (512 if args.quick else 50_000, 3, 32, 32), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0)),
                process=DiffusionProcess(linear_betas(T)), warmup=1 if args.quick else 5,
                steps={b_small: 2, b_large: 2} if args.quick else {b_small: 30, b_large: 10},
                rounds=1 if args.quick else 3)
    loop_steps = args.loop_steps or (6 if args.quick else 1500)
    auto_mode, _ = resolve_compile("auto", device)

    variants = {}
    for b in (b_small, b_large):
        variants[f"train_step_b{b}"] = (b, lambda b=b: build_train_step(plan, b))
        for mode in MODES:
            variants[f"fast_{mode}_b{b}"] = (b, lambda b=b, mode=mode: build_fast(plan, b, mode))
    variants[f"loop_b{b_small}"] = (b_small, None)
    order = [f"train_step_b{b_small}", f"fast_eager_b{b_small}", f"fast_reduce-overhead_b{b_small}",
             f"fast_default_b{b_small}", f"loop_b{b_small}", f"fast_reduce-overhead_b{b_large}",
             f"fast_default_b{b_large}", f"fast_eager_b{b_large}", f"train_step_b{b_large}"]
    if args.quick and device.type == "cpu" and not args.variants:  # Inductor takes minutes on a small CPU
        order = [v for v in order if "default" not in v and "reduce-overhead" not in v]
    if args.variants:
        wanted = [v.strip().replace("_b64", f"_b{b_small}").replace("_b256", f"_b{b_large}")
                  for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            p.error(f"--variants: unknown {unknown}; known: {order}")
        order = [v for v in order if v in wanted]

    name = device_name(device)
    out = {"device": name, "device_type": device.type, "torch": torch.__version__,
           "cuda": torch.version.cuda if device.type == "cuda" else None, "date": today(), "command": command_line(),
           "quick": args.quick, "params": count_parameters(UNet(plan.model)), "stubbed_modules": stubbed,
           "auto_mode": auto_mode, "figures": {}, "variants": {}, "errors": {}, "skipped": []}
    out_path = Path(args.out)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        tmp.replace(out_path)

    print(f"[bench] {name}, torch {torch.__version__}; U-Net {out['params']:,} parameters; variants {order}; "
          f"stand-ins for {stubbed or 'nothing'}", flush=True)
    out["flops_per_image"] = count_step_flops(plan.model, plan.process, batch=1)
    out["matmul_peak_tflops"] = round(matmul_peak(device, 8192 if device.type == "cuda" else 512, 10) / 1e12, 1)
    save()
    for v in order:
        if time.perf_counter() - start > args.max_seconds:
            out["skipped"].append(v)
            print(f"[bench] {v}: skipped (past --max-seconds {args.max_seconds:.0f})", flush=True)
            continue
        batch, build = variants[v]
        try:
            if build is None:
                r = run_loop(plan, batch, loop_steps, max(2, loop_steps // 3), args.quick)
            else:
                r = time_variant(plan, v, batch, build)
            out["variants"][v] = r
            extra = f", fast_step {r['fast_step']}" if "fast_step" in r else ""
            print(f"[bench] {v}: {r['img_per_s']:.1f} img/s{extra}", flush=True)
        except Exception as e:  # one failed variant must not lose the others' figures
            out["errors"][v] = f"{type(e).__name__}: {str(e).strip()[:500]}\n" + traceback.format_exc()[-2000:]
            print(f"[bench] {v}: FAILED {type(e).__name__}: {str(e).strip()[:300]}", flush=True)
        finally:
            torch._dynamo.reset()  # each variant compiles its own model; no recompile limit across them
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        out["figures"] = figures(out, b_small, b_large, auto_mode, name)
        save()

    print(json.dumps(out["figures"], indent=2, sort_keys=True), flush=True)
    if args.merge_results and out["figures"]:
        merge_results(out["figures"], meta_record(device=name, torch=torch.__version__))
        merge_results({"_details_gpu_train": {k: v for k, v in out.items() if k != "figures"}})
    print(f"[bench] wrote {out_path} in {time.perf_counter() - start:.0f}s", flush=True)
    return 0 if not out["errors"] else 1


def figures(out: dict, b_small: int, b_large: int, auto_mode: str, name: str) -> dict:
    v = out["variants"]
    f = {}
    best = {b: max((v[k] for k in v if k.startswith("fast_") and v[k]["batch"] == b), key=lambda r: r["img_per_s"],
                   default=None) for b in (b_small, b_large)}
    if best[b_small]:
        f[f"gpu_train_img_per_s_b{b_small}"] = round(best[b_small]["img_per_s"], 1)
    if best[b_large]:
        achieved = best[b_large]["img_per_s"] * out["flops_per_image"]
        peak = nominal_peak(name)
        if peak:
            f[f"gpu_mfu_b{b_large}"] = round(achieved / peak, 4)
        f[f"gpu_mfu_b{b_large}_vs_matmul_peak"] = round(achieved / (out["matmul_peak_tflops"] * 1e12), 4)
        f[f"gpu_train_img_per_s_b{b_large}"] = round(best[b_large]["img_per_s"], 1)
    loop, bare = v.get(f"loop_b{b_small}"), v.get(f"fast_{auto_mode}_b{b_small}")
    if loop and bare:
        f["gpu_loop_vs_step_ratio"] = round(loop["img_per_s"] / bare["img_per_s"], 3)
    return f


if __name__ == "__main__":
    raise SystemExit(main())
