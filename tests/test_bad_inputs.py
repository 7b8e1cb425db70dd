"""Every bad input gets one clear line: exit status 2, one line on stderr naming the field or file,
no traceback, nothing half-written (issue 12).

Distinct bad inputs across config values (--set), config files, --set syntax, data files, schedule
files, checkpoints, FID statistics and every subcommand's arguments. Each runs the CLI in-process
(``akod_ray.cli.main``) with Ray replaced by a tripwire, so every error must come before Ray
starts; the few cases that need a real Ray are marked slow and run `akod` as a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from akod_ray.cli import main
from akod_ray.data.parquet import write_parquet
from akod_ray.errors import CheckpointError
from akod_ray.training.checkpoint import STATE_FILE
from checkpoint_helpers import T as CKPT_T
from checkpoint_helpers import checkpoint_state, make_checkpoint, tiny_config
from ray_helpers import REPO, akod_cmd, akod_env

pytestmark = pytest.mark.usefixtures("torch_single_thread_module")

# A tiny, valid base: every case below changes one thing (or two that only fail together).
BASE = {
    "run": {"name": "bad", "num_cpus": 2, "dashboard": False},
    "diffusion": {"T": 100, "schedule": "cosine"},
    "model": {"channels": [8, 8, 8, 8], "bottleneck_channels": 8, "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.0, "msfi": False, "beta_modulation": False},
    "dko": {"bins": 8, "probe_pool": 16, "prior": "loglinear"},
    "data": {"source": "procedural", "train_subset": 64, "val_size": 8},
    "train": {"steps": 4, "batch_size": 8, "num_workers": 1, "cpus_per_worker": 1, "log_every": 2, "ckpt_every": 2,
              "sample_every": 4, "val_batch": 8, "ref_grid": 2},
    "rl": {"segment_steps": 2, "train_batch": 2, "decision_every": 1, "decision_images": 4},
    "eval": {"sampler_steps": 5, "grid_size": 2, "fid_samples": 8},
    "sweep": {"name": "badsweep", "arms": ["cosine"], "budget": 6400},
}


@pytest.fixture(scope="module")
def base_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command gets as far as starting Ray."""
    import akod_ray.training.trainer as trainer

    def tripwire(cfg):
        raise AssertionError("the error was not raised before Ray started")

    monkeypatch.setattr(trainer, "ensure_ray", tripwire)


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).exists() else []


