"""bench/gpu_train.py on the CPU: its quick mode runs and writes its JSON, its figures are the
documented arithmetic, and its import chain works on a machine without Ray, Pillow,
torchvision, TensorBoard or pytorch-fid (the GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ray_helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_train  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_quick_cpu_run_writes_the_figures(tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = gpu_train.main(["--device", "cpu", "--quick", "--out", str(out), "--variants", "train_step_b64,fast_eager_b64"])
    data = json.loads(out.read_text())
    assert rc == 0 and data["errors"] == {}
    assert data["device_type"] == "cpu" and data["torch"] and data["device"] and data["quick"] is True
    assert set(data["variants"]) == {"train_step_b4", "fast_eager_b4"}  # quick: b64 -> 4, b256 -> 8
    fast = data["variants"]["fast_eager_b4"]
    assert fast["fast_step"] == {"requested": "eager", "mode": "eager", "compiled": False, "captured": False,
                                 "fallback": None}
    assert fast["images_on_device"] is True and fast["host_syncs_per_step"] is None  # counted on CUDA only
    assert data["figures"] == {"gpu_train_img_per_s_b4": round(fast["img_per_s"], 1)}
    assert 0 < fast["loss"] < 10 and data["flops_per_image"] > 0
    printed = capsys.readouterr().out
    assert '"gpu_train_img_per_s_b4"' in printed and f"[bench] wrote {out}" in printed


def test_quick_cpu_run_of_the_loop_end_to_end(tmp_path):
    """The training loop through LocalEnv, 6 steps of a small U-Net (a few seconds)."""
    out = tmp_path / "g.json"
    assert gpu_train.main(["--device", "cpu", "--quick", "--out", str(out), "--variants", "fast_eager_b64,loop_b64"]) == 0
    data = json.loads(out.read_text())
    loop = data["variants"]["loop_b4"]
    assert loop["steps"] == 6 and loop["log_every"] == 2 and len(loop["records_img_per_s"]) == 3
    assert loop["config"]["compile"] == "auto"
    assert data["figures"]["gpu_loop_vs_step_ratio"] == round(loop["img_per_s"] / data["variants"]["fast_eager_b4"]["img_per_s"], 3)


def test_figures_are_the_documented_arithmetic():
    out = {"flops_per_image": 33.9e9, "matmul_peak_tflops": 787.0, "variants": {
        "train_step_b64": {"batch": 64, "img_per_s": 1064.0},
        "fast_eager_b64": {"batch": 64, "img_per_s": 1500.0},
        "fast_reduce-overhead_b64": {"batch": 64, "img_per_s": 4219.0},
        "fast_default_b256": {"batch": 256, "img_per_s": 4000.0},
        "fast_reduce-overhead_b256": {"batch": 256, "img_per_s": 5862.0},
        "loop_b64": {"batch": 64, "img_per_s": 4100.0},
    }}
    f = gpu_train.figures(out, 64, 256, "reduce-overhead", "NVIDIA H200")
    assert f["gpu_train_img_per_s_b64"] == 4219.0  # the fastest fast_ variant, never train_step
    assert f["gpu_mfu_b256"] == round(5862 * 33.9e9 / 989.4e12, 4) == 0.2009  # the 20.1%
    assert f["gpu_mfu_b256_vs_matmul_peak"] == round(5862 * 33.9e9 / 787e12, 4)
    assert f["gpu_loop_vs_step_ratio"] == round(4100 / 4219, 3)
    assert "gpu_mfu_b256" not in gpu_train.figures(out, 64, 256, "reduce-overhead", "Some GPU")  # unknown peak


def test_imports_without_ray_and_the_optional_packages(tmp_path):
    """As on the GPU machine: every import of ray, PIL, torchvision, tensorboard or pytorch_fid fails;
    the bench still imports, installs its stand-ins, and the training loop imports."""
    code = f"""
import importlib.abc, sys
BLOCKED = ("ray", "PIL", "torchvision", "tensorboard", "pytorch_fid")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name.startswith("torch.utils.tensorboard"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(REPO / 'bench')!r})
import gpu_train
print(sorted(gpu_train.stub_missing_modules()))
from akod_ray.training import local, loop
assert not any(m.split(".")[0] == "ray" for m in sys.modules), [m for m in sys.modules if m.startswith("ray")]
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["['PIL',", "'tensorboard',", "'torchvision']", "ok"]


def test_merge_results_is_refused_off_cuda(tmp_path):
    with pytest.raises(SystemExit):
        gpu_train.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "g.json"), "--merge-results"])
