"""bench/sampling.py end to end on a tiny checkpoint: one JSON per (arm, sampler, budget), resumable,
the same starting noise per batch for every sampler, and the report's results.json keys."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from ray_helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import sampling as bench  # noqa: E402

pytestmark = [pytest.mark.usefixtures("torch_single_thread_module"),
              pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def test_every_sampler_of_an_arm_starts_each_batch_from_the_same_noise():
    """Batch b's generator is seeded (seed, b): DDPM's ancestral draws do not shift the next batch's x_T."""
    from checkpoint_helpers import tiny_config

    from akod_ray.diffusion.process import DiffusionProcess
    from akod_ray.diffusion.schedules import cosine_betas

    cfg = tiny_config(REPO)
    T = cfg.diffusion.T
    process = DiffusionProcess(cosine_betas(T))
    inputs: dict[str, list[torch.Tensor]] = {}

    class Recorder(torch.nn.Module):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def forward(self, x, cond):
            inputs.setdefault(self.name, []).append(x.clone())
            return torch.zeros_like(x)

    for name, evals in (("ddpm", T), ("ddim", 3), ("heun", 3), ("adaptive", 3)):
        bench.generate(cfg, Recorder(name), process, 5, 7, 2, name, 3, "common")  # batches of 2, 2, 1
        assert len(inputs[name]) == 3 * evals
        inputs[name] = [inputs[name][b * evals] for b in range(3)]  # each batch's x_T
    for name in ("ddim", "heun", "adaptive"):
        for ours, ddpm in zip(inputs[name], inputs["ddpm"]):
            torch.testing.assert_close(ours, ddpm, rtol=1e-6, atol=1e-6)
    assert not torch.equal(inputs["ddim"][0][:1], inputs["ddim"][1][:1])


def test_bench_runs_resumes_and_reports(tmp_path, capsys):
    from checkpoint_helpers import make_checkpoint

    run = tmp_path / "arm_a"
    make_checkpoint(run)
    out, results = tmp_path / "bench", tmp_path / "results.json"
    argv = [str(run), "--n", "8", "--nfe", "3", "5", "--samplers", "ddim", "dpmpp_2m", "heun", "adaptive",
            "--batch", "4", "--out", str(out)]
    assert bench.main(argv) == 0
    files = sorted(p.name for p in (out / "results").glob("*.json"))
    assert files == sorted([f"arm_a__{s}__{b}.json" for s in ("ddim", "dpmpp_2m", "heun", "adaptive") for b in (3, 5)]
                           + ["arm_a__ddpm__50.json"])
    heun = json.loads((out / "results" / "arm_a__heun__5.json").read_text())
    assert heun["nfe"] == 5 and heun["budget"] == 5 and heun["sampling_grid"] == "common" and heun["n"] == 8
    assert heun["fid_c10"] > 0 and heun["wall_s_per_image"] > 0
    capsys.readouterr()
    assert bench.main(argv) == 0  # resumable: nothing is sampled again
    assert capsys.readouterr().out.count("done before, skipped") == len(files)
    assert bench.main(["--report", "--out", str(out), "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    assert data["sampler_best_nfe5_vs_ddim5_fid_c10_ratio"] <= 1.0
    assert data["sampler_best_nfe5"] in ("ddim", "dpmpp_2m", "heun")
    assert "sampler_adaptive_vs_best_fid_c10_ratio_nfe10" not in data  # no budget 10 measured
    assert data["sampler_fid_c10_n"] == 8 and "_details_sampling" in data and "sampler_best_nfe20" not in data
    assert (out / "report.md").is_file() and (out / "fid_c10_vs_nfe.png").stat().st_size > 5000


def test_timing_times_every_cell_side_by_side_and_the_report_prefers_it(tmp_path):
    from checkpoint_helpers import make_checkpoint

    run = tmp_path / "arm_a"
    make_checkpoint(run)
    out, results = tmp_path / "bench", tmp_path / "results.json"
    cell = [str(run), "--nfe", "20", "--samplers", "ddim", "heun", "--out", str(out)]
    assert bench.main(cell + ["--n", "4", "--batch", "4", "--no-reference"]) == 0
    assert bench.main(cell + ["--timing", "--n", "2", "--rounds", "2"]) == 0
    timed = json.loads((out / "timing.json").read_text())
    assert sorted(timed["per_image_s"]) == ["ddim_20", "ddpm_50", "heun_20"]  # DDPM over all T = 50 steps
    assert all(len(v) == 2 and min(v) > 0 for v in timed["all_s"].values())
    assert timed["per_image_s"]["ddim_20"] == pytest.approx(sorted(timed["all_s"]["ddim_20"])[0] / 2 + sorted(timed["all_s"]["ddim_20"])[1] / 2)
    cells = {p.name for p in (out / "results").glob("*.json")}
    assert cells == {"arm_a__ddim__20.json", "arm_a__heun__20.json"}  # timing writes no quality cell
    assert bench.main(["--report", "--out", str(out), "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    assert data["sampler_wall_s_per_image_nfe20_ddim"] == pytest.approx(timed["per_image_s"]["ddim_20"], abs=1e-5)
    assert data["sampler_wall_s_per_image_ddpm"] == pytest.approx(timed["per_image_s"]["ddpm_50"], abs=1e-5)
    md = (out / "report.md").read_text()
    assert "## Wall time per image, side by side" in md and "| heun_20 |" in md


def test_bad_rounds_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--timing", "--rounds", "0"])
    assert e.value.code == 2 and "--rounds and --n must be >= 1" in capsys.readouterr().err