def assert_one_line(capsys, argv: list[str], pattern: str, prog: str = "akod") -> str:
    """Run the CLI; exit status 2, exactly one line on stderr matching ``<prog>: error: <pattern>``, no traceback."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert re.fullmatch(f"{re.escape(prog)}: error: {pattern}", lines[0]), f"{lines[0]!r} !~ {pattern!r}"
    assert "Traceback" not in err and out == ""
    return lines[0]


# --------------------------------------------------------------------------- config values (--set)

_LIMIT = r"must be <= [\d,.]+"
CONFIG_CASES = [
    # diffusion
    (["diffusion.T=1"], r"diffusion\.T must be >= 2, got 1"),
    (["diffusion.T=-5"], r"diffusion\.T must be >= 2, got -5"),
    (["diffusion.T=1000000000"], r"diffusion\.T must be <= 100,000 \(a memory-sized limit: .*\), got 1000000000"),
    (["diffusion.T=" + "9" * 30], r"diffusion\.T must be <= 100,000 .*, got 9{30}"),
    (["diffusion.T=1e30"], r"diffusion\.T must be an integer, got '1e30'"),
    (["diffusion.T=1.5"], r"diffusion\.T must be an integer, got 1\.5"),
    (["diffusion.T=true"], r"diffusion\.T must be an integer, got True"),
    (["diffusion.T=[100]"], r"diffusion\.T must be an integer, got \[100\]"),
    (["diffusion.schedule=quadratic"], r"diffusion\.schedule must be one of \(.*'loglinear'.*\), got 'quadratic'"),
    (["diffusion.schedule=LINEAR"], r"diffusion\.schedule must be one of .*, got 'LINEAR'"),
    (["diffusion.schedule=file"], r"diffusion\.schedule_file must be set when diffusion\.schedule=file, got None"),
    (["diffusion.schedule=linear", "diffusion.T=20"], r"diffusion\.T must be >= 21 for the linear schedule, got 20"),
    (["diffusion.min_snr_gamma=0"], r"diffusion\.min_snr_gamma must be > 0 or null, got 0\.0"),
    (["diffusion.min_snr_gamma=-1"], r"diffusion\.min_snr_gamma must be > 0 or null, got -1\.0"),
    (["diffusion.min_snr_gamma=.inf"], r"diffusion\.min_snr_gamma must be a finite number, got inf"),
    (["diffusion.min_snr_gamma=.nan"], r"diffusion\.min_snr_gamma must be a finite number, got nan"),
    (["diffusion.min_snr_gamma=nan"], r"diffusion\.min_snr_gamma must be a finite number, got nan"),
    (['diffusion.schedule_file="a\\0b.json"'], r"diffusion\.schedule_file must not contain control characters, got 'a\\x00b\.json'"),
    # model
    (["model.channels=[0,8,8,8]"], r"model\.channels must all be positive, got \(0, 8, 8, 8\)"),
    (["model.channels=[8,8,8]"], r"model\.channels must list 4 widths \(four down/up blocks\), got \(8, 8, 8\)"),
    (["model.channels=[12,8,8,8]"], r"model\.channels must all be multiples of 8 \(GroupNorm groups\), got \(12, 8, 8, 8\)"),
    (["model.channels=[8,8,8,1000000]"], r"model\.channels must all be <= 4096 \(a memory-sized limit\), got .*"),
    (["model.channels=8"], r"model\.channels must be a list, got 8"),
    (["model.channels=[a,b,c,d]"], r"model\.channels must be an integer, got 'a'"),
    (["model.bottleneck_channels=0"], r"model\.bottleneck_channels must be a positive multiple of 8, got 0"),
    (["model.bottleneck_channels=12"], r"model\.bottleneck_channels must be a positive multiple of 8, got 12"),
    (["model.bottleneck_channels=1048576"], r"model\.bottleneck_channels must be <= 4,096 \(a memory-sized limit\), got 1048576"),
    (["model.num_res_blocks=0"], r"model\.num_res_blocks must be >= 1, got 0"),
    (["model.num_res_blocks=100"], r"model\.num_res_blocks must be <= 16 \(a memory-sized limit\), got 100"),
    (["model.attention_resolutions=[3]"], r"model\.attention_resolutions must be feature-map sizes from \(32, 16, 8, 4\), got \(3,\)"),
    (["model.attention_resolutions=[64]"], r"model\.attention_resolutions must be feature-map sizes from .*, got \(64,\)"),
    (["model.dropout=1.0"], r"model\.dropout must be in \[0, 1\), got 1\.0"),
    (["model.dropout=-0.1"], r"model\.dropout must be in \[0, 1\), got -0\.1"),
    (["model.dropout=.nan"], r"model\.dropout must be a finite number, got nan"),
    (["model.msfi=1"], r"model\.msfi must be true or false, got 1"),
    (["model.msfi=maybe"], r"model\.msfi must be true or false, got 'maybe'"),
    (["model.msfi_ffn_mult=0"], r"model\.msfi_ffn_mult must be >= 1, got 0"),
    (["model.msfi_ffn_mult=100000"], r"model\.msfi_ffn_mult must be <= 16,384 \(.*\), got 800000"),
    (["model.widths=[1]"], r"unknown config key 'model\.widths'; allowed: \[.*'channels'.*\]"),
    # dko
    (["dko.kernel_size=4"], r"dko\.kernel_size must be odd and >= 3, got 4"),
    (["dko.kernel_size=1"], r"dko\.kernel_size must be odd and >= 3, got 1"),
    (["dko.kernel_size=33"], r"dko\.kernel_size must not exceed the image size 32, got 33"),
    (["dko.kernel_size=101"], r"dko\.kernel_size must not exceed the image size 32, got 101"),
    (["dko.bins=1"], r"dko\.bins must be in \[2, 1000\], got 1"),
    (["dko.bins=5000"], r"dko\.bins must be in \[2, 1000\], got 5000"),
    (["diffusion.schedule=akod", "dko.bins=200"], r"dko\.bins must be <= diffusion\.T=100 \(a bin holds whole steps\), got 200"),
    (["dko.floor=0"], r"dko\.floor must be in \(0, 1\], got 0\.0"),
    (["dko.floor=1.5"], r"dko\.floor must be in \(0, 1\], got 1\.5"),
    (["dko.floor=.nan"], r"dko\.floor must be a finite number, got nan"),
    (["diffusion.T=1000", "diffusion.schedule=akod", "dko.prior=laplace", "dko.bins=32", "dko.floor=0.05"],
     r"dko\.floor is too small for dko\.bins=32 of the laplace prior at diffusion\.T=1000: with bin 31 of 32 at its "
     r"floor the exported schedule is invalid .*; raise dko\.floor, got 0\.05"),
    (["dko.prior=cosine"], r"dko\.prior must be one of \('loglinear', 'edm', 'laplace'\), got 'cosine'"),
    (["diffusion.schedule=akod", "dko.prior=laplace"],
     r"dko\.prior 'laplace' is not a valid schedule at diffusion\.T=100 within \[dko\.logsnr_min, dko\.logsnr_max\]: "
     r"laplace schedule \(scale 0\.75\): beta_t must lie in \(0, 0\.999\], got beta\[99\] = 0\.99921.*"),
    (["dko.hidden=[]"], r"dko\.hidden must be positive widths, got \(\)"),
    (["dko.hidden=[0]"], r"dko\.hidden must be positive widths, got \(0,\)"),
    (["dko.hidden=[100000]"], r"dko\.hidden must be at most 16 widths of at most 4096 \(a memory-sized limit\), got \(100000,\)"),
    (["dko.logsnr_max=-20"], r"dko\.logsnr_max must exceed dko\.logsnr_min, got -20\.0"),
    (["dko.logsnr_max=40"], r"dko\.logsnr_max and dko\.logsnr_min must lie in \[-20, 20\] .*, got 40\.0"),
    (["dko.logsnr_min=-.inf"], r"dko\.logsnr_min must be a finite number, got -inf"),
    (["dko.num_knots=16"], r"unknown config key 'dko\.num_knots'; allowed: \[.*'bins'.*\]"),
    (["dko.probe_pool=0"], r"dko\.probe_pool must be >= 1, got 0"),
    (["dko.probe_pool=10000000"], r"dko\.probe_pool must be <= 100,000 \(.*\), got 10000000"),
    # data
    (["data.source=imagenet"], r"data\.source must be one of \('cifar10', 'procedural'\), got 'imagenet'"),
    (["data.train_subset=0"], r"data\.train_subset must be >= 1 or null, got 0"),
    (["data.train_subset=100000000000"], rf"data\.train_subset {_LIMIT} \(.*\), got 100000000000"),
    (["data.train_subset=500000"], r"data\.train_subset must be <= 200,000 \(procedural images are generated one by one\), got 500000"),
    (["data.val_size=0"], r"data\.val_size must be >= 1, got 0"),
    (["data.val_size=10000000"], r"data\.val_size must be <= 100,000 \(.*\), got 10000000"),
    (["data.seed=-1"], r"data\.seed must be in \[0, 2147483647\], got -1"),
    (["data.seed=99999999999"], r"data\.seed must be in \[0, 2147483647\], got 99999999999"),
    (['data.data_dir="x\\ty"'], r"data\.data_dir must not contain control characters, got 'x\\ty'"),
    (["data.train_subset=4"], r"train\.batch_size must be <= data\.train_subset=4 \(one batch of training images\), got 8"),
    (["data.train_subset=null", "train.batch_size=8192"],
     r"train\.batch_size must be <= the procedural dataset's default size=4096 .*, got 8192"),
    # train
    (["train.steps=0"], r"train\.steps must be >= 1, got 0"),
    (["train.steps=abc"], r"train\.steps must be an integer, got 'abc'"),
    (["train.steps=2.5"], r"train\.steps must be an integer, got 2\.5"),
    (["train.steps=10000000000"], r"train\.steps must be <= 1,000,000,000, got 10000000000"),
    (["train.batch_size=0"], r"train\.batch_size must be >= 1, got 0"),
    (["train.batch_size=100000"], r"train\.batch_size must be <= 65,536 \(a memory-sized limit\), got 100000"),
    (["train.batch_size=7", "train.num_workers=2"], r"train\.batch_size must be divisible by train\.num_workers \* train\.grad_accum = 2, got 7"),
    (["train.grad_accum=0"], r"train\.grad_accum must be >= 1, got 0"),
    (["train.grad_accum=3"], r"train\.batch_size must be divisible by .* = 3, got 8"),
    (["train.lr=0"], r"train\.lr must be > 0, got 0\.0"),
    (["train.lr=-1e-3"], r"train\.lr must be > 0, got -0\.001"),
    (["train.lr=.inf"], r"train\.lr must be a finite number, got inf"),
    (["train.lr=inf"], r"train\.lr must be a finite number, got inf"),
    (["train.lr=1e400"], r"train\.lr must be a finite number, got inf"),
    (["train.lr=fast"], r"train\.lr must be a number, got 'fast'"),
    (["train.weight_decay=-1"], r"train\.weight_decay must be >= 0, got -1\.0"),
    (["train.weight_decay=.nan"], r"train\.weight_decay must be a finite number, got nan"),
    (["train.warmup_steps=-1"], r"train\.warmup_steps must be >= 0, got -1"),
    (["train.grad_clip=-1"], r"train\.grad_clip must be >= 0, got -1\.0"),
    (["train.grad_clip=.inf"], r"train\.grad_clip must be a finite number, got inf"),
    (["train.ema_decay=1.0"], r"train\.ema_decay must be in \[0, 1\), got 1\.0"),
    (["train.ema_decay=-0.5"], r"train\.ema_decay must be in \[0, 1\), got -0\.5"),
    (["train.num_workers=0"], r"train\.num_workers must be >= 1, got 0"),
    (["train.num_workers=5000"], r"train\.num_workers must be <= 1,024, got 5000"),
    (["train.cpus_per_worker=0"], r"train\.cpus_per_worker must be >= 1, got 0"),
    (["train.log_every=0"], r"train\.log_every must be >= 1, got 0"),
    (["train.ckpt_every=0"], r"train\.ckpt_every must be >= 1, got 0"),
    (["train.sample_every=0"], r"train\.sample_every must be >= 1, got 0"),
    (["train.num_to_keep=0"], r"train\.num_to_keep must be >= 1, got 0"),
    (["train.max_failures=-2"], r"train\.max_failures must be >= -1, got -2"),
    (["train.max_wall_s=0"], r"train\.max_wall_s must be > 0 or null, got 0\.0"),
    (["train.max_wall_s=.inf"], r"train\.max_wall_s must be a finite number, got inf"),
    (["train.budget_clock=gpu"], r"train\.budget_clock must be one of \('wall', 'cpu'\), got 'gpu'"),
    (["train.val_batch=0"], r"train\.val_batch must be >= 1, got 0"),
    (["train.ref_grid=0"], r"train\.ref_grid must be >= 1, got 0"),
    (["train.seed=-1"], r"train\.seed must be in \[0, 2147483647\], got -1"),
    (["train.seed=4294967296"], r"train\.seed must be in \[0, 2147483647\], got 4294967296"),
    (["train.bf16=2"], r"train\.bf16 must be true or false, got 2"),
    (["train.stepz=3"], r"unknown config key 'train\.stepz'; allowed: \[.*\]"),
    (["train.num_workers=2", "train.cpus_per_worker=2"],
     r"train\.num_workers \* train\.cpus_per_worker = 4 CPUs must fit the local Ray's run\.num_cpus=2 \(.*\)"),
    # rl
    (["rl.segment_steps=0"], r"rl\.segment_steps must be >= 1, got 0"),
    (["rl.reward=fid"], r"rl\.reward must be one of \(.*\), got 'fid'"),
    (["rl.reward=improvement"], r"rl\.reward must be one of \('credit', 'paper'\), got 'improvement'"),
    (["rl.null_reward=zero"], r"rl\.null_reward must be one of \('none', 'shuffle', 'constant'\), got 'zero'"),
    (["rl.decision_every=0"], r"rl\.decision_every must be >= 1, got 0"),
    (["rl.decision_images=0"], r"rl\.decision_images must be >= 1, got 0"),
    (["diffusion.schedule=akod", "rl.decision_images=9"],
     r"rl\.decision_images must be <= 8, the images of one micro-batch of a worker .*, got 9"),
    (["rl.probe_pairs=0"], r"rl\.probe_pairs must be >= 1, got 0"),
    (["rl.kl_coeff=-1"], r"rl\.kl_coeff must be >= 0, got -1\.0"),
    (["rl.fd_rel=0"], r"rl\.fd_rel must be in \(0, 0\.1\], got 0\.0"),
    (["rl.frozen=maybe"], r"rl\.frozen must be true or false, got 'maybe'"),
    (["rl.branches=2"], r"unknown config key 'rl\.branches'; allowed: \[.*\]"),
    (["rl.train_batch=0"], r"rl\.train_batch must be >= 1, got 0"),
    (["rl.minibatch_size=0"], r"rl\.minibatch_size must be >= 1, got 0"),
    (["rl.num_epochs=0"], r"rl\.num_epochs must be >= 1, got 0"),
    (["rl.lr=0"], r"rl\.lr must be > 0, got 0\.0"),
    (["rl.lr=.nan"], r"rl\.lr must be a finite number, got nan"),
    (["rl.broker_timeout_s=0"], r"rl\.broker_timeout_s must be > 0, got 0\.0"),
    (["rl.broker_timeout_s=.inf"], r"rl\.broker_timeout_s must be a finite number, got inf"),
    (["diffusion.schedule=akod", "rl.segment_steps=3"],
     r"train\.ckpt_every must be a multiple of rl\.segment_steps=3 for the akod schedule .*, got 2"),
    (["diffusion.adaptation=bandit"], r"diffusion\.adaptation must be one of \('none', 'importance', 'edm2'\), got 'bandit'"),
    (["diffusion.schedule=akod", "diffusion.adaptation=importance"],
     r"diffusion\.adaptation must be none with diffusion\.schedule=akod .*, got 'importance'"),
    (["diffusion.adaptation=edm2", "diffusion.min_snr_gamma=5"],
     r"diffusion\.adaptation must be none with diffusion\.min_snr_gamma .*, got 'edm2'"),
    (["diffusion.adaptation_bins=1"], r"diffusion\.adaptation_bins must be in \[2, diffusion\.T=100\], got 1"),
    (["diffusion.adaptation_decay=0"], r"diffusion\.adaptation_decay must be in \(0, 1\], got 0\.0"),
    (["diffusion.adaptation_floor=2"], r"diffusion\.adaptation_floor must be in \(0, 1\], got 2\.0"),
    (["model.noise_cond=steps"], r"model\.noise_cond must be one of \('level', 'schedule'\), got 'steps'"),
    (["model.level_offset=0"], r"model\.level_offset must be in \(0, 5\], got 0\.0"),
    # eval
    (["eval.sampler=lms"],
     r"eval\.sampler must be one of \('ddpm', 'ddim', 'dpmpp_2m', 'unipc', 'euler', 'heun', 'adaptive'\), got 'lms'"),
    (["eval.sampler_steps=0"], r"eval\.sampler_steps must be >= 1, got 0"),
    (["eval.sampler_steps=1000"], r"eval\.sampler_steps must be <= diffusion\.T=100 \(a sampler visits at most the T steps of its grid\), got 1000"),
    (["eval.sampler=heun", "eval.sampler_steps=2"],
     r"eval\.sampler_steps must be >= 3 for heun \(N steps take 2N - 1 network evaluations: N - 1 Heun steps and a last "
     r"Euler step\), got 2"),
    (["eval.sampler=dpmpp_2m", "eval.sampler_steps=100"],
     r"eval\.sampler_steps must be <= T - 1 = 99 for dpmpp_2m \(N steps span N \+ 1 distinct grid steps, the last "
     r"replaced by the clean image\), got 100"),
    (["eval.ddim_eta=1.5"], r"eval\.ddim_eta must be in \[0, 1\], got 1\.5"),
    (["eval.ddim_eta=.nan"], r"eval\.ddim_eta must be a finite number, got nan"),
    (["eval.fid_every=-1"], r"eval\.fid_every must be >= 0, got -1"),
    (["eval.fid_samples=1"], r"eval\.fid_samples must be >= 2, got 1"),
    (["eval.fid=fid"], r"eval\.fid must be one of \('c10', 'inception', 'both'\), got 'fid'"),
    (["eval.inception_ref=''"], r"eval\.inception_ref must be a path to an \.npz or null, got ''"),
    (["eval.fid_samples=100000000"], r"eval\.fid_samples must be <= 100,000 \(samples held in memory\), got 100000000"),
    (["eval.fid_samples=2", "train.num_workers=4", "run.num_cpus=4"],
     r"eval\.fid_samples must be >= train\.num_workers=4 \(every worker samples its share\), got 2"),
    (["eval.grid_size=0"], r"eval\.grid_size must be >= 1, got 0"),
    (["eval.grid_size=1000"], r"eval\.grid_size must be <= 64 \(grid_size\*\*2 samples\), got 1000"),
    (["eval.target_fid=.inf"], r"eval\.target_fid must be a finite number, got inf"),
    (["eval.target_ref_loss=-1"], r"eval\.target_ref_loss must be >= 0 or null, got -1\.0"),
    # run
    (["run.name=.."], r"run\.name must not be '\.' or '\.\.' \(it would name run\.root or its parent\), got '\.\.'"),
    (["run.name=."], r"run\.name must not be '\.' or '\.\.' .*, got '\.'"),
    (["run.name=a/b"], r"run\.name must be a name without '/' or '\\' \(one folder, not a path\), got 'a/b'"),
    (["run.name=a\\b"], r"run\.name must be a name without '/' or '\\' .*, got 'a\\\\b'"),
    (['run.name="a\\0b"'], r"run\.name must not contain control characters, got 'a\\x00b'"),
    (['run.name="two\\nlines"'], r"run\.name must not contain control characters, got 'two\\nlines'"),
    (["run.name=''"], r"run\.name must be a non-empty name of at most 200 characters, got ''"),
    (["run.name=[1]"], r"run\.name must be a string, got \[1\]"),
    (["run.name=" + "x" * 300], r"run\.name must be a non-empty name of at most 200 characters, got 'x+\.\.\.x+'"),
    (['run.root="r\\0"'], r"run\.root must not contain control characters, got 'r\\x00'"),
    (["run.num_cpus=0"], r"run\.num_cpus must be >= 1 or null, got 0"),
    (["run.dashboard=maybe"], r"run\.dashboard must be true or false, got 'maybe'"),
    (['run.ray_address="h\\x07:1"'], r"run\.ray_address must not contain control characters, got 'h\\x07:1'"),
]


def _case_id(case) -> str:
    return " ".join(case[0])[:60]


@pytest.mark.parametrize("sets, pattern", CONFIG_CASES, ids=[_case_id(c) for c in CONFIG_CASES])
def test_bad_config_value(capsys, no_ray, tmp_path, base_yaml, sets, pattern):
    root = tmp_path / "root"
    argv = ["train", base_yaml, "--set", f"run.root={root}"] + [a for s in sets for a in ("--set", s)]
    assert_one_line(capsys, argv, pattern)
    assert everything_under(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_workers_without_a_gpu(capsys, no_ray, tmp_path, base_yaml):
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={tmp_path}", "--set", "train.use_gpu=true"],
                    r"train\.num_workers must be <= the 0 GPU\(s\) of this machine with train\.use_gpu=true .*, got 1")


SWEEP_CASES = [
    (["sweep.name=.."], r"sweep\.name must not be '\.' or '\.\.' .*, got '\.\.'"),
    (["sweep.name=a/b"], r"sweep\.name must be a name without '/' or '\\' .*, got 'a/b'"),
    (["sweep.arms=[]"], r"sweep\.arms must list at least one arm, got \(\)"),
    (["sweep.arms=[linear]"], r"sweep\.arms must be from \('baseline', .*\), got \('linear',\)"),
    (["sweep.arms=[cosine,cosine]"], r"sweep\.arms must not repeat an arm, got \('cosine', 'cosine'\)"),
    (["sweep.kernel_sizes=[4]"], r"sweep\.kernel_sizes must be odd and >= 3, got \(4,\)"),
    (["sweep.kernel_sizes=[35]"], r"sweep\.kernel_sizes must not exceed the image size 32, got \(35,\)"),
    (["sweep.kernel_sizes=[7,7]"], r"sweep\.kernel_sizes must not repeat a value, got \(7, 7\)"),
    (["sweep.seeds=[]"], r"sweep\.kernel_sizes and sweep\.seeds must be non-empty, got \(7,\)"),
    (["sweep.seeds=[-1]"], r"sweep\.seeds must be in \[0, 2147483647\], got \(-1,\)"),
    (["sweep.min_snr_gamma=0"], r"sweep\.min_snr_gamma must be > 0, got 0\.0"),
    (["sweep.budget_kind=epochs"], r"sweep\.budget_kind must be one of \('images', 'seconds'\), got 'epochs'"),
    (["sweep.budget=0"], r"sweep\.budget must be > 0, got 0\.0"),
    (["sweep.budget=.inf"], r"sweep\.budget must be a finite number, got inf"),
    (["sweep.budget=4"], r"sweep\.budget must be >= train\.batch_size=8 images \(one optimizer step\) .*, got 4\.0"),
    (["sweep.budget=1e30"], r"sweep\.budget must be <= 8,000,000,000 \(1,000,000,000 steps of train\.batch_size=8\), got 1e\+30"),
    (["sweep.max_concurrent_trials=0"], r"sweep\.max_concurrent_trials must be >= 1 or null, got 0"),
    (["sweep.arms=[akod]", "rl.segment_steps=3"],
     r"sweep trial akod_k7_s0: train\.ckpt_every must be a multiple of rl\.segment_steps=3 .*, got 2"),
]


@pytest.mark.parametrize("sets, pattern", SWEEP_CASES, ids=[_case_id(c) for c in SWEEP_CASES])
def test_bad_sweep_value(capsys, no_ray, tmp_path, base_yaml, sets, pattern):
    argv = ["sweep", base_yaml, "--set", f"run.root={tmp_path}"] + [a for s in sets for a in ("--set", s)]
    assert_one_line(capsys, argv, pattern)
    assert everything_under(tmp_path) == []


# --------------------------------------------------------------------------- config files and --set syntax


def _nested(depth: int) -> str:
    return "train: " + "[" * depth + "]" * depth + "\n"


FILE_CASES = [
    ("not_utf8", b"train:\n  steps: \xff\xfe\n", r"config file '{p}' is not UTF-8 text \(byte 16\)"),
    ("unclosed", b"train: [unclosed\n", r"config file '{p}' is not valid YAML: .* at line 2, column 1"),
    ("deep_list", _nested(5000).encode(), r"config file '{p}' is not valid YAML: nested too deeply"),
    ("deep_map", ("a: {" * 3000 + "}" * 3000).encode(), r"config file '{p}' is not valid YAML: nested too deeply"),
    ("duplicate_section", b"train:\n  steps: 1\ntrain:\n  steps: 2\n",
     r"config file '{p}' is not valid YAML: duplicate key 'train' at line 3, column 1"),
    ("duplicate_field", b"train:\n  steps: 1\n  steps: 2\n",
     r"config file '{p}' is not valid YAML: duplicate key 'steps' at line 3, column 3"),
    ("a_list", b"- 1\n- 2\n", r"config file '{p}' must hold a mapping of sections"),
    ("a_scalar", b"3\n", r"config file '{p}' must hold a mapping of sections"),
    ("section_scalar", b"train: 3\n", r"train must be a mapping, got 3"),
    ("python_tag", b"train: !!python/object/apply:os.system ['echo hi']\n",
     r"config file '{p}' is not valid YAML: could not determine a constructor for the tag .* at line 1, column 8"),
    ("too_large", b"# " + b"x" * (1 << 20) + b"\n", r"config file '{p}' is 1,048,579 bytes; a config holds at most 1,048,576"),
    ("unknown_section", b"modle:\n  channels: [8, 8, 8, 8]\n", r"unknown config key 'modle'; allowed: \[.*\]"),
    ("unknown_field", b"train:\n  stepz: 3\n", r"unknown config key 'train\.stepz'; allowed: \[.*\]"),
    ("huge_int", b"train:\n  steps: 1" + b"0" * 5000 + b"\n", r"config file '{p}' is not valid YAML: .*"),
    ("nul_byte", b"train:\n  steps: 1\x00\n", r"config file '{p}' is not valid YAML: .*special characters.*"),
    ("tab_indent", b"train:\n\tsteps: 1\n", r"config file '{p}' is not valid YAML: .* at line 2, column 1"),
]


@pytest.mark.parametrize("name, content, pattern", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(capsys, no_ray, tmp_path, name, content, pattern):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    assert_one_line(capsys, ["train", path, "--set", f"run.root={tmp_path / 'root'}"], pattern.format(p=re.escape(str(path))))
    assert not (tmp_path / "root").exists()


def test_missing_config_file(capsys, no_ray, tmp_path):
    assert_one_line(capsys, ["train", tmp_path / "nope.yaml"], rf"config file '{re.escape(str(tmp_path))}/nope\.yaml' does not exist")


def test_config_file_is_a_folder(capsys, no_ray, tmp_path):
    assert_one_line(capsys, ["sweep", tmp_path], rf"config file '{re.escape(str(tmp_path))}' is not a file")


SET_SYNTAX = [
    ("train.steps", r"--set 'train\.steps' must look like section\.field=value"),
    ("train=3", r"--set key 'train' must look like section\.field"),
    ("a.b.c=1", r"--set key 'a\.b\.c' must look like section\.field"),
    (".x=1", r"--set key '\.x' must look like section\.field"),
    ("train.steps=[unclosed", r"--set train\.steps: cannot parse value '\[unclosed': .*"),
    ("nosection.x=1", r"unknown config key 'nosection\.x': no section 'nosection'; allowed: \[.*\]"),
    ("train.steps=!!python/object/apply:os.system [ls]", r"--set train\.steps: cannot parse value .*: could not determine a constructor .*"),
    ("train.steps=" + "[" * 3000, r"--set train\.steps: cannot parse value .*: nested too deeply"),
]


@pytest.mark.parametrize("item, pattern", SET_SYNTAX, ids=[c[0][:40] for c in SET_SYNTAX])
def test_malformed_set(capsys, no_ray, tmp_path, base_yaml, item, pattern):
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={tmp_path}", "--set", item], pattern)
    assert everything_under(tmp_path) == []


def test_run_root_is_a_file(capsys, no_ray, tmp_path, base_yaml):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={blocker}"],
                    rf"run folder \(run\.root/run\.name\) '{re.escape(str(blocker))}/bad' cannot be created or written: "
                    rf"'{re.escape(str(blocker))}' is not a folder")
    assert everything_under(tmp_path) == ["file"]


def test_run_folder_is_a_file(capsys, no_ray, tmp_path, base_yaml):
    (tmp_path / "bad").write_text("x")
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={tmp_path}"],
                    rf"run folder \(run\.root/run\.name\) '{re.escape(str(tmp_path))}/bad' exists and is not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_run_root_without_write_permission(capsys, no_ray, tmp_path, base_yaml):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={locked}"],
                    rf"run folder \(run\.root/run\.name\) '.*' cannot be created or written: no write permission on '.*locked'")


# --------------------------------------------------------------------------- data files


def _png_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def data_folder(root: Path, train_rows: int = 64, test_rows: int = 16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_parquet(root / "train.parquet", _png_images(train_rows), np.arange(train_rows) % 10)
    write_parquet(root / "test.parquet", _png_images(test_rows, seed=1), np.arange(test_rows) % 10)
    return root


def _replace_images(path: Path, change) -> None:
    table = pq.read_table(path)
    blobs = table.column("image").to_pylist()
    change(blobs)
    pq.write_table(table.set_column(0, "image", pa.array(blobs, type=pa.binary())), path)


def _encoded(size: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_png_images(1, size)[0]).save(buf, format="PNG")
    return buf.getvalue()


def _truncate_train(d: Path) -> None:
    (d / "train.parquet").write_bytes(b"PAR1 not parquet" * 50)


def _empty_train(d: Path) -> None:
    (d / "train.parquet").write_bytes(b"")


def _drop_image_column(d: Path) -> None:
    pq.write_table(pq.read_table(d / "train.parquet").drop_columns(["image"]), d / "train.parquet")


def _int_images(d: Path) -> None:
    pq.write_table(pa.table({"image": pa.array(np.arange(64)), "label": pa.array(np.zeros(64, np.int8))}), d / "train.parquet")


def _string_labels(d: Path) -> None:
    t = pq.read_table(d / "test.parquet")
    pq.write_table(t.set_column(1, "label", pa.array(["cat"] * t.num_rows)), d / "test.parquet")


def _zero_rows(d: Path) -> None:
    t = pq.read_table(d / "train.parquet")
    pq.write_table(t.slice(0, 0), d / "train.parquet")


def _all_64px(d: Path) -> None:
    write_parquet(d / "train.parquet", _png_images(64, 64), np.zeros(64, np.int64))


def _one_16px(d: Path) -> None:
    _replace_images(d / "train.parquet", lambda b: b.__setitem__(5, _encoded(16)))


def _garbage_image(d: Path) -> None:
    _replace_images(d / "train.parquet", lambda b: b.__setitem__(3, b"not an image"))


def _null_image(d: Path) -> None:
    _replace_images(d / "test.parquet", lambda b: b.__setitem__(2, None))


def _no_test(d: Path) -> None:
    (d / "test.parquet").unlink()


def _no_train(d: Path) -> None:
    (d / "train.parquet").unlink()


def _train_is_folder(d: Path) -> None:
    (d / "train.parquet").unlink()
    (d / "train.parquet").mkdir()


DATA_CASES = [
    ("corrupt_train", _truncate_train, [], r"data file '{d}/train\.parquet' is not a readable Parquet file: .*"),
    ("empty_train", _empty_train, [], r"data file '{d}/train\.parquet' is not a readable Parquet file: .*"),
    ("no_image_column", _drop_image_column, [], r"data file '{d}/train\.parquet' lacks column\(s\) \['image'\]"),
    ("int_images", _int_images, [], r"data file '{d}/train\.parquet': column 'image' must hold encoded image bytes \(binary\), got int64"),
    ("string_labels", _string_labels, [], r"data file '{d}/test\.parquet': column 'label' must hold integers, got string"),
    ("zero_rows", _zero_rows, [], r"data file '{d}/train\.parquet' has no rows"),
    ("images_64px", _all_64px, [], r"{d}/train\.parquet, row \d+: image is 64x64, every image must be 32x32"),
    ("one_image_16px", _one_16px, ["data.train_subset=null"], r"{d}/train\.parquet, row 5: image is 16x16, every image must be 32x32"),
    ("undecodable_image", _garbage_image, ["data.train_subset=null"], r"{d}/train\.parquet, row 3: cannot decode image: .*"),
    ("null_image", _null_image, [], r"data file '{d}/test\.parquet': column 'image' has 1 null value\(s\)"),
    ("no_test_split", _no_test, [], r"data file '{d}/test\.parquet' does not exist"),
    ("no_train_split", _no_train, [], r"data folder '{d}' \(from --data-dir\) has no train\.parquet"),
    ("train_split_is_a_folder", _train_is_folder, [], r"data folder '{d}' \(from --data-dir\) has no train\.parquet"),
    ("subset_above_rows", None, ["data.train_subset=1000"], r"data\.train_subset must be <= the 64 rows of '{d}/train\.parquet', got 1000"),
    ("batch_above_rows", None, ["data.train_subset=null", "train.batch_size=128"],
     r"train\.batch_size must be <= the 64 rows of '{d}/train\.parquet' \(one batch of training images\), got 128"),
    ("val_above_rows", None, ["data.val_size=100"], r"data\.val_size must be <= the 16 rows of '{d}/test\.parquet', got 100"),
]


@pytest.mark.parametrize("name, spoil, sets, pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(capsys, no_ray, tmp_path, base_yaml, name, spoil, sets, pattern):
    d = data_folder(tmp_path / "data")
    if spoil is not None:
        spoil(d)
    root = tmp_path / "root"
    argv = ["train", base_yaml, "--set", f"run.root={root}", "--set", "data.source=cifar10", "--set", "data.train_subset=32",
            "--data-dir", d] + [a for s in sets for a in ("--set", s)]
    assert_one_line(capsys, argv, pattern.format(d=re.escape(str(d))))
    assert not root.exists()


def test_missing_data_folder_from_the_config(capsys, no_ray, tmp_path, base_yaml):
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={tmp_path}", "--set", "data.source=cifar10",
                             "--set", f"data.data_dir={tmp_path}/none"],
                    rf"data folder '{re.escape(str(tmp_path))}/none' \(from data\.data_dir\) has no train\.parquet")


def test_missing_data_folder_from_the_environment(capsys, no_ray, tmp_path, base_yaml, monkeypatch):
    monkeypatch.setenv("AKOD_DATA_DIR", str(tmp_path / "none"))
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={tmp_path}", "--set", "data.source=cifar10"],
                    rf"data folder '{re.escape(str(tmp_path))}/none' \(from AKOD_DATA_DIR\) has no train\.parquet")


# --------------------------------------------------------------------------- schedule files

SCHEDULE_CASES = [
    ("missing", None, r"schedule file '{p}' does not exist"),
    ("folder", "DIR", r"schedule file '{p}' cannot be read: Is a directory"),
    ("not_json", b"betas: [1, 2]", r"schedule file '{p}' is corrupt: Expecting value: .*"),
    ("not_utf8", b'{"betas": [\xff]}', r"schedule file '{p}' is corrupt: 'utf-8' codec can't decode .*"),
    ("nested", b"[" * 100_000 + b"]" * 100_000, r"schedule file '{p}' is corrupt: .*recursion.*"),
    ("a_list", b"[0.1, 0.2]", r"schedule file '{p}' is corrupt: it must be a JSON object whose 'betas' is a list of numbers"),
    ("no_betas", b'{"T": 100}', r"schedule file '{p}' is corrupt: it must be a JSON object whose 'betas' is a list of numbers"),
    ("string_betas", json.dumps({"betas": ["0.1"] * 100}).encode(), r"schedule file '{p}' is corrupt: .*list of numbers"),
    ("bool_betas", json.dumps({"betas": [True] * 100}).encode(), r"schedule file '{p}' is corrupt: .*list of numbers"),
    ("empty_betas", b'{"betas": []}', r"schedule file '{p}' is corrupt: it holds 0 betas, a schedule needs T >= 2"),
    ("nan_beta", ('{"betas": [NaN' + ", 0.01" * 99 + "]}").encode(), r"schedule file '{p}': betas contain NaN or inf"),
    ("wrong_length", json.dumps({"betas": [0.01] * 50}).encode(), r"schedule file '{p}': betas must have shape \[100\], got \[50\]"),
    ("beta_too_large", json.dumps({"betas": [0.01] * 99 + [0.9995]}).encode(),
     r"schedule file '{p}': beta_t must lie in \(0, 0\.999\], got beta\[99\] = 0\.9995"),
    ("beta_zero", json.dumps({"betas": [0.0] + [0.01] * 99}).encode(),
     r"schedule file '{p}': beta_t must lie in \(0, 0\.999\], got beta\[0\] = 0\.0"),
]


def _schedule_file(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / f"{name}.json"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, pattern", SCHEDULE_CASES, ids=[c[0] for c in SCHEDULE_CASES])
def test_bad_schedule_file_for_training(capsys, no_ray, tmp_path, base_yaml, name, content, pattern):
    path = _schedule_file(tmp_path, name, content)
    root = tmp_path / "root"
    assert_one_line(capsys, ["train", base_yaml, "--set", f"run.root={root}", "--set", "diffusion.schedule=file",
                             "--set", f"diffusion.schedule_file={path}"], pattern.format(p=re.escape(str(path))))
    assert not root.exists()


# --------------------------------------------------------------------------- checkpoints (akod sample)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("good") / "run"
    make_checkpoint(run)
    return run


class Payload:
    """Unpickling this creates a file: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state(**changes) -> dict:
    state = checkpoint_state(tiny_config(Path("/tmp")))
    for key, value in changes.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    return state


