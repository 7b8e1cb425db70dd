"""`akod` command line: bad input gives exit status 2 and one clear line; dry-run; sampling.

No Ray here: every error below must be raised before Ray starts (the tests that could reach
Ray replace ``ensure_ray`` with a tripwire); the sampled checkpoints are made by hand
(tests/checkpoint_helpers.py). The full catalogue of bad inputs is tests/test_bad_inputs.py.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from akod_ray.cli import main
from akod_ray.config import config_from_dict, load_config
from ray_helpers import REPO, TUNE_CONFIGS, akod_cmd, akod_env, assert_one_clear_error

TINY = str(TUNE_CONFIGS / "tiny.yaml")


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command gets as far as starting Ray."""
    import akod_ray.training.trainer as trainer

    def tripwire(cfg):
        raise AssertionError("the error was not raised before Ray started")

    monkeypatch.setattr(trainer, "ensure_ray", tripwire)


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_exit_2(rc: int, err: str, pattern: str) -> None:
    assert rc == 2, err
    assert_one_clear_error(err, "akod: error: " + pattern)
    assert len(err.strip().splitlines()) == 1, err


BAD_OVERRIDES = [
    ("diffusion.schedule=foo", r"diffusion\.schedule must be one of \('linear', 'cosine', 'loglinear', 'edm', 'laplace', 'akod', 'file'\), got 'foo'"),
    ("model.channels=[0,8,16,16]", r"model\.channels must all be positive, got \(0, 8, 16, 16\)"),
    ("model.bottleneck_channels=-8", r"model\.bottleneck_channels must be a positive multiple of 8, got -8"),
    ("dko.kernel_size=4", r"dko\.kernel_size must be odd and >= 3, got 4"),
    ("train.no_such_field=1", r"unknown config key 'train\.no_such_field'; allowed: \[.*'steps'.*\]"),
    ("nosection.steps=1", r"unknown config key 'nosection\.steps': no section 'nosection'; allowed: \[.*\]"),
    ("train.steps=abc", r"train\.steps must be an integer, got 'abc'"),
    ("train.lr=fast", r"train\.lr must be a number, got 'fast'"),
    ("run.dashboard=maybe", r"run\.dashboard must be true or false, got 'maybe'"),
]


