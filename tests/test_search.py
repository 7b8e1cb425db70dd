"""What a user would do instead of AKOD (issue 22, item 4): Tune + Optuna over a fixed schedule's parameters,
with Tune's ASHA; the search box checked before anything starts; resume from the project's own files."""

from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

import pytest
import yaml

from akod_ray.cli import main
from akod_ray.config import config_from_dict, load_config
from akod_ray.errors import ConfigError
from ray_helpers import REPO, akod_cmd, akod_env, assert_one_clear_error, read_jsonl, tiny_procedural

SEARCH = tiny_procedural(
    diffusion={"T": 1000},
    train={"lr": 0.002, "warmup_steps": 0, "log_every": 2, "ckpt_every": 4, "sample_every": 100},
    eval={"fid_every": 4},
    sweep={"name": "search", "arms": ["laplace"], "budget": 96, "max_concurrent_trials": 1, "search": "optuna",
           "num_samples": 3, "search_space": ["diffusion.laplace_scale=0.6:2.0:log", "diffusion.laplace_loc=-1.5:0.5"],
           "scheduler": "asha", "asha_grace": 0.34, "metric": "ref_loss"},
)
KEYS = ("diffusion.laplace_scale", "diffusion.laplace_loc")


@pytest.mark.parametrize("sets, pattern", [
    (["sweep.search=optuna"], r"sweep\.arms must list one fixed-schedule arm with sweep\.search=optuna .*"),
    (["sweep.search=optuna", "sweep.arms=[akod]"], r"sweep\.arms must list one fixed-schedule arm .*"),
    (["sweep.search=optuna", "sweep.arms=[laplace]", "sweep.seeds=[0,1]"],
     r"sweep\.seeds must list one seed with sweep\.search=optuna, got \(0, 1\)"),
    (["sweep.search=optuna", "sweep.arms=[cosine]"],
     r"sweep\.search_space searches diffusion\.laplace_scale, which only the laplace arm uses, .*"),
    (["sweep.search=optuna", "sweep.arms=[laplace]", "sweep.search_space=[diffusion.laplace_loc=-1:1.5]"],
     r"sweep\.search_space: the corner diffusion\.laplace_loc=1\.5 of the search box is not a valid laplace trial: "
     r"diffusion\.laplace_loc: the laplace schedule is invalid .*"),
    (["sweep.search_space=[train.lr=0.1:1]"], r"sweep\.search_space fields must be from .*, got 'train\.lr=0\.1:1'"),
    (["sweep.search_space=[diffusion.laplace_loc=1:-1]"], r"sweep\.search_space needs finite bounds with low < high.*"),
    (["sweep.search_space=[diffusion.laplace_loc=-1:1:log]"], r"sweep\.search_space needs low > 0 on a log scale.*"),
    (["sweep.search_space=[diffusion.laplace_loc]"], r"sweep\.search_space entries must look like .*"),
    (["sweep.scheduler=asha"], r"sweep\.scheduler must be 'none' with sweep\.search=grid \(an arm comparison gives "
                               r"every arm its whole budget\), got 'asha'"),
    (["sweep.search=optuna", "sweep.arms=[laplace]", "sweep.scheduler=asha"],
     r"eval\.fid_every must be > 0 with sweep\.scheduler=asha and sweep\.metric=fid_c10 .*"),
    (["sweep.metric=fid_c10_final"], r"sweep\.metric can be fid_c10_final only with sweep\.referee_samples >= 2.*"),
    (["sweep.search=bayes"], r"sweep\.search must be one of \('grid', 'optuna'\), got 'bayes'"),
])
def test_a_bad_search_is_refused_naming_the_field(sets, pattern):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert __import__("re").fullmatch(pattern, str(e.value)), str(e.value)


def test_the_cpu_search_config_is_the_science_setup():
    """tune_configs/laplace_search.yaml trains as bench/akod_science.py's BASE does and judges by its referee."""
    cfg = load_config(REPO / "tune_configs" / "laplace_search.yaml")
    assert (cfg.model.channels, cfg.train.batch_size, cfg.train.lr, cfg.train.ema_decay, cfg.train.bf16) == \
        ((16, 32, 32, 64), 32, 5e-4, 0.995, True)
    assert (cfg.train.budget_clock, cfg.sweep.budget_kind, cfg.sweep.budget, cfg.run.num_cpus) == ("cpu", "seconds", 360, 1)
    assert (cfg.eval.sampler, cfg.eval.sampler_steps, cfg.eval.sampling_grid) == ("heun", 20, "common")
    assert (cfg.sweep.metric, cfg.sweep.referee_samples, cfg.sweep.max_concurrent_trials) == ("fid_c10_final", 2000, 1)
    assert cfg.train.steps == 6000  # bench/akod_science.py step_cap(360): a cap that never binds at 360 CPU-s


