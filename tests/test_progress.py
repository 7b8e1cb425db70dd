"""Progress output (akod_ray/progress.py): plain lines every 10% where the stream is not a terminal."""

from __future__ import annotations

import io
import re

from akod_ray import progress as prog
from test_sweep_progress import Clock


def test_a_log_gets_one_plain_line_per_tenth_and_no_carriage_returns():
    out = io.StringIO()
    clock = Clock()
    bar = prog.PlainProgress("sampling", 1000, "images", out, clock)
    for _ in range(100):
        clock.now += 0.5
        bar.update(10)  # 10 images every half second: 20 images/s
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10
    assert lines[0] == "[akod] sampling: 100/1,000 images (10%), 20 images/s, about 45 s left"
    assert lines[4] == "[akod] sampling: 500/1,000 images (50%), 20 images/s, about 25 s left"
    assert lines[-1] == "[akod] sampling: 1,000/1,000 images (100%) in 50 s, 20 images/s"


def test_an_update_that_crosses_several_tenths_prints_one_line_and_a_quick_loop_none():
    out, clock = io.StringIO(), Clock()
    bar = prog.PlainProgress("fid features", 7, "images", out, clock)
    clock.now = 2.0
    bar.update(3)  # 42%: one line
    bar.update(4)  # done
    assert [re.sub(r",.*|\).*", "", x) for x in out.getvalue().splitlines()] == [
        "[akod] fid features: 3/7 images (42%", "[akod] fid features: 7/7 images (100%"]
    quick = io.StringIO()
    bar = prog.PlainProgress("report", 3, "runs", quick, Clock())
    for _ in range(3):
        bar.update(1)  # the clock never reaches DELAY_S
    assert quick.getvalue() == ""


def test_the_context_manager_writes_plain_lines_to_a_non_terminal_and_nothing_for_an_empty_loop(monkeypatch):
    monkeypatch.setattr(prog, "DELAY_S", 0.0)
    out = io.StringIO()
    with prog.progress("data", 20, "images", stream=out) as bar:
        for _ in range(20):
            bar.update(1)
    assert len(out.getvalue().splitlines()) == 10 and "\r" not in out.getvalue()
    empty = io.StringIO()
    with prog.progress("data", 0, stream=empty) as bar:
        bar.update(5)
    monkeypatch.setenv("AKOD_PROGRESS", "0")
    with prog.progress("data", 20, stream=empty) as bar:
        bar.update(20)
    assert empty.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(prog, "DELAY_S", 0.0)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with prog.progress("sampling", 4, "images", stream=out) as bar:
        bar.update(4)
    assert "\r" in out.getvalue() and "4/4" in out.getvalue()


def test_seconds_are_written_for_people():
    assert [prog.format_seconds(s) for s in (0.2, 45, 200, 4000, 9000)] == ["0 s", "45 s", "3.3 min", "66.7 min", "2.5 h"]