def _other_model_state() -> dict:
    import dataclasses

    cfg = tiny_config(Path("/tmp"))
    wide = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, channels=(16, 16, 16, 16)))
    return _state(model=checkpoint_state(wide)["model"])


def _invalid_config() -> dict:
    state = _state()
    state["config"]["diffusion"]["T"] = 1
    return state


def _ema(shadow) -> dict:
    return {"decay": 0.99, "shadow": shadow}


CKPT_CASES = [
    ("lacks_ema", lambda: _state(ema=KeyError), r"checkpoint file '{f}' lacks \['ema'\]"),
    ("lacks_all", lambda: {"hello": 1}, r"checkpoint file '{f}' lacks \['betas', 'config', 'ema', 'model', 'step'\]"),
    ("a_list", lambda: [1, 2, 3], r"checkpoint file '{f}' lacks \['betas', 'config', 'ema', 'model', 'step'\]"),
    ("betas_nan", lambda: _state(betas=torch.full((CKPT_T,), float("nan"), dtype=torch.float64)),
     r"checkpoint '{c}': betas: betas contain NaN or inf"),
    ("betas_float32", lambda: _state(betas=torch.full((CKPT_T,), 0.01)), r"checkpoint '{c}': betas: betas must be float64, got torch\.float32"),
    ("betas_list", lambda: _state(betas=[0.01] * CKPT_T), r"checkpoint file '{f}': 'betas' must be a Tensor, got list"),
    ("betas_short", lambda: _state(betas=torch.full((10,), 0.01, dtype=torch.float64)),
     r"checkpoint '{c}': betas: betas must have shape \[50\], got \[10\]"),
    ("betas_too_large", lambda: _state(betas=torch.full((CKPT_T,), 0.9999, dtype=torch.float64)),
     r"checkpoint '{c}': betas: beta_t must lie in \(0, 0\.999\], got beta\[0\] = 0\.9999"),
    ("ema_empty", lambda: _state(ema=_ema([])),
     r"checkpoint '{c}': its EMA holds 0 tensors, the model has \d+ parameters \(sampling uses the EMA weights\)"),
    ("ema_not_a_list", lambda: _state(ema=_ema(torch.zeros(3))), r"checkpoint '{c}': its EMA holds Tensor tensors, .*"),
    ("ema_wrong_shapes", lambda: _state(ema=_ema([torch.zeros(1)] * len(_state()["ema"]["shadow"]))),
     r"checkpoint '{c}' does not match its config's model: EMA tensor 0 does not match .*"),
    ("ema_nan", lambda: _state(ema=_ema([torch.full_like(s, float("nan")) for s in _state()["ema"]["shadow"]])),
     r"checkpoint '{c}' does not match its config's model: EMA tensor 0 holds NaN or inf"),
    ("config_invalid", _invalid_config, r"checkpoint '{c}': stored config is invalid: diffusion\.T must be >= 2, got 1"),
    ("config_a_string", lambda: _state(config="linear"), r"checkpoint file '{f}': 'config' must be a dict, got str"),
    ("model_mismatch", _other_model_state, r"checkpoint '{c}' does not match its config's model: .*"),
    ("model_a_list", lambda: _state(model=[1, 2]), r"checkpoint file '{f}': 'model' must be a dict, got list"),
    ("step_negative", lambda: _state(step=-3), r"checkpoint file '{f}': 'step' must be an integer >= 0, got -3"),
    ("step_a_string", lambda: _state(step="4"), r"checkpoint file '{f}': 'step' must be an integer >= 0, got '4'"),
]


