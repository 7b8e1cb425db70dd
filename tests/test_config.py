"""Typed configuration: YAML loading, --set overrides, validation naming the field, round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from akod_ray.config import (
    Config,
    DKOConfig,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    save_config,
)
from akod_ray.errors import AkodError, ConfigError

YAML = """
run:
  name: tiny
diffusion:
  T: 100
  schedule: cosine
  min_snr_gamma: 5
model:
  channels: [32, 32, 64, 64]
  bottleneck_channels: 64
  attention_resolutions: []
  msfi: false
dko:
  kernel_size: 5
train:
  steps: 200
  batch_size: 32
  lr: 0.0002
"""


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.diffusion.T == 1000 and cfg.diffusion.schedule == "linear"
    assert cfg.model.channels == (128, 256, 256, 512) and cfg.model.bottleneck_channels == 512
    assert cfg.dko.kernel_size == 7
    assert str(cfg.run_dir) == "runs/akod"


def test_load_yaml(tmp_path):
    cfg = load_config(write(tmp_path, YAML))
    assert cfg.run.name == "tiny"
    assert cfg.diffusion.T == 100 and cfg.diffusion.schedule == "cosine"
    assert cfg.diffusion.min_snr_gamma == 5.0 and isinstance(cfg.diffusion.min_snr_gamma, float)
    assert cfg.model.channels == (32, 32, 64, 64) and isinstance(cfg.model.channels, tuple)
    assert cfg.model.attention_resolutions == ()
    assert cfg.model.msfi is False and cfg.model.beta_modulation is True  # unset fields keep defaults
    assert cfg.dko.kernel_size == 5
    assert cfg.train.lr == 2e-4 and cfg.train.batch_size == 32
    assert cfg.eval == Config().eval


def test_set_overrides(tmp_path):
    path = write(tmp_path, YAML)
    cfg = load_config(path, ["train.steps=7", "model.channels=[8, 8, 16, 16]", "diffusion.min_snr_gamma=null",
                             "dko.hidden=[16]", "run.name=other", "model.msfi=true", "data.source=procedural"])
    assert cfg.train.steps == 7
    assert cfg.model.channels == (8, 8, 16, 16)
    assert cfg.diffusion.min_snr_gamma is None
    assert cfg.dko.hidden == (16,)
    assert cfg.run.name == "other" and cfg.model.msfi is True and cfg.data.source == "procedural"
    assert cfg.diffusion.schedule == "cosine"  # untouched fields of the file stay
    # The last override of a key wins; overrides of a section without a file section work too.
    assert load_config(None, ["train.steps=3", "train.steps=4"]).train.steps == 4


def test_apply_overrides_does_not_mutate_its_input():
    data = {"train": {"steps": 1}}
    out = apply_overrides(data, ["train.steps=2", "eval.grid_size=4"])
    assert data == {"train": {"steps": 1}}
    assert out == {"train": {"steps": 2}, "eval": {"grid_size": 4}}


def test_exponent_floats_are_numbers(tmp_path):
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4
    assert load_config(write(tmp_path, "train:\n  lr: 3e-4\n")).train.lr == 3e-4


@pytest.mark.parametrize(
    "text, key",
    [
        ("model:\n  widths: [1, 2]\n", "model.widths"),
        ("modle:\n  channels: [8, 8, 8, 8]\n", "modle"),
        ("train:\n  stepz: 3\n", "train.stepz"),
    ],
)
def test_unknown_key_in_file_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("override, key",
                         [("model.widths=[1]", "model.widths"), ("modle.channels=[8]", "modle.channels")])
def test_unknown_key_in_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", "train.steps must be an integer, got 'abc'"),
        ("train.steps=2.5", "train.steps must be an integer"),
        ("train.steps=true", "train.steps must be an integer"),
        ("train.lr=fast", "train.lr must be a number"),
        ("model.msfi=1", "model.msfi must be true or false"),
        ("model.channels=64", "model.channels must be a list"),
        ("model.channels=[a, b, c, d]", "model.channels must be an integer"),
        ("run.name=[1]", "run.name must be a string"),
        ("diffusion.min_snr_gamma=[1]", "diffusion.min_snr_gamma must be a number"),
    ],
)
def test_wrong_type_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.channels=[0, 8, 8, 8]", "model.channels"),
        ("model.channels=[-8, 8, 8, 8]", "model.channels"),
        ("model.channels=[8, 8, 8]", "model.channels"),
        ("model.channels=[12, 8, 8, 8]", "model.channels"),
        ("model.bottleneck_channels=0", "model.bottleneck_channels"),
        ("model.dropout=1.0", "model.dropout"),
        ("dko.kernel_size=6", "dko.kernel_size"),
        ("dko.kernel_size=1", "dko.kernel_size"),
        ("dko.bins=1", "dko.bins"),
        ("dko.logsnr_max=-20", "dko.logsnr_max"),
        ("dko.floor=0", "dko.floor"),
        ("diffusion.schedule=quadratic", "diffusion.schedule"),
        ("diffusion.schedule=file", "diffusion.schedule_file"),
        ("diffusion.T=1", "diffusion.T"),
        ("diffusion.min_snr_gamma=0", "diffusion.min_snr_gamma"),
        ("data.source=imagenet", "data.source"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=0", "train.lr"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("rl.reward=fid", "rl.reward"),
        ("eval.sampler=lms", "eval.sampler"),
        ("eval.ddim_eta=1.5", "eval.ddim_eta"),
        ("run.name=a/b", "run.name"),
    ],
)
def test_out_of_range_value_names_the_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')} "):
        load_config(None, [override])


def test_batch_size_must_split_over_workers_and_accumulation():
    with pytest.raises(ConfigError, match=r"train.batch_size must be divisible by .* = 6, got 64"):
        load_config(None, ["train.num_workers=3", "train.grad_accum=2"])
    assert load_config(None, ["train.num_workers=2", "train.grad_accum=2"]).train.batch_size == 64


def test_config_errors_are_value_errors_and_user_errors():
    with pytest.raises(ValueError):
        DKOConfig(kernel_size=4)
    with pytest.raises(AkodError):
        ModelConfig(channels=(8, 8))


@pytest.mark.parametrize("bad", ["train.steps", "train=3", "a.b.c=1", ".x=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [bad])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))
    assert load_config(write(tmp_path, "")) == Config()


def test_save_config_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, YAML), ["dko.hidden=[32, 16]", "eval.target_fid=12.5", "run.num_cpus=2"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml" and not list(path.parent.glob("*.tmp"))
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # Every field of every section is written, so the run directory records the whole config.
    data = yaml.safe_load(path.read_text())
    for section in dataclasses.fields(Config):
        assert set(data[section.name]) == {f.name for f in dataclasses.fields(getattr(cfg, section.name))}


def test_save_config_round_trip_of_defaults(tmp_path):
    assert load_config(save_config(Config(), tmp_path)) == Config()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["diffusion.T=20", "diffusion.schedule=linear"], "diffusion.T"),
        (["diffusion.T=40", "diffusion.schedule=akod", "dko.bins=41", "eval.sampler_steps=5"], "dko.bins"),
        (["diffusion.schedule=akod", "dko.floor=0.05"], "dko.floor"),
        (["dko.logsnr_max=40"], "dko.logsnr_max"),
    ],
)
def test_cross_field_limits_fail_at_load(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_the_floor_limit_admits_the_default_and_refuses_what_would_export_an_invalid_schedule():
    """laplace(0.75)'s last run of steps: at floor 0.15 or more a policy cannot export beta_t > 0.999, at 0.1 it can."""
    assert load_config(None, ["diffusion.schedule=akod"]).dko.floor == 0.2
    assert load_config(None, ["diffusion.schedule=akod", "dko.floor=0.15"]).dko.floor == 0.15
    with pytest.raises(ConfigError, match=r"dko\.floor is too small .* bin 31 of 32"):
        load_config(None, ["diffusion.schedule=akod", "dko.floor=0.1"])
    assert load_config(None, ["diffusion.schedule=akod", "dko.floor=0.1", "dko.prior=edm"]).dko.floor == 0.1  # a gentler tail
