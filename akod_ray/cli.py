"""`akod` command line: train | sweep | sample | export | fid | report | data prepare.

Thin: parse, build the config, check what the config alone cannot (:mod:`akod_ray.preflight`),
call one function. A user error (AkodError) prints one line naming the field or file and exits
with status 2; argparse's own errors do too. Anything else (a bug, or a failure inside Ray that
is not the user's input) prints one line with its cause and where the full traceback was kept,
and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

from akod_ray.errors import AkodError, one_line, root_cause

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range (non-negative)


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block): ``akod sample: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (tune_configs/...); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable), e.g. --set train.steps=200")
    p.add_argument("--data-dir", help="folder with train.parquet/test.parquet (else data.data_dir, AKOD_DATA_DIR, the cache)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's log lines and all its processes print (else: akod's own lines; the rest in ray.log)")


def _int_in(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:,}, got {value}")
        return value

    return parse


_positive_int = _int_in(1, 10**9)
_seed = _int_in(0, MAX_SEED)


def _eta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text[:40]!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text[:40]}")
    return value


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --grid, --eta: each defaults to the checkpoint's eval config."""
    from akod_ray.config import SAMPLERS, SAMPLING_GRIDS

    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm, ddim, diffusers' dpmpp_2m | unipc | euler | heun, or adaptive (default: eval.sampler)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="network evaluations per image (default: eval.sampler_steps; ddpm always takes T)")
    p.add_argument("--grid", choices=SAMPLING_GRIDS, default=None,
                   help="sampling grid: common (uniform in log-SNR, every arm alike) or own (the training schedule) "
                        "(default: eval.sampling_grid)")
    p.add_argument("--eta", type=_eta, default=None, help="DDIM eta in [0, 1] (default: eval.ddim_eta)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="akod", description="Adaptive Kernel Optimized Diffusion on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one arm with Ray Train (DDP workers)")
    _config_args(p)

    p = sub.add_parser("sweep", help="run a Ray Tune sweep of fixed schedules against AKOD")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep (finished trials are kept)")

    p = sub.add_parser("sample", help="sample a PNG grid from a checkpoint's EMA weights")
    p.add_argument("checkpoint", help="checkpoint folder (checkpoint_XXXXXXXX) or a run folder (its latest)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=_int_in(1, 65_536), default=64, help="number of images")
    _sampling_args(p)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--schedule", help="schedule file (e.g. a learned schedule.json) instead of the checkpoint's")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("export", help="write a checkpoint's EMA model as a diffusers pipeline (safetensors, JSON)")
    p.add_argument("checkpoint", help="checkpoint folder (checkpoint_XXXXXXXX) or a run folder (its latest)")
    p.add_argument("--out", required=True, help="folder to write (new, or an earlier export, which is replaced)")

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
    p.add_argument("--n", type=_int_in(2, 100_000), default=10_000, help="number of samples")
    _sampling_args(p)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--inception-weights", help="path to pt_inception-2015-12-05-6726825d.pth (air-gapped clusters)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("report", help="write a Markdown report with plots for a run or sweep folder")
    p.add_argument("path", help="run folder or sweep folder")
    p.add_argument("--out", help="report file (default: PATH/report.md)")
    return parser


def _load(args):
    from akod_ray.config import load_config

    from akod_ray.storage import local_folder

    cfg = load_config(args.config, args.overrides)
    args.log_dir = local_folder(cfg.run_dir)  # where a failure's traceback is kept, once the folder exists
    return cfg


def _console(args, log: Path, runs_dir: Path | None = None):
    """Ray's forwarded lines go to ``log``, akod's own to the console; all of them with --verbose."""
    if args.verbose:
        return contextlib.nullcontext()
    from akod_ray.console import RayConsole

    return RayConsole(log, runs_dir)


@contextlib.contextmanager
def _ray_session(args, log: Path, runs_dir: Path | None = None):
    """:func:`_console`, and Ray shut down before it closes when this command started Ray: Ray prints the
    lines it held back as repeats ("[repeated 2x across cluster]", a failing controller's traceback among
    them) when it disconnects, and those belong in ``log`` with the rest, not after akod's one-line error."""
    import ray

    with _console(args, log, runs_dir):
        started_here = not ray.is_initialized()
        try:
            yield
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()


def start_ray(cfg) -> None:
    """Start or join Ray; a failure to start is one line naming the cause, not Ray's traceback."""
    from akod_ray.training import trainer

    try:
        trainer.ensure_ray(cfg)
    except (AkodError, AssertionError):  # a user error, or a bug: not Ray failing to start
        raise
    except Exception as e:
        raise AkodError(f"Ray did not start: {one_line(e)}") from None


def cmd_train(args) -> int:
    from akod_ray.config import dump_config

    cfg = _load(args)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    from akod_ray.evaluation.fid_run import prepare_inception_reference
    from akod_ray.preflight import preflight_train
    from akod_ray.run import train
    from akod_ray.training.trainer import data_dir_for

    preflight_train(cfg, args.data_dir)
    cfg = prepare_inception_reference(cfg, data_dir_for(cfg, args.data_dir), cfg.run_dir)
    with _ray_session(args, args.log_dir / "ray.log"):
        start_ray(cfg)
        last = train(cfg, args.data_dir)
    print(f"[akod] run finished: {cfg.run_dir.resolve()}  (step {last.get('step')}, ref_loss {last.get('ref_loss')})")
    return 0


def cmd_sweep(args) -> int:
    from akod_ray.config import dump_config

    from akod_ray.storage import local_folder

    cfg = _load(args)
    args.log_dir = local_folder(cfg.sweep_dir)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    from akod_ray.preflight import preflight_sweep
    from akod_ray.sweep.tuner import run_sweep

    preflight_sweep(cfg, args.data_dir)
    with _ray_session(args, args.log_dir / "ray.log", cfg.sweep_dir / "runs"):
        out = run_sweep(args.config, args.overrides, args.data_dir, resume=args.resume, start_ray=start_ray,
                        verbose=args.verbose)
    print(f"[akod] sweep finished; report: {out}")
    return 0


def check_device(text: str):
    """--device: cpu, cuda, cuda:N or mps, and present on this machine."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise AkodError(f"--device {text[:40]!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (device.index or 0) >= n:
            raise AkodError(f"--device {text!r}: this machine has {n} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise AkodError(f"--device {text!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise AkodError(f"--device {text!r}: only cpu, cuda[:N] and mps are supported")
    return device


def cmd_sample(args) -> int:
    from akod_ray.evaluation.sampling import describe_sampling, sample_checkpoint
    from akod_ray.preflight import check_output_file
    from akod_ray.reporting.grids import save_grid

    device = check_device(args.device)
    out = check_output_file(args.out, "--out")
    images, record = sample_checkpoint(_checkpoint_path(args.checkpoint), args.n, args.seed, device,
                                       sampler=args.sampler, steps=args.steps, eta=args.eta, grid=args.grid,
                                       schedule=args.schedule)
    nrow = max(1, int(round(args.n**0.5)))
    try:
        out = save_grid(images, out, nrow)
    except OSError as e:
        raise AkodError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None
    print(f"[akod] wrote {args.n} samples ({describe_sampling(record)}) to {out}")
    return 0


def cmd_export(args) -> int:
    from akod_ray.export import export_checkpoint

    out = export_checkpoint(_checkpoint_path(args.checkpoint), args.out)
    print(f"[akod] wrote a diffusers pipeline to {out}: AKODPipeline.from_pretrained({str(out)!r}) "
          "(from akod_ray.pipeline import AKODPipeline)")
    return 0


def cmd_data(args) -> int:
    from akod_ray.data.prepare import prepare_cifar10
    from akod_ray.preflight import check_writable_folder

    check_writable_folder(args.out, "--out")
    try:
        out = prepare_cifar10(args.out)
    except (OSError, RuntimeError) as e:  # no network, a refused or corrupt download, a full disk
        raise AkodError(f"cannot download CIFAR-10 into {args.out!r}: {one_line(e)}") from None
    print(f"[akod] wrote {out / 'train.parquet'} and {out / 'test.parquet'}")
    return 0


def cmd_fid(args) -> int:
    from akod_ray.evaluation import fid
    from akod_ray.preflight import check_output_file

    weights = args.inception_weights if args.feature == "inception" else None
    device = check_device(args.device)
    if args.checkpoint == "stats":
        from akod_ray.config import load_config
        from akod_ray.training.trainer import data_dir_for

        if not args.out:
            raise AkodError("akod fid stats needs --out FILE.npz")
        check_output_file(args.out, "--out")
        data_dir = data_dir_for(load_config(None), args.data_dir)
        stats = fid.compute_reference_stats(data_dir, args.out, feature=args.feature, weights=weights, device=device)
        print(f"[akod] wrote {args.out}: N = {stats.n}, {stats.source}; {stats.implementation}")
        return 0
    if not args.checkpoint or not args.ref:
        raise AkodError("akod fid needs a CHECKPOINT and --ref STATS.npz (or 'akod fid stats --out FILE.npz')")
    result = fid.fid_from_checkpoint(_checkpoint_path(args.checkpoint), args.ref, n=args.n, seed=args.seed,
                                     sampler=args.sampler, steps=args.steps, eta=args.eta, weights=weights,
                                     device=device, grid=args.grid)
    print(f"[akod] {result}")
    return 0


def _checkpoint_path(text: str):
    """A checkpoint folder as given, or the latest checkpoint of a run folder (either may be in an object store)."""
    from akod_ray.training.checkpoint import resolve_checkpoint

    return resolve_checkpoint(text)


def cmd_report(args) -> int:
    from akod_ray.preflight import check_output_file, check_writable_folder
    from akod_ray.reporting.report import write_report
    from akod_ray.storage import check_reachable, is_remote, location

    check_reachable(args.path, "report folder")
    if args.out and location(args.out).suffix == ".md":
        if is_remote(args.out):
            check_writable_folder(location(args.out).parent, "--out")
        else:
            check_output_file(args.out, "--out")
    else:
        check_writable_folder(args.out or args.path, "--out" if args.out else "report folder")
    out = write_report(args.path, args.out)
    print(f"[akod] report: {out}")
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "sample": cmd_sample, "export": cmd_export, "data": cmd_data,
            "fid": cmd_fid, "report": cmd_report}


def keep_traceback(e: BaseException, folder: Path | None) -> Path:
    """Write the full traceback to ``folder/error.log`` (the run folder, when it exists) or a temp file."""
    text = "".join(traceback.format_exception(e))
    if folder is not None and Path(folder).is_dir():
        path = Path(folder) / "error.log"
        path.write_text(text)
        return path
    fd, name = tempfile.mkstemp(prefix="akod-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)


def report_error(message: str) -> None:
    print("akod: error: " + " ".join(message.split()), file=sys.stderr)


# The environment of a run without --verbose (the console shows akod's own lines, ray.log keeps the rest):
# Ray's own logger at error level, and no deduplication of forwarded lines: Ray counts two lines that differ
# only in their numbers as repeats, so the progress line of one of two concurrent trials was shown as
# "[repeated 2x across cluster]" on the other's, and held-back lines came out when Ray disconnected.
QUIET_RAY = {"RAY_LOGGER_LEVEL": "error", "RAY_DEDUP_LOGS": "0"}


def main(argv: list[str] | None = None) -> int:
    # Run folders (and what Ray writes into them from this process's children) get no group or world
    # write permission: who may write there decides what a resume reads (docs/cluster.md).
    umask = os.umask(0o022)
    os.umask(umask | 0o022)
    saved_env = {name: os.environ.get(name) for name in QUIET_RAY}
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad argument (2, one line already printed)
            return e.code if isinstance(e.code, int) else 2
        if not getattr(args, "verbose", True):
            for name, value in QUIET_RAY.items():  # read when ray is first imported; inherited by the Ray processes
                os.environ.setdefault(name, value)
        try:
            return COMMANDS[args.command](args)
        except AkodError as e:
            report_error(str(e))
            return 2
        except KeyboardInterrupt:
            print("akod: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # a bug, or a failure inside Ray that is not the user's input
            cause = root_cause(e)
            if isinstance(cause, AkodError):  # a user error raised inside a Ray worker or trial
                report_error(str(cause))
                return 2
            try:
                log = f"full traceback in {keep_traceback(e, getattr(args, 'log_dir', None))}"
            except OSError:
                log = "the traceback could not be saved"
            report_error(f"{type(cause).__name__}: {one_line(cause)} ({log})")
            return 1
    finally:
        os.umask(umask)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)


if __name__ == "__main__":
    sys.exit(main())