@pytest.mark.parametrize("name, make, pattern", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint_content(capsys, tmp_path, name, make, pattern):
    ckpt = make_checkpoint(tmp_path / "run", make())
    out = tmp_path / "out" / "grid.png"
    assert_one_line(capsys, ["sample", ckpt, "--out", out, "--n", "1", "--steps", "2"],
                    pattern.format(f=re.escape(str(ckpt / STATE_FILE)), c=re.escape(str(ckpt))))
    assert not (tmp_path / "out").exists()


def _write_bytes(content: bytes):
    def spoil(ckpt: Path) -> None:
        (ckpt / STATE_FILE).write_bytes(content)
    return spoil


def _truncate(ckpt: Path) -> None:
    state = ckpt / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])


CKPT_FILE_CASES = [
    ("truncated", _truncate, r"checkpoint file '{f}' is corrupt or truncated: .*"),
    ("garbage", _write_bytes(b"not a checkpoint" * 10), r"checkpoint file '{f}' is corrupt or truncated: .*"),
    ("empty", _write_bytes(b""), r"checkpoint file '{f}' is corrupt or truncated: .*"),
    ("plain_pickle", _write_bytes(pickle.dumps({"model": {}})), r"checkpoint file '{f}' is corrupt or truncated: .*"),
    ("state_is_a_folder", lambda c: ((c / STATE_FILE).unlink(), (c / STATE_FILE).mkdir()),
     r"checkpoint file '{f}' does not exist"),
]