@pytest.mark.parametrize("override, pattern", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_config_values_exit_2_with_one_line_naming_the_field(capsys, no_ray, tmp_path, override, pattern):
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--set", override])
    assert_exit_2(rc, err, pattern)
    assert not (tmp_path / "tiny").exists()  # nothing was written


def test_a_missing_data_folder_exits_2_naming_it(capsys, no_ray, tmp_path):
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--data-dir", "/nonexistent"])
    assert_exit_2(rc, err, r"data folder '/nonexistent' \(from --data-dir\) has no train\.parquet")


def test_a_corrupt_parquet_file_exits_2_naming_it(capsys, no_ray, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"PAR1 this is not a parquet file" * 100)
    (data / "test.parquet").write_bytes(b"garbage")
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--data-dir", str(data)])
    assert_exit_2(rc, err, rf"data file '{data}/train\.parquet' is not a readable Parquet file: .*")


def test_a_missing_test_split_exits_2_naming_it(capsys, no_ray, tmp_path, cifar_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").symlink_to(cifar_dir / "train.parquet")
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--data-dir", str(data)])
    assert_exit_2(rc, err, rf"data file '{data}/test\.parquet' does not exist")


def test_the_real_process_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(akod_cmd("train", TINY, "--set", "diffusion.schedule=foo", "--set", f"run.root={tmp_path}"),
                          capture_output=True, text=True, env=akod_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "akod: error: diffusion.schedule must be one of ('linear', 'cosine', 'loglinear', 'edm', 'laplace', 'akod', 'file'), got 'foo'"]


def test_dry_run_prints_yaml_that_reloads_to_the_same_config(capsys, no_ray):
    sets = ["--set", "train.steps=7", "--set", "model.channels=[8,8,16,16]", "--set", "diffusion.schedule=linear"]
    rc, out, err = run_main(capsys, ["train", TINY, "--dry-run", *sets])
    assert rc == 0 and err == ""
    reloaded = config_from_dict(yaml.safe_load(out))
    expected = load_config(TINY, [s for s in sets if s != "--set"])
    assert reloaded == expected
    assert reloaded.train.steps == 7 and reloaded.model.channels == (8, 8, 16, 16)
    assert reloaded != load_config(TINY)


# ----------------------------------------------------------------- akod sample


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A run folder with two checkpoints of a width-8 U-Net (random weights: sampling needs no training)."""
    from checkpoint_helpers import make_checkpoint

    run = tmp_path_factory.mktemp("runs") / "sample"
    make_checkpoint(run, step=2)
    make_checkpoint(run, step=4)
    return run


def test_sample_writes_a_png_grid_of_the_right_size(capsys, local_run, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    rc, stdout, err = run_main(capsys, ["sample", str(local_run / "checkpoint_00000004"), "--out", str(out),
                                        "--n", "9", "--steps", "3"])
    assert rc == 0, err
    assert f"wrote 9 samples (ddim, 3 network evaluations per image, common grid) to {out}" in stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (3 * 34 + 2, 3 * 34 + 2)  # 3 x 3 images of 32 px, 2 px padding
        assert im.getextrema() != ((0, 0), (0, 0), (0, 0))


def test_sample_takes_the_latest_checkpoint_of_a_run_folder(capsys, local_run, tmp_path):
    out = tmp_path / "grid.png"
    rc, stdout, err = run_main(capsys, ["sample", str(local_run), "--out", str(out), "--n", "4", "--steps", "2"])
    assert rc == 0, err
    assert out.is_file()


@pytest.mark.parametrize("args, says", [
    ([], "ddim, 5 network evaluations per image, common grid"),  # the checkpoint's eval config
    (["--sampler", "dpmpp_2m", "--steps", "4", "--grid", "own"], "dpmpp_2m, 4 network evaluations per image, own grid"),
    (["--sampler", "heun", "--steps", "6"], "heun, 5 network evaluations per image, common grid"),
    (["--sampler", "adaptive", "--steps", "3"], "adaptive, 3 network evaluations per image, common grid"),
    (["--sampler", "ddpm"], "ddpm, 50 network evaluations per image, common grid"),
])
def test_sample_says_which_sampler_evaluations_and_grid_it_used(capsys, local_run, tmp_path, args, says):
    out = tmp_path / "grid.png"
    rc, stdout, err = run_main(capsys, ["sample", str(local_run), "--out", str(out), "--n", "2", *args])
    assert rc == 0, err
    assert f"wrote 2 samples ({says}) to {out}" in stdout
    assert out.is_file()


def test_fid_says_how_it_sampled_and_refuses_a_budget_in_one_line(capsys, local_run):
    from akod_ray.evaluation.feature_net import DEFAULT_C10_REFERENCE

    if not DEFAULT_C10_REFERENCE.is_file():
        pytest.skip("the shipped fid_c10 reference statistics are missing")
    base = ["fid", str(local_run), "--ref", str(DEFAULT_C10_REFERENCE), "--n", "4"]
    rc, stdout, err = run_main(capsys, base + ["--sampler", "unipc", "--steps", "3", "--grid", "own"])
    assert rc == 0, err
    *progress_lines, result = stdout.splitlines()  # progress lines (a slow machine) come first
    assert all(line.startswith("[akod] fid samples: ") for line in progress_lines)
    assert result.startswith("[akod] fid_c10 = ")
    assert result.endswith("; sampled with unipc, 3 network evaluations per image, own grid)")
    rc, stdout, err = run_main(capsys, base + ["--sampler", "heun", "--steps", "2"])
    assert_exit_2(rc, err, r"--steps must be >= 3 for heun \(N steps take 2N - 1 network evaluations: .*\), got 2")


def test_sample_from_a_truncated_checkpoint_exits_2_naming_the_file(tmp_path, local_run):
    import shutil

    ckpt = tmp_path / "checkpoint_00000004"
    shutil.copytree(local_run / "checkpoint_00000004", ckpt)
    state = ckpt / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    proc = subprocess.run(akod_cmd("sample", ckpt, "--out", tmp_path / "x.png", "--n", "4"),
                          capture_output=True, text=True, env=akod_env(), cwd=REPO, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_error(proc.stderr, rf"akod: error: checkpoint file '{state}' is corrupt or truncated: .*")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_sample_from_a_folder_without_checkpoints_exits_2(capsys, tmp_path):
    rc, out, err = run_main(capsys, ["sample", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert_exit_2(rc, err, rf"no checkpoint_XXXXXXXX folder with a state\.safetensors or state\.pt under '{tmp_path}'")


def test_sample_with_a_bad_flag_value_exits_2(capsys, local_run, tmp_path):
    rc = main(["sample", str(local_run), "--out", str(tmp_path / "x.png"), "--n", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == ["akod sample: error: argument --n: must be >= 1, got 0"]  # one line, no usage block


@pytest.fixture
def closed_port():
    """A local TCP port that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray_init(monkeypatch):
    import ray

    def tripwire(*args, **kwargs):
        raise AssertionError("ray.init was called: the address was not checked first")

    monkeypatch.setattr(ray, "init", tripwire)


def test_an_unreachable_ray_address_exits_2_naming_the_field(capsys, no_ray_init, tmp_path, closed_port):
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--set", "data.source=procedural",
                                     "--set", f"run.ray_address=127.0.0.1:{closed_port}"])
    assert_exit_2(rc, err, rf"run\.ray_address '127\.0\.0\.1:{closed_port}': no Ray head answers there \(.+\)")


