"""`akod export` and AKODPipeline (issue 23, item 1): the exported folder is diffusers' layout in JSON and
safetensors; a fresh process with diffusers and akod_ray.pipeline loads it and samples what `akod sample`
samples; any diffusers scheduler drives the AKOD U-Net on its own grid."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from akod_ray.cli import main
from akod_ray.config import ModelConfig
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.evaluation.sampling import sample_checkpoint
from checkpoint_helpers import checkpoint_state, make_checkpoint, tiny_config
from ray_helpers import akod_env

pytestmark = [pytest.mark.usefixtures("torch_single_thread_module"),
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")]

AKOD_MODEL = dict(msfi=True, beta_modulation=True)  # the AKOD U-Net: MSFI and the beta modulation on


def trained_looking_run(root: Path, name: str = "run", **changes) -> Path:
    """A tiny run folder whose checkpoint's EMA weights are all non-zero (a fresh U-Net's zero-initialized
    output layer would predict eps = 0 and hide the network), ``changes`` applied to its config sections."""
    cfg = tiny_config(root, name)
    for section, values in changes.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    state = checkpoint_state(cfg)
    g = torch.Generator().manual_seed(1)
    state["ema"]["shadow"] = [s + 0.05 * torch.randn(s.shape, generator=g) for s in state["ema"]["shadow"]]
    make_checkpoint(root / name, state, cfg=cfg)
    return root / name


def export(run: Path, out: Path) -> Path:
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images / 2 + 0.5).clamp(0, 1)


def test_the_export_is_diffusers_layout_in_json_and_safetensors(tmp_path, capsys):
    run = trained_looking_run(tmp_path, model=AKOD_MODEL)
    out = export(run, tmp_path / "export")
    assert "AKODPipeline.from_pretrained" in capsys.readouterr().out
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "AKODPipeline" and index["unet"] == ["akod_ray.pipeline", "AKODUNet"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]  # the run's sampler (eval.sampler: ddim)
    # No file needs pickle: JSON, and safetensors (an 8-byte length, a JSON header, raw tensor bytes).
    for name in files:
        data = (out / name).read_bytes()
        if name.endswith(".json"):
            json.loads(data)
        else:
            (n,) = struct.unpack("<Q", data[:8])
            assert all(v["dtype"] == "F32" for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__")
    # The training schedule, exactly (float64 in JSON), in the scheduler and in the U-Net's config.
    from akod_ray.training.checkpoint import latest_checkpoint, load_state

    betas = load_state(latest_checkpoint(run))["betas"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert torch.equal(torch.tensor(sched["trained_betas"], dtype=torch.float64), betas)
    assert torch.equal(torch.tensor(unet["training_betas"], dtype=torch.float64), betas)
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= set(unet) and unet["msfi"] is True


FRESH = textwrap.dedent("""
    import sys
    import diffusers
    import torch
    from akod_ray.pipeline import AKODPipeline
    from safetensors.torch import save_file

    folder, out, n, seed, steps, sampler = sys.argv[1:]
    pipe = AKODPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(int(seed))
    images = pipe(batch_size=int(n), generator=g, num_inference_steps=int(steps), sampler=sampler, output_type="pt")
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = dpm
    swapped = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt")
    save_file({"images": images.images, "dpm": swapped.images}, out)
    print("modules:", " ".join(sorted(m for m in sys.modules if m.startswith("akod_ray"))))
