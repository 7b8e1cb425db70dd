"""FID spread over workers, and Inception FID where the weights are (issue 23, item 3): two workers sample the
images one worker samples; the in-run record holds Inception FID with stand-in weights; without weights one
line says so, and the sweep table and report show fid_c10 only."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from akod_ray.config import Config
from akod_ray.evaluation import fid as F
from akod_ray.evaluation import fid_run
from akod_ray.evaluation.sampling import sample_chunks
from akod_ray.models.unet import UNet
from checkpoint_helpers import checkpoint_state, tiny_config
from inception_helpers import standin_inception_weights

pytestmark = pytest.mark.usefixtures("torch_single_thread_module")

N = 10  # samples: chunk_size(10) = 2, five chunks


def tiny(tmp_path: Path, **eval_changes) -> tuple[Config, torch.nn.Module, object]:
    from akod_ray.diffusion.process import DiffusionProcess

    cfg = tiny_config(tmp_path)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sampler_steps=3, **eval_changes))
    state = checkpoint_state(cfg)
    model = UNet(cfg.model)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return cfg, model.eval(), DiffusionProcess(state["betas"])


def test_the_images_of_a_chunk_do_not_depend_on_how_many_workers_share_them(tmp_path):
    cfg, model, process = tiny(tmp_path)
    chunk = fid_run.chunk_size(N)
    one = dict(sample_chunks(cfg, model, process, N, 5, chunk=chunk))
    two = {**dict(sample_chunks(cfg, model, process, N, 5, chunk=chunk, rank=0, world_size=2)),
           **dict(sample_chunks(cfg, model, process, N, 5, chunk=chunk, rank=1, world_size=2))}
    three = {}
    for r in range(3):
        three.update(sample_chunks(cfg, model, process, N, 5, chunk=chunk, rank=r, world_size=3))
    assert sorted(one) == sorted(two) == sorted(three) == list(range(5))
    for c in one:
        assert torch.equal(one[c], two[c]) and torch.equal(one[c], three[c])
    assert sum(len(x) for x in one.values()) == N
    assert fid_run.chunk_size(50_000) == 256 and fid_run.chunk_size(1000) == 125 and fid_run.chunk_size(3) == 1


def test_feature_sums_give_numpys_statistics():
    acts = np.random.default_rng(0).normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 3.0
    sums = fid_run.FeatureSums.zeros(6)
    for part in np.array_split(acts, 7):
        sums.add(part)
    back = fid_run.FeatureSums.from_flat(sums.flat(), 6).statistics("x", "impl")
    ref = F.statistics(acts)
    np.testing.assert_allclose(back.mu, ref.mu, rtol=1e-12)
    np.testing.assert_allclose(back.sigma, ref.sigma, rtol=1e-10, atol=1e-12)
    assert back.n == 40


def _worker(rank: int, world: int, store: str, out: str, cfg_dict: dict, state: dict) -> None:
    """One of two gloo processes: its share of the samples, the sums gathered, rank 0 writes the FID."""
    import torch.distributed as dist

    from akod_ray.config import config_from_dict
    from akod_ray.diffusion.process import DiffusionProcess

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    class Env:
        device = torch.device("cpu")

        def __init__(self):
            self.rank, self.world_size = rank, world

        def gather(self, tensor):
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.cat(parts)

    cfg = config_from_dict(cfg_dict)
    model = UNet(cfg.model)
    model.load_state_dict(state)
    results = fid_run.sample_fid(cfg, model.eval(), DiffusionProcess(state_betas(cfg)), N, 5, Env(),
                                 {"c10": F.default_c10_reference()})
    if rank == 0:
        Path(out).write_text(json.dumps({"value": results["c10"].value, "n": results["c10"].n}))
    else:
        assert results == {}
    dist.destroy_process_group()


def state_betas(cfg):
    from akod_ray.diffusion.schedules import cosine_betas

    return cosine_betas(cfg.diffusion.T)


@pytest.mark.timeout(300)
def test_two_workers_give_the_fid_of_one_worker(tmp_path):
    """Two real processes (gloo), each sampling its share: rank 0 gathers the sums; the FID equals one
    process's up to the order of float64 additions."""
    import torch.multiprocessing as mp

    from akod_ray.config import config_to_dict
    from akod_ray.evaluation.feature_net import DEFAULT_C10_REFERENCE

    if not DEFAULT_C10_REFERENCE.is_file():
        pytest.skip("the shipped fid_c10 reference statistics are missing")
    cfg, model, process = tiny(tmp_path)
    one = fid_run.sample_fid(cfg, model, process, N, 5, fid_run.SingleProcess(), {"c10": F.default_c10_reference()})
    out = tmp_path / "two.json"
    sys.path.insert(0, str(Path(__file__).parent))
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(out), config_to_dict(cfg), model.state_dict()),
                       nprocs=2, start_method="spawn")
    two = json.loads(out.read_text())
    assert two["n"] == one["c10"].n == N
    assert two["value"] == pytest.approx(one["c10"].value, rel=1e-9)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    return standin_inception_weights(tmp_path_factory.mktemp("inception") / "standin_inception.pth")


