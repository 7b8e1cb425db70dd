"""Checkpoints in safetensors (tensors) + JSON (everything else): every kind of value a state holds comes
back exactly, earlier versions' state.pt still load, and a file that is not whole is one clear error."""

from __future__ import annotations

import math

import pytest
import torch

from akod_ray.errors import CheckpointError
from akod_ray.training import plain_state
from akod_ray.training.checkpoint import (LEGACY_STATE_FILE, STATE_FILE, latest_checkpoint, load_for_sampling,
                                          load_state, save_state)
from checkpoint_helpers import checkpoint_state, make_checkpoint, tiny_config


def assert_same(a, b, where="state"):
    """Equal values of equal types (a dict subclass comes back as dict), tensors equal in dtype, shape and value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, where


def full_state(tmp_path) -> dict:
    """What a run's checkpoint holds: model, EMA, an optimizer that has stepped (integer keys, tuples), data
    position, betas, config, an AKOD schedule source (nested tensors), evaluations, and odd plain values."""
    cfg = tiny_config(tmp_path)
    state = checkpoint_state(cfg)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    shared = torch.arange(6.0)
    state.update(
        optimizer=opt.state_dict(), evaluated=[4, 8], budget_s=float("inf"),
        schedule_source={"dko": {"weights": {"pi.0.weight": torch.randn(4, 6), "pi.0.bias": torch.zeros(4)},
                                 "obs": torch.randn(16, 6, dtype=torch.float64), "knots": (0, 5, 49)},
                         "broker": {"pending": [], "rewards": [0.5, float("nan"), -1.0], "last": None,
                                    "counts": torch.tensor([3, 0], dtype=torch.int64), "done": torch.tensor(True)}},
        views=[shared[:3], shared[2:], shared], odd={"$tag": 1, 7: "seven", (1, 2): [None, True]},
        half=torch.randn(3).half(), bfloat=torch.randn(2).bfloat16(), empty=torch.zeros(0, 4), scalar=torch.tensor(2.5),
    )
    return state


def test_every_kind_of_value_in_a_checkpoint_round_trips_exactly(tmp_path):
    state = full_state(tmp_path)
    folder = save_state(tmp_path / "checkpoint_00000004", state)
    assert sorted(p.name for p in folder.iterdir()) == [STATE_FILE]
    back = load_state(folder)
    assert_same(state, back)
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt.load_state_dict(back["optimizer"])  # an optimizer takes it back
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_the_file_needs_no_pickle(tmp_path):
    """The header is JSON and the rest is raw tensor bytes: no pickle opcode stream anywhere."""
    import json
    import struct

    folder = save_state(tmp_path / "c", full_state(tmp_path))
    data = (folder / STATE_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    structure = json.loads(header["__metadata__"]["structure"])
    assert structure["step"] == 4 and structure["ema"]["shadow"][0] == {"$tensor": "ema/shadow/0"}
    assert header["__metadata__"]["format"] == plain_state.FORMAT


def test_an_earlier_versions_state_pt_still_loads_and_samples(tmp_path):
    cfg = tiny_config(tmp_path)
    legacy = make_checkpoint(tmp_path / "old", cfg=cfg, legacy=True)
    assert sorted(p.name for p in legacy.iterdir()) == [LEGACY_STATE_FILE]
    assert latest_checkpoint(tmp_path / "old") == legacy
    new = make_checkpoint(tmp_path / "new", cfg=cfg)
    assert_same(load_state(legacy), load_state(new))
    model_old, _, _ = load_for_sampling(legacy)
    model_new, _, _ = load_for_sampling(new)
    assert all(torch.equal(a, b) for a, b in zip(model_old.state_dict().values(), model_new.state_dict().values()))


@pytest.mark.parametrize("spoil, why", [
    (lambda b: b[: len(b) // 2], "corrupt or truncated"),
    (lambda b: b[:7], "corrupt or truncated"),
    (lambda b: b"\x00" * 100, "corrupt or truncated"),
])
def test_a_file_that_is_not_whole_is_one_line_naming_it(tmp_path, spoil, why):
    folder = make_checkpoint(tmp_path / "run")
    file = folder / STATE_FILE
    file.write_bytes(spoil(file.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        load_state(folder)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint file '{file}' is {why}: ") and "\n" not in msg


def test_a_safetensors_file_of_another_program_is_refused(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "c" / STATE_FILE
    file.parent.mkdir()
    save_file({"weight": torch.zeros(2)}, str(file))
    with pytest.raises(CheckpointError, match=r"is corrupt or truncated: not an akod state file \(format None"):
        load_state(file.parent)