@pytest.mark.parametrize("name, spoil, pattern", CKPT_FILE_CASES, ids=[c[0] for c in CKPT_FILE_CASES])
def test_bad_checkpoint_file(capsys, tmp_path, name, spoil, pattern):
    ckpt = make_checkpoint(tmp_path / "run")
    spoil(ckpt)
    out = tmp_path / "grid.png"
    assert_one_line(capsys, ["sample", ckpt, "--out", out, "--n", "1", "--steps", "2"],
                    pattern.format(f=re.escape(str(ckpt / STATE_FILE))))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_with_a_code_payload_is_refused_without_running_it(capsys, tmp_path):
    """An earlier version's state.pt (torch.save) with a pickled object: torch.load(weights_only=True) refuses it."""
    marker = tmp_path / "payload_ran"
    ckpt = make_checkpoint(tmp_path / "run", _state(extra=Payload(marker)), legacy=True)
    line = assert_one_line(capsys, ["sample", ckpt, "--out", tmp_path / "x.png"],
                           rf"checkpoint file '{re.escape(str(ckpt))}/state\.pt' is corrupt or truncated: it holds Python "
                           r"objects other than tensors and plain data, which are never loaded \(weights_only=True\).*")
    assert not marker.exists()
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


def test_a_pickle_named_state_safetensors_never_runs(capsys, tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = make_checkpoint(tmp_path / "run")
    (ckpt / STATE_FILE).write_bytes(pickle.dumps({"state": Payload(marker)}, protocol=4))
    assert_one_line(capsys, ["sample", ckpt, "--out", tmp_path / "x.png"],
                    rf"checkpoint file '{re.escape(str(ckpt / STATE_FILE))}' is corrupt or truncated: .*")
    assert not marker.exists()


def test_a_state_that_is_not_plain_data_is_not_written(tmp_path):
    from akod_ray.training.checkpoint import save_state

    with pytest.raises(CheckpointError, match=r"cannot be stored: .*Payload at extra: only tensors and plain data"):
        save_state(tmp_path / "ckpt", _state(extra=Payload(tmp_path / "x")))
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_a_missing_checkpoint(capsys, tmp_path):
    assert_one_line(capsys, ["sample", tmp_path / "nope", "--out", tmp_path / "x.png"],
                    rf"checkpoint file '{re.escape(str(tmp_path))}/nope' does not exist")


def test_a_run_folder_without_checkpoints(capsys, tmp_path):
    assert_one_line(capsys, ["sample", tmp_path, "--out", tmp_path / "x.png"],
                    rf"no checkpoint_XXXXXXXX folder with a state\.safetensors or state\.pt under "
                    rf"'{re.escape(str(tmp_path))}'")


# --------------------------------------------------------------------------- akod sample arguments


def _blocker(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


SAMPLE_ARG_CASES = [
    (["--n", "0"], "akod sample", r"argument --n: must be >= 1, got 0"),
    (["--n", "10000000"], "akod sample", r"argument --n: must be <= 65,536, got 10000000"),
    (["--n", "abc"], "akod sample", r"argument --n: must be an integer, got 'abc'"),
    (["--steps", "0"], "akod sample", r"argument --steps: must be >= 1, got 0"),
    (["--steps", "1000"], "akod", rf"--steps must be <= diffusion\.T={CKPT_T} of the checkpoint .*, got 1000"),
    (["--eta", "2"], "akod sample", r"argument --eta: must be in \[0, 1\], got 2"),
    (["--eta", "nan"], "akod sample", r"argument --eta: must be in \[0, 1\], got nan"),
    (["--eta", "x"], "akod sample", r"argument --eta: must be a number, got 'x'"),
    (["--seed", "-1"], "akod sample", r"argument --seed: must be >= 0, got -1"),
    (["--seed", str(2**64)], "akod sample", r"argument --seed: must be <= 9,223,372,036,854,775,807, got 18446744073709551616"),
    (["--seed", "1.5"], "akod sample", r"argument --seed: must be an integer, got '1\.5'"),
    (["--sampler", "lms"], "akod sample", r"argument --sampler: invalid choice: 'lms' \(choose from .*\)"),
    (["--grid", "mine"], "akod sample", r"argument --grid: invalid choice: 'mine' \(choose from 'common', 'own'\)"),
    (["--sampler", "heun", "--steps", "2"], "akod", r"--steps must be >= 3 for heun \(N steps take 2N - 1 network .*\), got 2"),
    (["--sampler", "euler", "--steps", str(CKPT_T)], "akod",
     rf"--steps must be <= T - 1 = {CKPT_T - 1} for euler \(N steps span N \+ 1 distinct grid steps, the last replaced "
     rf"by the clean image\), got {CKPT_T}"),
    (["--sampler", "adaptive", "--steps", "1000"], "akod", rf"--steps must be <= diffusion\.T={CKPT_T} of the checkpoint .*, got 1000"),
    (["--device", "foo"], "akod", r"--device 'foo' is not a device \(cpu, cuda, cuda:N, mps\)"),
    (["--device", "cuda:99"], "akod", r"--device 'cuda:99': this machine has \d+ CUDA device\(s\)"),
    (["--device", "meta"], "akod", r"--device 'meta': only cpu, cuda\[:N\] and mps are supported"),
    (["--bogus"], "akod", r"unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("args, prog, pattern", SAMPLE_ARG_CASES, ids=[" ".join(c[0])[:30] for c in SAMPLE_ARG_CASES])
def test_bad_sample_argument(capsys, tmp_path, good_run, args, prog, pattern):
    out = tmp_path / "grid.png"
    assert_one_line(capsys, ["sample", good_run, "--out", out, *args], pattern, prog=prog)
    assert everything_under(tmp_path) == []


def test_sample_without_out(capsys, good_run):
    assert_one_line(capsys, ["sample", good_run], r"the following arguments are required: --out", prog="akod sample")


def test_sample_out_is_a_folder(capsys, tmp_path, good_run):
    assert_one_line(capsys, ["sample", good_run, "--out", tmp_path, "--n", "1"],
                    rf"--out '{re.escape(str(tmp_path))}' is a folder; give a file name")
    assert everything_under(tmp_path) == []


def test_sample_out_under_a_file(capsys, tmp_path, good_run):
    f = _blocker(tmp_path)
    assert_one_line(capsys, ["sample", good_run, "--out", f / "x.png", "--n", "1"],
                    rf"--out '{re.escape(str(f))}/x\.png' cannot be written: '{re.escape(str(f))}' is not a folder")
    assert everything_under(tmp_path) == ["a_file"]


@pytest.mark.parametrize("name, content, pattern", SCHEDULE_CASES[:4], ids=[c[0] for c in SCHEDULE_CASES[:4]])
def test_bad_schedule_file_for_sampling(capsys, tmp_path, good_run, name, content, pattern):
    path = _schedule_file(tmp_path, name, content)
    out = tmp_path / "grid.png"
    assert_one_line(capsys, ["sample", good_run, "--out", out, "--schedule", path, "--n", "1"],
                    pattern.format(p=re.escape(str(path))))
    assert not out.exists()


def test_schedule_file_of_another_T_for_sampling(capsys, tmp_path, good_run):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"betas": [0.01] * (CKPT_T + 1)}))
    assert_one_line(capsys, ["sample", good_run, "--out", tmp_path / "g.png", "--schedule", path, "--n", "1"],
                    rf"schedule file '{re.escape(str(path))}': betas must have shape \[{CKPT_T}\], got \[{CKPT_T + 1}\]")


# --------------------------------------------------------------------------- FID statistics and akod fid


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _stats(d: int = 6, impl: str = "akod_ray fid_c10 classifier features (6-d, weights x)", **changes) -> dict:
    out = {"mu": np.zeros(d), "sigma": np.eye(d), "n": np.int64(10), "source": np.str_("test"),
           "implementation": np.str_(impl)}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


STATS_CASES = [
    ("missing", None, r"reference statistics '{p}' do not exist; compute them with `akod fid stats`"),
    ("garbage", b"not an npz", r"reference statistics '{p}' are corrupt: .*"),
    ("npy", "NPY", r"reference statistics '{p}' are corrupt: not an \.npz archive"),
    ("no_mu", _stats(mu=None), r"reference statistics '{p}' are corrupt: .*mu.*"),
    ("pickled_objects", _stats(source=np.array([{"a": 1}], dtype=object)), r"reference statistics '{p}' are corrupt: .*allow_pickle.*"),
    ("nan_mu", _stats(mu=np.full(6, np.nan)), r"reference statistics '{p}' are corrupt: NaN or inf values"),
    ("sigma_shape", _stats(sigma=np.eye(5)), r"reference statistics '{p}' are corrupt: mu \[6\], sigma \[5, 5\], n 10"),
    ("n_one", _stats(n=np.int64(1)), r"reference statistics '{p}' are corrupt: mu \[6\], sigma \[6, 6\], n 1"),
    ("n_text", _stats(n=np.str_("ten")), r"reference statistics '{p}' are corrupt: .*"),
    ("unknown_impl", _stats(impl="my own features"), r"reference statistics '{p}' name an unknown implementation 'my own features'"),
    ("inception_6d", _stats(impl="pytorch-fid InceptionV3 pool3 (2048-d)"),
     r"reference statistics '{p}' are corrupt: Inception statistics are 2048-d, these are 6-d"),
    ("other_classifier", _stats(), r"reference statistics '{p}' were computed with .*, not with this installation's .*"),
]


@pytest.mark.parametrize("name, content, pattern", STATS_CASES, ids=[c[0] for c in STATS_CASES])
def test_bad_fid_statistics(capsys, tmp_path, good_run, name, content, pattern):
    path = tmp_path / f"{name}.npz"
    if isinstance(content, dict):
        _npz(path, **content)
    elif content == "NPY":
        np.save(open(path, "wb"), np.zeros(3))
    elif content is not None:
        path.write_bytes(content)
    assert_one_line(capsys, ["fid", good_run, "--ref", path, "--n", "2", "--steps", "2"],
                    pattern.format(p=re.escape(str(path))))


FID_ARG_CASES = [
    (["fid", "{run}"], "akod", r"akod fid needs a CHECKPOINT and --ref STATS\.npz .*"),
    (["fid", "{run}", "--ref", "{ref}", "--n", "1"], "akod fid", r"argument --n: must be >= 2, got 1"),
    (["fid", "{run}", "--ref", "{ref}", "--feature", "swav"], "akod fid", r"argument --feature: invalid choice: 'swav' .*"),
    (["fid", "{run}", "--ref", "{ref}", "--eta", "-1"], "akod fid", r"argument --eta: must be in \[0, 1\], got -1"),
    (["fid", "{run}", "--ref", "{ref}", "--seed", "x"], "akod fid", r"argument --seed: must be an integer, got 'x'"),
    (["fid", "{run}", "--ref", "{ref}", "--sampler", "lms"], "akod fid", r"argument --sampler: invalid choice: 'lms' .*"),
    (["fid", "{run}", "--ref", "{ref}", "--steps", "0"], "akod fid", r"argument --steps: must be >= 1, got 0"),
    (["fid", "{run}", "--ref", "{ref}", "--grid", "x"], "akod fid", r"argument --grid: invalid choice: 'x' .*"),
    (["fid", "{run}", "--ref", "{ref}", "--device", "tpu"], "akod", r"--device 'tpu' is not a device .*"),
    (["fid", "stats"], "akod", r"akod fid stats needs --out FILE\.npz"),
    (["fid", "stats", "--out", "{tmp}"], "akod", r"--out '{tmp}' is a folder; give a file name"),
    (["fid", "stats", "--out", "{tmp}/x.npz", "--inception-weights", "{tmp}/none.pth", "--data-dir", "{tmp}/nodata"],
     "akod", r"data folder '{tmp}/nodata' \(from --data-dir\) has no train\.parquet"),
]


@pytest.mark.parametrize("args, prog, pattern", FID_ARG_CASES, ids=[" ".join(c[0][2:])[:40] or c[0][1] for c in FID_ARG_CASES])
def test_bad_fid_argument(capsys, tmp_path, good_run, args, prog, pattern):
    ref = tmp_path / "ref.npz"
    _npz(ref, **_stats())
    fill = {"run": str(good_run), "ref": str(ref), "tmp": str(tmp_path)}
    before = everything_under(tmp_path)
    assert_one_line(capsys, [a.format(**fill) for a in args], pattern.format(**{k: re.escape(v) for k, v in fill.items()}),
                    prog=prog)
    assert everything_under(tmp_path) == before


def test_inception_weights_that_do_not_exist(capsys, tmp_path, good_run):
    ref = tmp_path / "ref.npz"
    _npz(ref, **_stats(2048, "pytorch-fid InceptionV3 pool3 (2048-d)"))
    assert_one_line(capsys, ["fid", good_run, "--ref", ref, "--inception-weights", tmp_path / "none.pth"],
                    rf"Inception weights '{re.escape(str(tmp_path))}/none\.pth' \(from --inception-weights\) do not exist")


def test_inception_weights_with_a_code_payload(capsys, tmp_path, good_run, recwarn):
    """Refused in one line, the payload never runs, and torch's pickle-protocol warning is not printed (issue 18)."""
    marker = tmp_path / "payload_ran"
    weights = tmp_path / "w.pth"
    torch.save({"x": Payload(marker)}, weights)
    ref = tmp_path / "ref.npz"
    _npz(ref, **_stats(2048, "pytorch-fid InceptionV3 pool3 (2048-d)"))
    assert_one_line(capsys, ["fid", good_run, "--ref", ref, "--inception-weights", weights, "--n", "2", "--steps", "2"],
                    rf"Inception weights '{re.escape(str(weights))}' are corrupt or not the FID Inception: it holds Python "
                    r"objects other than tensors .*")
    assert not marker.exists()
    assert [str(w.message) for w in recwarn] == []


# --------------------------------------------------------------------------- report, data, commands


def test_report_of_a_missing_folder(capsys, tmp_path):
    assert_one_line(capsys, ["report", tmp_path / "none"], rf"report: '{re.escape(str(tmp_path))}/none' is not a folder")


def test_report_of_a_folder_without_runs(capsys, tmp_path):
    assert_one_line(capsys, ["report", tmp_path],
                    rf"report: no runs under '{re.escape(str(tmp_path))}' \(a run folder holds config\.yaml and metrics\.jsonl\)")
    assert everything_under(tmp_path) == []


def _a_run(folder: Path, config_text: str = "diffusion:\n  schedule: cosine\n") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_text)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "wall_s": 1.0, "loss": 0.5, "ref_loss": 0.4}) + "\n")
    return folder


