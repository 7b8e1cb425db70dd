"""`akod` command line: train | sweep | sample | fid | report | data prepare.

Thin: parse, build the config, call one function. A user error (AkodError) prints one
line naming the field or file and exits with status 2; argparse's own errors do too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from akod_ray.errors import AkodError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (tune_configs/...); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable), e.g. --set train.steps=200")
    p.add_argument("--data-dir", help="folder with train.parquet/test.parquet (else data.data_dir, AKOD_DATA_DIR, the cache)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="akod", description="Adaptive Kernel Optimized Diffusion on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one arm with Ray Train (DDP workers)")
    _config_args(p)

    p = sub.add_parser("sweep", help="run a Ray Tune sweep of fixed schedules against AKOD")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep (finished trials are kept)")

    p = sub.add_parser("sample", help="sample a PNG grid from a checkpoint's EMA weights")
    p.add_argument("checkpoint", help="checkpoint folder (checkpoint_XXXXXXXX) or a run folder (its latest)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=_positive_int, default=64, help="number of images")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    p.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", help="schedule file (e.g. a learned schedule.json) instead of the checkpoint's")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="download a dataset and write it as Parquet")
    q.add_argument("name", choices=("cifar10",))
    q.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("fid", help="FID (Inception) or fid_c10 (offline classifier) of a checkpoint's samples")
    p.add_argument("checkpoint", nargs="?",
                   help="checkpoint folder or run folder; or the word 'stats' to compute reference statistics of CIFAR-10 train")
    p.add_argument("--feature", choices=("inception", "c10"), default="inception",
                   help="inception: pytorch-fid FID; c10: the offline fid_c10")
    p.add_argument("--ref", help="reference statistics .npz")
    p.add_argument("--out", help="where 'akod fid stats' writes the .npz")
    p.add_argument("--n", type=_positive_int, default=10_000, help="number of samples")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception-weights", help="path to pt_inception-2015-12-05-6726825d.pth (air-gapped clusters)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("report", help="write a Markdown report with plots for a run or sweep folder")
    p.add_argument("path", help="run folder or sweep folder")
    p.add_argument("--out", help="report file (default: PATH/report.md)")
    return parser


def _load(args):
    from akod_ray.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from akod_ray.config import dump_config

    cfg = _load(args)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    from akod_ray.training.trainer import train

    last = train(cfg, args.data_dir)
    print(f"[akod] run finished: {cfg.run_dir.resolve()}  (step {last.get('step')}, ref_loss {last.get('ref_loss')})")
    return 0


def cmd_sweep(args) -> int:
    from akod_ray.config import dump_config

    cfg = _load(args)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    from akod_ray.sweep.tuner import run_sweep

    out = run_sweep(args.config, args.overrides, args.data_dir, resume=args.resume)
    print(f"[akod] sweep finished; report: {out}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.samplers import sample
    from akod_ray.diffusion.schedules import load_schedule
    from akod_ray.training.checkpoint import load_for_sampling
    from akod_ray.reporting.grids import save_grid

    if not 0.0 <= args.eta <= 1.0:
        raise AkodError(f"--eta must be in [0, 1], got {args.eta}")
    model, process, cfg = load_for_sampling(_checkpoint_path(args.checkpoint), args.device)
    if args.schedule:
        process = DiffusionProcess(load_schedule(args.schedule, cfg.diffusion.T))
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    images = sample(model, process, args.n, g, args.sampler, args.steps, args.eta, args.device)
    nrow = max(1, int(round(args.n**0.5)))
    out = save_grid(images, Path(args.out), nrow)
    print(f"[akod] wrote {args.n} samples ({args.sampler}) to {out}")
    return 0


def cmd_data(args) -> int:
    from akod_ray.data.prepare import prepare_cifar10

    try:
        out = prepare_cifar10(args.out)
    except OSError as e:
        raise AkodError(f"cannot download CIFAR-10 into {args.out!r}: {e}") from None
    print(f"[akod] wrote {out / 'train.parquet'} and {out / 'test.parquet'}")
    return 0


def cmd_fid(args) -> int:
    from akod_ray.evaluation import fid

    weights = args.inception_weights if args.feature == "inception" else None
    if args.checkpoint == "stats":
        from akod_ray.config import load_config
        from akod_ray.training.trainer import data_dir_for

        if not args.out:
            raise AkodError("akod fid stats needs --out FILE.npz")
        data_dir = data_dir_for(load_config(None), args.data_dir)
        stats = fid.compute_reference_stats(data_dir, args.out, feature=args.feature, weights=weights, device=args.device)
        print(f"[akod] wrote {args.out}: N = {stats.n}, {stats.source}; {stats.implementation}")
        return 0
    if not args.checkpoint or not args.ref:
        raise AkodError("akod fid needs a CHECKPOINT and --ref STATS.npz (or 'akod fid stats --out FILE.npz')")
    if not 0.0 <= args.eta <= 1.0:
        raise AkodError(f"--eta must be in [0, 1], got {args.eta}")
    result = fid.fid_from_checkpoint(_checkpoint_path(args.checkpoint), args.ref, n=args.n, seed=args.seed,
                                     sampler=args.sampler, steps=args.steps, eta=args.eta, weights=weights,
                                     device=args.device)
    print(f"[akod] {result}")
    return 0


def _checkpoint_path(text: str) -> Path:
    """A checkpoint folder as given, or the latest checkpoint of a run folder."""
    from akod_ray.errors import CheckpointError
    from akod_ray.training.checkpoint import latest_checkpoint

    path = Path(text)
    if path.is_dir() and not (path / "state.pt").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint_XXXXXXXX folder with a state.pt under {str(path)!r}")
        return found
    return path


def cmd_report(args) -> int:
    from akod_ray.reporting.report import write_report

    out = write_report(args.path, args.out)
    print(f"[akod] report: {out}")
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "sample": cmd_sample, "data": cmd_data, "fid": cmd_fid,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AkodError as e:
        print(f"akod: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("akod: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