def test_an_unfinished_trial_is_asked_again_in_its_folder_and_finished_ones_are_told(tmp_path):
    """The resume plan of a search, from run folders alone: finished trials (summary.json) with their values and
    result, unfinished ones (config.yaml, no summary) with their values and run id; Optuna is told the first
    and asks the second first."""
    from akod_ray.config import save_config
    from akod_ray.sweep.search import make_searcher, plan_search, run_id_of, values_key
    from akod_ray.sweep.trial import search_space, trial_config
    from akod_ray.sweep.tuner import write_summary

    cfg = config_from_dict(SEARCH)
    runs, point = tmp_path / "runs", search_space(cfg)[0]
    done_values, open_values = {KEYS[0]: 0.9, KEYS[1]: -0.25}, {KEYS[0]: 1.3, KEYS[1]: 0.125}
    finished = trial_config(cfg, point, str(runs), "aaaa0001", done_values)
    save_config(finished, finished.run_dir)
    write_summary(finished.run_dir, {"ref_loss": 0.5, "step": 12, **done_values})
    unfinished = trial_config(cfg, point, str(runs), "bbbb0002", open_values)
    save_config(unfinished, unfinished.run_dir)
    (runs / "laplace_s0-cccc0003").mkdir()  # never wrote its config: nothing to resume
    done, pending = plan_search(cfg, runs)
    assert [(r["trial"], r["ref_loss"], r[KEYS[0]]) for r in done] == [("laplace_s0-aaaa0001", 0.5, 0.9)]
    assert pending == [(open_values, "bbbb0002")]

    searcher = make_searcher(cfg, done, pending)
    suggested = searcher.suggest("t1")
    assert suggested == {"search": open_values}
    config = {"trial": {"point": point}, **suggested}
    assert run_id_of(config, "t1", {values_key(open_values): "bbbb0002"}) == "bbbb0002"  # its old folder
    assert run_id_of({"trial": {"point": point}, "search": done_values}, "t2", {}) == "t2"
    told = [t for t in searcher._ot_study.get_trials() if t.state.name == "COMPLETE"]
    assert [(t.value, t.params) for t in told] == [(0.5, {"search/" + k: v for k, v in done_values.items()})]