def test_report_out_under_a_file(capsys, tmp_path):
    run = _a_run(tmp_path / "run")
    f = _blocker(tmp_path)
    assert_one_line(capsys, ["report", run, "--out", f / "r.md"],
                    rf"--out '{re.escape(str(f))}/r\.md' cannot be written: '{re.escape(str(f))}' is not a folder")
    assert everything_under(run) == ["config.yaml", "metrics.jsonl"]


def test_report_out_is_a_file_used_as_folder(capsys, tmp_path):
    run = _a_run(tmp_path / "run")
    f = _blocker(tmp_path)
    assert_one_line(capsys, ["report", run, "--out", f], rf"--out '{re.escape(str(f))}' exists and is not a folder")
    assert everything_under(run) == ["config.yaml", "metrics.jsonl"]


def test_data_prepare_into_a_file(capsys, tmp_path):
    f = _blocker(tmp_path)
    assert_one_line(capsys, ["data", "prepare", "cifar10", "--out", f], rf"--out '{re.escape(str(f))}' exists and is not a folder")


def test_data_prepare_of_an_unknown_dataset(capsys, tmp_path):
    assert_one_line(capsys, ["data", "prepare", "imagenet", "--out", tmp_path],
                    r"argument name: invalid choice: 'imagenet' \(choose from 'cifar10'\)", prog="akod data prepare")