def test_an_unreachable_ray_address_from_the_environment_names_RAY_ADDRESS(capsys, no_ray_init, tmp_path, closed_port,
                                                                           monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{closed_port}")
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--set", "data.source=procedural"])
    assert_exit_2(rc, err, rf"RAY_ADDRESS 'ray://127\.0\.0\.1:{closed_port}': no Ray head answers there \(.+\)")


def test_a_malformed_ray_address_exits_2_naming_the_field(capsys, no_ray_init, tmp_path):
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--set", "data.source=procedural",
                                     "--set", "run.ray_address=headnode"])
    assert_exit_2(rc, err, r"run\.ray_address must be 'auto', 'local', host:port or ray://host:port, got 'headnode'")


def test_a_dashboard_url_as_ray_address_exits_2_saying_what_to_give(capsys, no_ray_init, tmp_path):
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--set", "data.source=procedural",
                                     "--set", "run.ray_address=http://127.0.0.1:8265"])
    assert_exit_2(rc, err, r"run\.ray_address 'http://127\.0\.0\.1:8265' is a dashboard \(Jobs API\) URL; .*6379.*")


@pytest.mark.parametrize("family, host", [("ipv4", "127.0.0.1"), ("ipv6", "::1")])
def test_ray_addresses_with_a_listener_pass_the_check(family, host):
    """host:port, ray://host:port and bracketed IPv6 (as Ray writes it, e.g. in RAY_ADDRESS under
    `ray job submit`) reach a listening port; other client schemes are left to ray.init."""
    import socket

    from akod_ray.training.trainer import check_ray_address

    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    try:
        server = socket.socket(fam)
        server.bind((host, 0))
    except OSError:
        pytest.skip(f"no {family} loopback here")
    with server:
        server.listen()
        port = server.getsockname()[1]
        shown = host if family == "ipv4" else f"[{host}]"
        for address in (f"{shown}:{port}", f"ray://{shown}:{port}", "auto", "local", "anyscale://cluster"):
            check_ray_address(address, "run.ray_address")


