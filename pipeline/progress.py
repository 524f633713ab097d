"""The job's progress display: rows done of total, tokens/s, ETA and error rows, for the whole job.

Rows count as done when an engine finishes them: actors report their batch's rows as they finish
and when the batch is committed, through the coordinator, keyed by batch, so a retried batch
counts once. ``tokens/s`` is generated tokens over the time since the job started,
the definition of the summary table's ``job tok/s``, so the last progress line and the table agree.
The ETA extrapolates the rate of rows done since the first one finished (start-up excluded).

Where stderr is a terminal the display is a bar redrawn in place (tqdm); elsewhere (a log file,
``ray job logs``, CI) a compact line every ``progress.interval_s`` seconds and one at the end.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Snapshot:
    rows: int
    total: int
    tokens: int
    errors: int
    elapsed: float  # seconds since the job started
    eta: float | None  # seconds; None while no row has finished since the rate began to be measured

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


def clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def line(s: Snapshot) -> str:
    """``12/30 rows (40%), 2 errors, 45.1 tok/s, 0:00:31 elapsed, ETA 0:01:10``."""
    pct = f" ({s.rows / s.total:.0%})" if s.total else ""
    return (f"{s.rows}/{s.total} rows{pct}, {s.errors} error{'s' * (s.errors != 1)}, {s.tokens_per_s:.1f} tok/s, "
            f"{clock_text(s.elapsed)} elapsed, ETA {clock_text(s.eta)}")


class JobProgress:
    """Progress of one job run. ``poll()`` returns the job's (rows done, tokens, errors) so far.
    ``start`` runs the display in a thread; ``close`` stops it and draws the final state."""

    def __init__(self, total: int, poll: Callable[[], tuple[int, int, int]], *, interval_s: float = 30.0,
                 terminal: bool | None = None, stream=None, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None):
        self.total, self.poll, self.interval_s = total, poll, interval_s
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.clock = clock
        self.t0 = clock() if started is None else started
        self.last = (0, 0, 0)
        self._first: tuple[float, int] | None = None  # (time, rows) when rows were first seen done
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def snapshot(self) -> Snapshot:
        try:
            self.last = tuple(self.poll())
        except Exception:  # a display never fails the job (a slow or restarting coordinator): last counts
            pass
        rows, tokens, errors = self.last
        rows = min(rows, self.total) if self.total else rows
        now = self.clock()
        if self._first is None and rows:
            self._first = (now, rows)
        eta = None
        if self._first is not None and rows > self._first[1]:
            t1, r1 = self._first
            eta = (now - t1) / (rows - r1) * max(0, self.total - rows)
        elif self.total and rows >= self.total:
            eta = 0.0
        return Snapshot(rows, self.total, tokens, errors, now - self.t0, eta)

    # -- display ----------------------------------------------------------------------------------
    def draw(self) -> None:
        s = self.snapshot()
        if self.terminal:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, unit="row", file=self.stream, dynamic_ncols=True,
                                 bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} rows{postfix}")
                self._bar.set_description_str("generate")
            self._bar.n = s.rows
            self._bar.set_postfix_str(f"{s.errors} errors, {s.tokens_per_s:.1f} tok/s, "
                                      f"{clock_text(s.elapsed)} elapsed, ETA {clock_text(s.eta)}", refresh=False)
            self._bar.refresh()
        else:
            print(f"progress: {line(s)}", file=self.stream, flush=True)

    def _loop(self) -> None:
        period = 0.5 if self.terminal else self.interval_s
        while not self._stop.wait(period):
            self.draw()

    def start(self) -> "JobProgress":
        if self.terminal or self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="job-progress", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.draw()
        if self._bar is not None:
            self._bar.close()