def test_unknown_command(capsys):
    assert_one_line(capsys, ["trian"], r"argument command: invalid choice: 'trian' \(choose from .*\)")


def test_no_command(capsys):
    assert_one_line(capsys, [], r"the following arguments are required: command")


def test_sweep_resume_without_a_sweep(capsys, no_ray, tmp_path, base_yaml):
    assert_one_line(capsys, ["sweep", base_yaml, "--set", f"run.root={tmp_path}", "--resume"],
                    rf"no sweep to resume in '{re.escape(str(tmp_path))}/badsweep' \(it has no config\.yaml\); run without "
                    r"--resume first")


def _started_sweep(tmp_path: Path, base_yaml: Path) -> Path:
    from akod_ray.config import load_config, save_config

    sweep = tmp_path / "badsweep"
    save_config(load_config(base_yaml, [f"run.root={tmp_path}"]), sweep)
    return sweep


def test_sweep_started_twice(capsys, no_ray, tmp_path, base_yaml):
    sweep = _started_sweep(tmp_path, base_yaml)
    assert_one_line(capsys, ["sweep", base_yaml, "--set", f"run.root={tmp_path}"],
                    rf"sweep folder '{re.escape(str(sweep))}' already holds a sweep; pass --resume to continue it or set "
                    r"sweep\.name to start another")
    assert everything_under(sweep) == ["config.yaml"]