def test_val_size_below_the_worker_count_exits_2(capsys, no_ray, tmp_path):
    rc, out, err = run_main(capsys, ["train", TINY, "--set", f"run.root={tmp_path}", "--set", "data.val_size=1",
                                     "--set", "train.num_workers=2"])
    assert_exit_2(rc, err, r"data\.val_size must be >= train\.num_workers=2 .*, got 1")


# ----------------------------------------------------------------- the console while Ray runs


def test_ray_console_shows_akod_lines_named_by_trial_and_keeps_the_rest(tmp_path, capsys):
    import sys

    from akod_ray.console import RayConsole

    runs = tmp_path / "sweep" / "runs"
    (runs / "akod_k7_s0-1a2b3c4d" / "workers").mkdir(parents=True)
    (runs / "akod_k7_s0-1a2b3c4d" / "workers" / "rank0.pid").write_text("4242")
    log = tmp_path / "sweep" / "ray.log"
    forwarded = [
        "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m [akod] step 100/300 loss 0.1000",
        "\x1b[36m(TrainController pid=17)\x1b[0m Requesting resources: {'CPU': 1} * 1",
        "\x1b[36m(RayTrainWorker pid=4242, ip=10.0.0.2)\x1b[0m Traceback (most recent call last):",
        "(raylet) some raylet line",
        "\x1b[36m(RayTrainWorker pid=999)\x1b[0m [akod] step 5/10 loss 0.2",
        "\x1b[36m(TrainController pid=17)\x1b[0m [FailurePolicy] RETRY",
        "\x1b[36m(TrainController pid=17)\x1b[0m [FailurePolicy] RAISE",  # logged: akod's one-line error follows
    ]
    with RayConsole(log, runs):
        print("\n".join(forwarded))
        print("[akod] the driver's own line")
        print(forwarded[0], file=sys.stderr)  # Ray Train echoes worker stdout on stderr: not shown twice
    out, err = capsys.readouterr()
    assert out.splitlines() == ["(akod_k7_s0) [akod] step 100/300 loss 0.1000", "[akod] step 5/10 loss 0.2",
                                "[FailurePolicy] RETRY", "[akod] the driver's own line"]
    assert err == ""
    assert log.read_text().splitlines() == forwarded + [forwarded[0]]


def test_ray_console_credits_a_line_to_the_trial_of_its_node_and_pid(tmp_path, capsys):
    """Issue 22: process ids repeat across nodes and containers. Two trials whose rank-0 workers have the same
    pid on different nodes are told apart by the node Ray puts in the prefix (none: the driver's node); a pid
    that a later trial reuses on the same node is credited to that trial; a search's trials of one point are
    named by their whole run folder."""
    import os
    import time

    from akod_ray.console import RayConsole

    runs = tmp_path / "sweep" / "runs"

    def worker(folder: str, node: str, pid: int, age_s: float = 0.0) -> None:
        (runs / folder / "workers").mkdir(parents=True, exist_ok=True)
        (runs / folder / "workers" / "rank0.node").write_text(node)
        path = runs / folder / "workers" / "rank0.pid"
        path.write_text(str(pid))
        os.utime(path, (time.time() - age_s, time.time() - age_s))

    worker("baseline_s0-aaaa1111", "10.0.0.1", 4242, age_s=60)  # the driver's node
    worker("cosine_s0-bbbb2222", "10.0.0.2", 4242, age_s=60)
    worker("laplace_s0-c1_00000", "10.0.0.2", 77, age_s=60)
    worker("laplace_s0-c2_00001", "10.0.0.3", 77, age_s=60)
    with RayConsole(tmp_path / "sweep" / "ray.log", runs, local_node=lambda: "10.0.0.1") as console:
        print("\x1b[36m(RayTrainWorker pid=4242)\x1b[0m [akod] step 2/8 loss 0.5")
        print("\x1b[36m(RayTrainWorker pid=4242, ip=10.0.0.2)\x1b[0m [akod] step 4/8 loss 0.4")
        print("(RayTrainWorker pid=77, ip=10.0.0.3) [akod] step 6/8 loss 0.3")
        print("(RayTrainWorker pid=4242, ip=10.0.0.9) [akod] step 1/8 loss 0.9")  # no trial on that node
        worker("min_snr_s0-dddd4444", "10.0.0.2", 4242)  # a later trial on node 2 gets pid 4242 again
        console.scanned = -1e9  # as after RESCAN_S seconds
        print("(RayTrainWorker pid=4242, ip=10.0.0.2) [akod] step 8/8 loss 0.2")
    assert capsys.readouterr().out.splitlines() == [
        "(baseline_s0) [akod] step 2/8 loss 0.5", "(cosine_s0) [akod] step 4/8 loss 0.4",
        "(laplace_s0-c2_00001) [akod] step 6/8 loss 0.3", "[akod] step 1/8 loss 0.9",
        "(min_snr_s0) [akod] step 8/8 loss 0.2"]


