"""Progress of a long loop (data preparation, sampling, FID features, the report, the benches).

On a terminal: a tqdm bar (count, rate, time left). Anywhere else (a log file, a pipe, Ray's
forwarded output): no carriage returns, one plain line each time the loop crosses another tenth
of its total, and one at the end::

    [akod] sampling: 640/6,400 images (10%), 52.1 images/s, about 1.8 min left
    ...
    [akod] sampling: 6,400/6,400 images (100%) in 2.1 min, 51.0 images/s

Use::

    with progress("sampling", total=n, unit="images") as bar:
        for batch in ...:
            ...
            bar.update(len(batch))

Progress goes to stdout, beside the command's other ``[akod]`` lines (stderr keeps the one-line errors).
A loop that ends within :data:`DELAY_S` seconds prints nothing (nor does one whose total is 0);
``AKOD_PROGRESS=0`` turns every bar and line off.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Iterator, TextIO

STEPS = 10  # plain lines per loop: one every tenth
DELAY_S = 1.0  # nothing before this many seconds: a quick loop needs no progress


def format_seconds(s: float) -> str:
    """12 s, 3.5 min, 1.2 h."""
    if not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{max(s, 0.0):.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class PlainProgress:
    """The non-terminal form: a line at each tenth of ``total`` crossed (one line when an update crosses several),
    from :data:`DELAY_S` seconds on."""

    def __init__(self, desc: str, total: int, unit: str, stream: TextIO, clock=time.perf_counter):
        self.desc, self.total, self.unit, self.stream, self.clock = desc, total, unit, stream, clock
        self.n, self.tenths, self.t0 = 0, 0, clock()

    def update(self, k: int = 1) -> None:
        self.n = min(self.total, self.n + k)
        tenths = self.n * STEPS // self.total
        if tenths > self.tenths:
            self.tenths = tenths
            if self.clock() - self.t0 >= DELAY_S:
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        rate = self.n / elapsed if elapsed > 0 else math.inf
        head = f"[akod] {self.desc}: {self.n:,}/{self.total:,} {self.unit} ({100 * self.n // self.total}%)"
        if self.n >= self.total:
            return f"{head} in {format_seconds(elapsed)}, {rate:.3g} {self.unit}/s"
        return f"{head}, {rate:.3g} {self.unit}/s, about {format_seconds((self.total - self.n) / rate)} left"

    def close(self) -> None:
        pass


class _Silent:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def enabled() -> bool:
    return os.environ.get("AKOD_PROGRESS", "1") != "0"


@contextlib.contextmanager
def progress(desc: str | None, total: int, unit: str = "images", stream: TextIO | None = None) -> Iterator:
    """A bar (terminal) or plain lines (anything else) for a loop of ``total`` ``unit`` named ``desc``; see the
    module docstring. ``desc`` None: nothing (a caller that was not asked to show progress). ``stream``: where
    it writes (default sys.stdout)."""
    stream = sys.stdout if stream is None else stream
    if desc is None or total <= 0 or not enabled():
        bar = _Silent()
    elif getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=f" {unit}", unit_scale=False, file=stream, dynamic_ncols=True,
                   delay=DELAY_S)
    else:
        bar = PlainProgress(desc, total, unit, stream)
    try:
        yield bar
    finally:
        bar.close()
