"""A run's metric records (``metrics.jsonl``) and time-to-target.

``metrics.jsonl`` holds one JSON object per line, written by rank 0 of training: ``step``,
``wall_s`` (seconds since the run started, RL overhead included for AKOD), ``loss``,
``ref_loss``, ``img_per_s``, ``lr``, and sometimes ``fid_c10`` with ``fid_c10_n``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from akod_ray import storage
from akod_ray.errors import DataError


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in file order.

    A truncated last line (a run killed while writing) is skipped; a corrupt line elsewhere is
    a DataError naming the file and line.
    """
    path = storage.location(path)
    if not storage.is_file(path):
        raise DataError(f"metrics file {str(path)!r} does not exist")
    lines = storage.read_text(path).splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise DataError(f"metrics file {str(path)!r}, line {i + 1}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"metrics file {str(path)!r}, line {i + 1}: expected a JSON object")
        records.append(rec)
    return records


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def time_to_target(records: list[dict], key: str, target: float) -> float | None:
    """The first wall-clock time (``wall_s``, seconds) at which ``records[key] <= target``, or None.

    Records are taken in order of ``wall_s``; records without ``key`` or ``wall_s`` (or with a
    non-finite value) are skipped.
    """
    timed = [(w, v) for r in records if (w := _number(r.get("wall_s"))) is not None and (v := _number(r.get(key))) is not None]
    for wall, value in sorted(timed, key=lambda wv: wv[0]):
        if value <= target:
            return wall
    return None


def last_value(records: list[dict], key: str) -> tuple[float, dict] | None:
    """The last finite value of ``key`` and its record, or None when no record has it."""
    for rec in reversed(records):
        if (v := _number(rec.get(key))) is not None:
            return v, rec
    return None


def series(records: list[dict], key: str, x: str = "wall_s") -> tuple[list[float], list[float]]:
    """(x, key) pairs of the records that have both, for plotting."""
    pairs = [(a, b) for r in records if (a := _number(r.get(x))) is not None and (b := _number(r.get(key))) is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]
