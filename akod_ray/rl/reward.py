"""The AKOD reward, decided in one place (DESIGN 1.4).

A result posted by the workers for one proposed schedule holds ``before_loss`` (the trunk's
reference loss where the segment or branch started), ``score_loss`` (the reference loss
after training with the proposal) and, with ``rl.reward=paper``, ``paper_loss`` (the loss
under the proposed schedule itself).

=============  ===============================================================================
improvement    (before_loss - score_loss) / before_loss: the relative fall of the reference loss
               over the segment. The default: the level of the loss falls with training whatever
               the schedule, and dividing by where the segment started removes most of that drift
               (measured in BENCHMARKS.md, "AKOD reward").
reference      -score_loss: the level of the reference loss (fixed log-SNR grid, cannot be gamed,
               but mostly training drift).
paper          -paper_loss: the paper's literal reward; a schedule that makes its own task easy
               scores well without making the model better (tests/test_akod_ray.py shows it).
=============  ===============================================================================
"""

from __future__ import annotations

import math


def reward_from(result: dict, kind: str) -> float:
    if kind == "improvement":
        before = float(result["before_loss"])
        return (before - float(result["score_loss"])) / before if before > 0 and math.isfinite(before) else math.nan
    if kind == "reference":
        return -float(result["score_loss"])
    if kind == "paper":
        return -float(result["paper_loss"])
    raise ValueError(f"rl.reward must be improvement, reference or paper, got {kind!r}")
