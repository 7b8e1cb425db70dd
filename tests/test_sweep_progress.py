"""The sweep's progress line (issue 18, item 12): trials done and an estimate of the time left."""

from __future__ import annotations

from types import SimpleNamespace

from akod_ray.sweep.tuner import SweepProgress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_sweep_says_how_many_trials_are_done_and_about_how_long_the_rest_takes():
    clock, lines = Clock(), []
    progress = SweepProgress(total=7, done=1, concurrency=2, clock=clock, out=lambda line, flush: lines.append(line))
    trial = {i: SimpleNamespace(trial_id=f"t{i}") for i in range(6)}
    progress.setup()
    progress.on_trial_start(0, [], trial[0])
    progress.on_trial_start(0, [], trial[1])
    clock.now = 120.0
    progress.on_trial_complete(0, [], trial[0])  # 2 min; trial 1 has 0 left, 4 to start: 8 min over 2
    progress.on_trial_start(0, [], trial[2])
    clock.now = 150.0
    progress.on_trial_error(0, [], trial[1])  # mean 135 s; trial 2 has 105 s left, 3 to start: 510 s over 2
    for i in (2, 3, 4, 5):
        progress.on_trial_start(0, [], trial[i])
    clock.now = 400.0
    for i in (2, 3, 4, 5):
        progress.on_trial_complete(0, [], trial[i])
    assert lines[:3] == [
        "[akod] sweep: 6 of 7 trials to run, 2 at a time",
        "[akod] sweep: 2/7 trials done, about 4 min left",
        "[akod] sweep: 3/7 trials done (1 failed), about 5 min left",
    ]
    assert lines[-1] == "[akod] sweep: 7/7 trials done (1 failed)"
    assert len(lines) == 7
