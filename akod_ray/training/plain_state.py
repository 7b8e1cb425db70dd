"""Nested plain data with tensors in one safetensors file: the tensors as safetensors tensors, everything
else as JSON in the file's header. Nothing is unpickled on reading, so a file cannot run code.

What it holds: dicts (any keys of the kinds below), lists, tuples, str, int, float (NaN and inf too), bool,
None and torch tensors (any dtype safetensors stores, on any device; read back on the CPU or ``device``).
Writing anything else (a numpy array, an object) is a TypeError that names where it sits.

Layout: the header's ``__metadata__`` holds ``format`` (:data:`FORMAT`) and ``structure``, the JSON of the
object in which a tensor is ``{"$tensor": KEY}``; KEY is the tensor's path in the object
(``model/conv_in.weight``, ``optimizer/state/0/exp_avg``). Other tags keep what JSON would lose:
``{"$tuple": [...]}``, ``{"$float": "nan"}`` (and ``inf``, ``-inf``), and ``{"$dict": [[key, value], ...]}``
for a dict with a key that is not a string (an optimizer's integer parameter ids) or starts with ``$``.
Tensors that share memory are written as separate copies (safetensors stores no views).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "akod_state/1"
TAG = "$"


def _key(path: tuple, taken: dict) -> str:
    key = "/".join(str(p) for p in path) or "."
    base, n = key, 1
    while key in taken:
        key, n = f"{base}#{n}", n + 1
    return key


def encode(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the JSON structure, the tensors by key) of ``obj``; see the module docstring."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()

    def enc(x: Any, path: tuple) -> Any:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if storage in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view or a shared storage: safetensors stores each tensor's own bytes
            storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
            key = _key(path, tensors)
            tensors[key] = t
            return {TAG + "tensor": key}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {TAG + "float": repr(x)}
        if isinstance(x, tuple):
            return {TAG + "tuple": [enc(v, path + (i,)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, path + (i,)) for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith(TAG) for k in x):
                return {k: enc(v, path + (k,)) for k, v in x.items()}
            return {TAG + "dict": [[enc(k, path + ("key",)), enc(v, path + (k,))] for k, v in x.items()]}
        where = "/".join(str(p) for p in path) or "the top level"
        raise TypeError(f"{type(x).__module__}.{type(x).__qualname__} at {where}: only tensors and plain data "
                        "(dict, list, tuple, str, int, float, bool, None) are stored")

    return enc(obj, ()), tensors


def decode(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The object :func:`encode` took apart. Raises KeyError for a tensor the file lacks, ValueError for a
    structure this module does not write."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        tags = [k for k in x if k.startswith(TAG)]
        if not tags:
            return {k: dec(v) for k, v in x.items()}
        if len(x) != 1:
            raise ValueError(f"unknown entry {sorted(x)[:3]}")
        tag, value = tags[0], x[tags[0]]
        if tag == TAG + "tensor":
            return tensors[value]
        if tag == TAG + "tuple":
            return tuple(dec(v) for v in value)
        if tag == TAG + "float" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag == TAG + "dict":
            return {dec(k): dec(v) for k, v in value}
        raise ValueError(f"unknown entry {tag!r}")

    return dec(structure)


def save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` (a temporary name, then renamed: never half-written)."""
    from safetensors.torch import save_file

    path = Path(path)
    structure, tensors = encode(obj)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "structure": json.dumps(structure, allow_nan=False)})
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class PlainStateError(ValueError):
    """A file that is not (or no longer) a whole plain-state file; the message is one line."""


def load(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """The object in ``path``; a truncated, corrupt or foreign file is a :class:`PlainStateError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise PlainStateError(f"not an akod state file (format {meta.get('format')!r}, expected {FORMAT!r})")
            tensors = {k: f.get_tensor(k).to(device) for k in f.keys()}
        return decode(json.loads(meta["structure"]), tensors)
    except PlainStateError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise PlainStateError(f"{type(e).__name__}: {text}"[:300]) from None