""")


@pytest.mark.timeout(300)
def test_a_fresh_process_loads_the_export_and_samples_what_akod_sample_samples(tmp_path):
    """Only diffusers and akod_ray.pipeline are imported; the run's own sampler, seed and budget give the
    images of `akod sample` within 1e-5; DPM-Solver++ swapped in gives finite images in range."""
    from safetensors.torch import load_file

    run = trained_looking_run(tmp_path, model=AKOD_MODEL, eval=dict(sampler="ddim", sampler_steps=5))
    out = export(run, tmp_path / "export")
    n, seed, steps = 3, 11, 5
    proc = subprocess.run([sys.executable, "-c", FRESH, str(out), str(tmp_path / "x.safetensors"), str(n), str(seed),
                           str(steps), "ddim"], capture_output=True, text=True, cwd=tmp_path,
                          env=akod_env(OMP_NUM_THREADS="1"),  # one thread, as this module's: the same float32 sums
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_file(tmp_path / "x.safetensors")
    assert "akod_ray.training" not in proc.stdout and "akod_ray.evaluation" not in proc.stdout, proc.stdout
    ours, _ = sample_checkpoint(run, n, seed, sampler="ddim", steps=steps)  # the `akod sample` path
    assert loaded["images"].shape == (n, 3, 32, 32)
    assert (loaded["images"] - to_unit(ours)).abs().max().item() <= 1e-5
    dpm = loaded["dpm"]
    assert dpm.shape == (2, 3, 32, 32) and torch.isfinite(dpm).all() and dpm.min() >= 0 and dpm.max() <= 1


@pytest.mark.parametrize("sampler, steps, grid, noise_cond", [
    ("ddpm", 0, "common", "level"), ("dpmpp_2m", 6, "common", "level"), ("heun", 5, "own", "level"),
    ("adaptive", 4, "common", "level"), ("ddim", 5, "own", "level"), ("unipc", 5, "common", "schedule"),
    ("ddim", 5, "own", "schedule")])
def test_every_sampler_of_the_run_gives_the_images_of_akod_sample(tmp_path, sampler, steps, grid, noise_cond):
    from akod_ray.pipeline import AKODPipeline

    run = trained_looking_run(tmp_path, model=dict(AKOD_MODEL, noise_cond=noise_cond),
                              eval=dict(sampler=sampler, sampler_steps=max(steps, 1), sampling_grid=grid))
    pipe = AKODPipeline.from_pretrained(export(run, tmp_path / "export"))
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), sampler=sampler, output_type="pt").images
    ours, _ = sample_checkpoint(run, 2, 4)
    assert (got - to_unit(ours)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("noise_cond", ["level", "schedule"])
def test_the_akod_unet_samples_on_a_grid_other_than_its_training_schedule(tmp_path, noise_cond):
    """MSFI on; a scheduler built from diffusers' own linear betas over 1,000 steps (the run trained on 50
    cosine steps). The network gets the conditioning of the noise level it is given: for a ``level`` network
    (lambda, level_cond(lambda)); for a ``schedule`` network the training schedule's columns at lambda."""
    import diffusers

    from akod_ray.models.unet import level_cond
    from akod_ray.pipeline import AKODPipeline

    run = trained_looking_run(tmp_path, model=dict(AKOD_MODEL, noise_cond=noise_cond))
    pipe = AKODPipeline.from_pretrained(export(run, tmp_path / "export"))
    pipe.set_progress_bar_config(disable=True)
    for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler, diffusers.EulerDiscreteScheduler):
        pipe.scheduler = cls(num_train_timesteps=1000, beta_schedule="linear")
        seen = []
        inner = pipe.unet.unet
        forward = inner.forward
        inner.forward = lambda x, cond: (seen.append(cond.clone()), forward(x, cond))[1]
        try:
            images = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
        finally:
            del inner.forward
        assert images.shape == (2, 32, 32, 3) and (images >= 0).all() and (images <= 1).all(), cls.__name__
        assert len(seen) == 8
        lam = torch.cat([c[:, 0] for c in seen]).double()
        linear = DiffusionProcess(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
        assert lam.min() >= linear.log_snr[-1] - 1e-3 and lam.max() <= linear.log_snr[0] + 1e-3  # its grid, not 50 cosine steps
        want = level_cond(lam, 0.02) if noise_cond == "level" else pipe.unet.process.cond_at_logsnr(lam)
        torch.testing.assert_close(torch.cat(seen), want, rtol=1e-5, atol=1e-6)
    pil = pipe(batch_size=2, num_inference_steps=3).images  # PIL images by default, as DDPMPipeline returns
    assert len(pil) == 2 and pil[0].size == (32, 32) and pil[0].mode == "RGB"


def test_the_unet_is_a_diffusers_model_that_saves_and_loads(tmp_path):
    from akod_ray.models.unet import UNet
    from akod_ray.pipeline import MODEL_FIELDS, AKODUNet

    cfg = ModelConfig(channels=(8, 8, 16, 16), bottleneck_channels=16, num_res_blocks=1, attention_resolutions=(16,),
                      dropout=0.0, msfi=True, beta_modulation=True)
    torch.manual_seed(0)
    unet = UNet(cfg)
    model = AKODUNet.from_unet(unet)
    model.save_pretrained(tmp_path / "unet")
    back = AKODUNet.from_pretrained(tmp_path / "unet")
    assert back.model_config == cfg and set(MODEL_FIELDS) == {f.name for f in dataclasses.fields(ModelConfig)}
    x = torch.randn(2, 3, 32, 32)
    lam = torch.tensor([-3.0, 2.0])
    from akod_ray.models.unet import level_cond

    torch.testing.assert_close(back(x, lam).sample, unet(x, level_cond(lam, cfg.level_offset)), rtol=0, atol=0)
    with pytest.raises(Exception, match="noise_cond=schedule reads its training schedule"):
        AKODUNet(channels=[8, 8, 16, 16], bottleneck_channels=16, noise_cond="schedule")


def test_export_refuses_a_folder_that_is_not_an_export_and_replaces_an_earlier_one(tmp_path, capsys):
    run = trained_looking_run(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"akod: error: --out '{busy}' exists and is not an earlier export (no model_index.json); give a new folder"
    assert (busy / "notes.txt").read_text() == "mine"
    out = export(run, tmp_path / "export")
    (out / "unet" / "stale.txt").write_text("x")
    export(run, out)
    assert not (out / "unet" / "stale.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e2")]) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "e2").exists()