def test_every_result_carries_the_searched_metric():
    """Tune refuses a result without its searcher's metric; fid_c10 comes every eval.fid_every steps while Train
    reports every log interval: the latest value rides along, NaN before the first."""
    from akod_ray.sweep.search import ProgressReportCallback

    sent = []
    callback = ProgressReportCallback.__new__(ProgressReportCallback)  # outside a Tune session
    callback._training_actor_item_queue = SimpleNamespace(put=sent.append)
    callback.latest = {"fid_c10": math.nan}
    for record in ({"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.9, "fid_c10": 30.0}, {"step": 6, "loss": 0.8}):
        callback.after_report(None, [record], None)
    assert math.isnan(sent[0]["fid_c10"]) and [r.get("fid_c10") for r in sent[1:]] == [30.0, 30.0]
    assert [r["step"] for r in sent] == [2, 4, 6]


def test_a_search_without_a_valid_box_never_starts(capsys, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SEARCH))
    code = main(["sweep", str(path), "--set", f"run.root={tmp_path}", "--set",
                 "sweep.search_space=[diffusion.laplace_scale=0.5:1:log]"])
    assert code == 2
    assert_one_clear_error(capsys.readouterr().err, r"akod: error: sweep\.search_space: the corner "
                                                    r"diffusion\.laplace_scale=0\.5 of the search box .*")
    assert not (tmp_path / "search").exists()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_optuna_search_with_asha_runs_and_resumes(tmp_path):
    """Three trials of Tune + Optuna over the laplace schedule's scale and centre with ASHA on ref_loss, then
    --resume with sweep.num_samples=4: the three are kept (told to Optuna), one more runs, with new values."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SEARCH))
    cmd = akod_cmd("sweep", str(path), "--set", f"run.root={tmp_path}")
    first = subprocess.run(cmd, cwd=REPO, env=akod_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[akod] search: best of 3 trials: diffusion.laplace_scale=" in first.stdout
    sweep, runs = tmp_path / "search", tmp_path / "search" / "runs"
    folders = sorted(runs.iterdir())
    assert len(folders) == 3 and all(f.name.startswith("laplace_s0-") for f in folders)
    trials = {}
    for f in folders:
        saved = yaml.safe_load((f / "config.yaml").read_text())
        values = (saved["diffusion"]["laplace_scale"], saved["diffusion"]["laplace_loc"])
        assert saved["diffusion"]["schedule"] == "laplace" and 0.6 <= values[0] <= 2.0 and -1.5 <= values[1] <= 0.5
        summary = json.loads((f / "summary.json").read_text())  # written by the trial, or for it when ASHA stopped it
        assert (summary[KEYS[0]], summary[KEYS[1]]) == values
        # a trial ASHA stopped may log a record or two more before its workers are gone: its summary holds the
        # record of the step it had reached when stopped
        at_step = [r["ref_loss"] for r in read_jsonl(f / "metrics.jsonl") if r["step"] == summary["step"] and "ref_loss" in r]
        assert at_step == [summary["ref_loss"]]
        trials[f.name] = values
    assert len(set(trials.values())) == 3
    table = (sweep / "sweep_table.md").read_text().splitlines()
    assert table[0].startswith("| trial | diffusion.laplace_scale | diffusion.laplace_loc | arm |")
    column = [c.strip() for c in table[0].split("|")].index("ref_loss")
    losses = [float(line.split("|")[column]) for line in table[2:]]
    assert losses == sorted(losses)  # best first

    before = {f.name: (f / "metrics.jsonl").read_text() for f in folders}
    second = subprocess.run([*cmd, "--set", "sweep.num_samples=4", "--resume"], cwd=REPO, env=akod_env(),
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[akod] search: best of 4 trials" in second.stdout
    assert {f.name: (f / "metrics.jsonl").read_text() for f in folders} == before  # finished trials were kept
    (new,) = set(runs.iterdir()) - set(folders)
    saved = yaml.safe_load((new / "config.yaml").read_text())["diffusion"]
    assert (saved["laplace_scale"], saved["laplace_loc"]) not in trials.values()
    assert (new / "summary.json").is_file() and len((sweep / "sweep_table.md").read_text().splitlines()) == 6


def test_asha_cuts_at_rungs_of_the_budget_in_steps_or_budget_seconds():
    from akod_ray.sweep.search import make_scheduler

    assert make_scheduler(config_from_dict({**SEARCH, "sweep": {**SEARCH["sweep"], "scheduler": "none"}})) is None
    asha = make_scheduler(config_from_dict(SEARCH))  # 96 images of 8: 12 steps, the first cut at 34%
    assert (asha._time_attr, asha._metric, asha._max_t) == ("step", "ref_loss", 12)
    assert [m for m, _ in asha._brackets[0]._rungs] == [pytest.approx(4.08)]
    timed = config_from_dict({**SEARCH, "sweep": {**SEARCH["sweep"], "budget_kind": "seconds", "budget": 360,
                                                    "asha_grace": 0.1}})
    asha = make_scheduler(timed)
    assert (asha._time_attr, asha._max_t) == ("budget_s", 360.0)
    assert [m for m, _ in asha._brackets[0]._rungs] == [pytest.approx(324.0), pytest.approx(108.0), pytest.approx(36.0)]


def test_the_search_referee_scores_a_trial_as_the_science_experiment_scores_a_run(tmp_path):
    """sweep.referee_samples judges a trial exactly as bench/akod_science.py's final fid_c10 judges a run: the same
    EMA samples from the same starting noise (seed 10,000 + train.seed), so the same fid_c10."""
    import dataclasses
    import sys

    from checkpoint_helpers import make_checkpoint, tiny_config
    from ray_helpers import REPO

    from akod_ray.sweep.trial import referee

    sys.path.insert(0, str(REPO / "bench"))
    import akod_science

    cfg = tiny_config(tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=3))
    make_checkpoint(cfg.run_dir, cfg=cfg)
    got = referee(cfg, 16)
    assert math.isfinite(got["fid_c10_final"]) and got["fid_c10_final_n"] == 16
    assert got["fid_c10_final"] == akod_science.final_fid(cfg, 16, 3)["fid_c10_final"]
    assert got != referee(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=4)), 16)  # other noise