def test_sweep_resumed_with_another_config(capsys, no_ray, tmp_path, base_yaml):
    sweep = _started_sweep(tmp_path, base_yaml)
    assert_one_line(capsys, ["sweep", base_yaml, "--set", f"run.root={tmp_path}", "--set", "train.lr=0.01", "--resume"],
                    rf"train\.lr is 0\.01 but the sweep in '{re.escape(str(sweep))}' was started with 0\.0001; resume with "
                    r"the same config, or set sweep\.name to start another")


def test_sweep_resumed_with_a_corrupt_saved_config(capsys, no_ray, tmp_path, base_yaml):
    sweep = _started_sweep(tmp_path, base_yaml)
    (sweep / "config.yaml").write_text("train: [\n")
    assert_one_line(capsys, ["sweep", base_yaml, "--set", f"run.root={tmp_path}", "--resume"],
                    rf"cannot resume the sweep in '{re.escape(str(sweep))}': config file '.*' is not valid YAML: .*")


# --------------------------------------------------------------------------- the count, and what is not an error


SINGLE_CASES = [  # the one-case tests above, each one more distinct bad input
    test_gpu_workers_without_a_gpu, test_missing_config_file, test_config_file_is_a_folder, test_run_root_is_a_file,
    test_run_folder_is_a_file, test_run_root_without_write_permission, test_missing_data_folder_from_the_config,
    test_missing_data_folder_from_the_environment, test_a_checkpoint_with_a_code_payload_is_refused_without_running_it,
    test_a_missing_checkpoint, test_a_run_folder_without_checkpoints, test_sample_without_out, test_sample_out_is_a_folder,
    test_sample_out_under_a_file, test_schedule_file_of_another_T_for_sampling, test_inception_weights_that_do_not_exist,
    test_inception_weights_with_a_code_payload, test_report_of_a_missing_folder, test_report_of_a_folder_without_runs,
    test_report_out_under_a_file, test_report_out_is_a_file_used_as_folder, test_data_prepare_into_a_file,
    test_data_prepare_of_an_unknown_dataset, test_unknown_command, test_no_command, test_sweep_resume_without_a_sweep,
    test_sweep_started_twice, test_sweep_resumed_with_another_config, test_sweep_resumed_with_a_corrupt_saved_config,
]
TABLES = [CONFIG_CASES, SWEEP_CASES, FILE_CASES, SET_SYNTAX, DATA_CASES, SCHEDULE_CASES, CKPT_CASES, CKPT_FILE_CASES,
          SAMPLE_ARG_CASES, SCHEDULE_CASES[:4], STATS_CASES, FID_ARG_CASES]


def test_at_least_150_distinct_bad_inputs():
    distinct = sum(len(t) for t in TABLES) - len(SCHEDULE_CASES[:4]) + len(SINGLE_CASES)  # the schedule files count once
    assert distinct >= 150, distinct


def test_a_report_over_a_run_with_a_bad_config_section_is_whole(capsys, tmp_path):
    """Not an error: the report covers the run and names the problem; nothing half-written."""
    run = _a_run(tmp_path / "run", "diffusion: [1, 2]\ntrain:\n  seed: 3\n")
    rc = main(["report", str(run)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    text = (run / "report.md").read_text()
    assert "config.yaml: section(s) ['diffusion'] are not mappings (ignored)" in text
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl", "report.md", "report_files"]


def test_dry_run_is_not_an_error(capsys, no_ray, base_yaml):
    assert main(["train", str(base_yaml), "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["name"] == "bad"


# --------------------------------------------------------------------------- real processes (Ray where needed)


def test_the_real_process_prints_one_line(tmp_path, base_yaml):
    proc = subprocess.run(akod_cmd("train", base_yaml, "--set", f"run.root={tmp_path}", "--set", "run.name=.."),
                          capture_output=True, text=True, env=akod_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["akod: error: run.name must not be '.' or '..' (it would name run.root or its "
                                        "parent), got '..'"]
    assert everything_under(tmp_path) == []


@pytest.mark.slow
def test_ray_that_fails_to_start_is_one_line(tmp_path, base_yaml):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    proc = subprocess.run(akod_cmd("train", base_yaml, "--set", f"run.root={tmp_path / 'root'}"),
                          capture_output=True, text=True, env=akod_env(RAY_TMPDIR=str(blocker), TMPDIR=str(blocker)),
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("akod: error: Ray did not start: "), line
    assert not (tmp_path / "root").exists()


@pytest.mark.slow
def test_an_error_inside_a_ray_worker_is_one_line_naming_the_file(tmp_path, base_yaml):
    """An image whose header passes the driver's check but whose data is cut: only the worker's
    decoder sees it. One line naming the file and row; the run folder is reusable."""
    d = data_folder(tmp_path / "data")
    _replace_images(d / "train.parquet", lambda b: b.__setitem__(7, b[7][:60]))
    root = tmp_path / "root"
    proc = subprocess.run(akod_cmd("train", base_yaml, "--set", f"run.root={root}", "--set", "data.source=cifar10",
                                   "--set", "data.train_subset=null", "--data-dir", d),
                          capture_output=True, text=True, env=akod_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    [line] = proc.stderr.splitlines()  # Ray's forwarded lines (the worker's traceback) are in RUN/ray.log
    assert re.fullmatch(rf"akod: error: {re.escape(str(d))}/train\.parquet, row 7: cannot decode image: .*", line), line
    assert "(pid=" not in proc.stdout and "Traceback" not in proc.stdout
    assert "cannot decode image" in (root / "bad" / "ray.log").read_text()
    assert not list((root / "bad").glob("checkpoint_*"))