def test_ray_console_of_a_single_run_drops_the_prefix(tmp_path, capsys):
    from akod_ray.console import RayConsole

    with RayConsole(tmp_path / "run" / "ray.log"):
        print("\x1b[36m(RayTrainWorker pid=7)\x1b[0m [akod] resumed from the checkpoint at step 40")
    assert capsys.readouterr().out == "[akod] resumed from the checkpoint at step 40\n"


def test_run_folders_get_no_group_or_world_write_permission(tmp_path):
    import os
    import stat

    from akod_ray.config import load_config, save_config

    before = os.umask(0)
    try:
        path = save_config(load_config(None), tmp_path / "root" / "sweep" / "runs" / "r1")
    finally:
        os.umask(before)
    for folder in (tmp_path / "root", tmp_path / "root" / "sweep", path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o022 == 0, folder


def test_a_failure_that_is_not_the_users_is_one_line_with_the_traceback_kept(capsys, monkeypatch, tmp_path):
    import akod_ray.cli as cli

    def broken(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    rc, out, err = run_main(capsys, ["report", str(tmp_path)])
    assert rc == 1
    [line] = err.splitlines()
    log = tmp_path / line.rsplit("full traceback in ", 1)[1].rstrip(")")
    assert line.startswith("akod: error: ZeroDivisionError: division by zero (full traceback in ")
    assert "Traceback (most recent call last)" in log.read_text()


def test_root_cause_goes_through_worker_failures_and_causes():
    from akod_ray.errors import DataError, root_cause

    class WorkerFailed(Exception):
        def __init__(self, inner):
            super().__init__("Training failed")
            self.worker_failures = {0: inner}

    class TaskError(Exception):
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    inner = DataError("data file 'x' has no rows")
    assert root_cause(WorkerFailed(TaskError(inner))) is inner
    plain = ValueError("x")
    assert root_cause(plain) is plain


def test_a_checkpoint_samples_on_its_configured_grid_and_on_another_on_request(capsys, tmp_path):
    """Issue 16: the sampling grid is the checkpoint's eval.sampling_grid unless --grid says otherwise, and
    the two grids really sample differently (the network sees other noise levels)."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from checkpoint_helpers import make_checkpoint, tiny_config

    cfg = tiny_config(tmp_path, "own")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sampling_grid="own"))
    run = tmp_path / "own"
    make_checkpoint(run, cfg=cfg)
    pngs = {}
    for extra, grid in (([], "own"), (["--grid", "common"], "common")):
        out = tmp_path / f"{grid}.png"
        rc, stdout, err = run_main(capsys, ["sample", str(run), "--out", str(out), "--n", "4", "--steps", "3", *extra])
        assert rc == 0, err
        assert f"(ddim, 3 network evaluations per image, {grid} grid)" in stdout
        with Image.open(out) as im:
            pngs[grid] = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(pngs["own"] - pngs["common"]).max() > 0