def test_an_in_run_evaluation_records_inception_fid_with_the_weights(tmp_path, inception_weights, monkeypatch):
    """The record gets Inception FID through the stand-in weights. The Frechet distance itself is pytorch-fid's
    (tests/test_fid.py); here a closed form stands in for it: a 2048-d matrix square root takes a minute here."""
    from akod_ray.data.procedural import procedural_images

    monkeypatch.setenv(F.WEIGHTS_ENV, str(inception_weights))
    monkeypatch.setattr(F, "frechet_distance", lambda a, b: float(((a.mu - b.mu) ** 2).sum() + a.n))
    ref = F.image_stats(procedural_images(6, seed=3), "inception", "stand-in reference", batch_size=6)
    ref_path = ref.save(tmp_path / "ref.npz")
    cfg, model, process = tiny(tmp_path, fid_samples=4, inception_ref=str(ref_path))
    record = fid_run.evaluate_in_run(cfg, model, process, fid_run.SingleProcess(), step=4)
    assert record["fid_n"] == record["fid_c10_n"] == 4
    assert np.isfinite(record["fid"]) and record["fid"] > 0 and np.isfinite(record["fid_c10"])
    only_c10 = fid_run.evaluate_in_run(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fid="c10")),
                                       model, process, fid_run.SingleProcess(), step=4)
    assert "fid" not in only_c10 and only_c10["fid_c10"] == record["fid_c10"]  # the same samples


def test_the_driver_computes_the_inception_reference_once(tmp_path, inception_weights, monkeypatch):
    monkeypatch.setenv(F.WEIGHTS_ENV, str(inception_weights))
    cfg = tiny_config(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_subset=8))
    said = []
    ready = fid_run.prepare_inception_reference(cfg, None, tmp_path / "sweep", out=lambda line, **_: said.append(line))
    ref = tmp_path / "sweep" / fid_run.INCEPTION_REF_FILE
    assert ready.eval.inception_ref == str(ref) and F.load_reference_stats(ref).n == 8
    assert said == [f"[akod] Inception FID: reference statistics of the 8 training images -> {ref}"]
    stamp = ref.stat().st_mtime_ns
    again = fid_run.prepare_inception_reference(cfg, None, tmp_path / "sweep", out=lambda line, **_: said.append(line))
    assert again.eval.inception_ref == str(ref) and ref.stat().st_mtime_ns == stamp and len(said) == 1
    c10 = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fid="c10"))
    assert fid_run.prepare_inception_reference(c10, None, tmp_path / "other") == c10


def test_without_weights_one_line_says_so_and_runs_record_fid_c10_only(tmp_path, monkeypatch):
    monkeypatch.delenv(F.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    cfg = tiny_config(tmp_path)
    said = []
    assert fid_run.prepare_inception_reference(cfg, None, tmp_path, out=lambda line, **_: said.append(line)) == cfg
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith("[akod] Inception FID: no pytorch-fid weights (AKOD_INCEPTION_WEIGHTS is not set and ")
    assert said[0].endswith("does not exist); runs record fid_c10 only") and "empty_torch_home" in said[0]
    assert not list(tmp_path.glob("*.npz"))


def test_the_sweep_table_shows_inception_fid_beside_fid_c10_only_when_recorded(tmp_path):
    import csv

    from akod_ray.sweep.tuner import write_table

    with_fid = [{"trial": "a_s0", "arm": "a", "fid_c10": 1.5, "fid_c10_n": 8, "fid": 301.25, "fid_n": 8},
                {"trial": "b_s0", "arm": "b", "fid_c10": 2.5, "fid_c10_n": 8, "fid": float("nan"), "fid_n": 0}]
    csv_path, md_path = write_table(with_fid, tmp_path)
    header = next(csv.reader(csv_path.open()))
    assert header[header.index("fid_c10"):header.index("fid_n") + 1] == ["fid_c10", "fid_c10_n", "fid", "fid_n"]
    assert "| 301.2 | 8 |" in md_path.read_text()
    header = next(csv.reader(write_table(with_fid, tmp_path, fid="inception")[0].open()))
    assert "fid" in header and "fid_c10" not in header
    without = [{**r, "fid": float("nan"), "fid_n": 0} for r in with_fid]
    header = next(csv.reader(write_table(without, tmp_path)[0].open()))
    assert "fid_c10" in header and "fid" not in header and "fid_n" not in header


def test_the_report_says_when_no_run_recorded_inception_fid(tmp_path):
    import yaml

    from akod_ray.reporting.report import write_report

    for name, fid in (("a", "both"), ("b", "both")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"fid": fid}, "diffusion": {"schedule": "cosine"}}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
            {"step": 2, "wall_s": 1.0, "ref_loss": 0.5}, {"step": 4, "wall_s": 2.0, "ref_loss": 0.4, "fid_c10": 3.0,
                                                          "fid_c10_n": 8}]) + "\n")
    text = write_report(tmp_path).read_text()
    assert "Inception FID: no run recorded it (the pytorch-fid weights were not found" in text
    rec = tmp_path / "b" / "metrics.jsonl"
    rec.write_text(rec.read_text() + json.dumps({"step": 4, "wall_s": 2.0, "fid": 200.0, "fid_n": 8}) + "\n")
    text = write_report(tmp_path).read_text()
    assert "no run recorded it" not in text and "final FID (N)" in text


def test_progress_of_a_single_process_fid_is_plain_lines_in_a_log(tmp_path, capfd, monkeypatch):
    from akod_ray import progress

    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    cfg, model, process = tiny(tmp_path)
    fid_run.sample_fid(cfg, model, process, N, 5, fid_run.SingleProcess(), {"c10": F.default_c10_reference()},
                       progress_desc="fid samples")
    out = capfd.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("[akod] fid samples:")]
    assert "\r" not in out and len(lines) == 5  # one line per chunk of 2: each crosses a fifth (two tenths)
    assert lines[-1].startswith("[akod] fid samples: 10/10 images (100%) in ")
