"""The job's progress display (pipeline.progress) and the coordinator's per-batch counts behind it."""

from __future__ import annotations

import io

import pytest

from pipeline.coordinator import Coordinator
from pipeline.progress import JobProgress, clock_text, line


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_count_rows_tokens_errors_and_extrapolate_the_eta():
    counts, clock, out = [0, 0, 0], Clock(), io.StringIO()
    p = JobProgress(30, lambda: tuple(counts), interval_s=5, terminal=False, stream=out, clock=clock)
    clock.t += 40  # start-up: nothing done yet
    s = p.snapshot()
    assert (s.rows, s.tokens, s.errors, s.elapsed, s.eta) == (0, 0, 0, 40, None)
    counts[:] = [6, 300, 1]
    clock.t += 10
    assert p.snapshot().eta is None  # one observation: no rate yet
    counts[:] = [12, 600, 2]
    clock.t += 10  # 6 rows in 10 s since the first were seen: 18 rows left -> 30 s
    s = p.snapshot()
    assert s.eta == pytest.approx(30.0) and s.tokens_per_s == pytest.approx(600 / 60)
    assert line(s) == "12/30 rows (40%), 2 errors, 10.0 tok/s, 0:01:00 elapsed, ETA 0:00:30"
    p.draw()
    assert out.getvalue() == "progress: 12/30 rows (40%), 2 errors, 10.0 tok/s, 0:01:00 elapsed, ETA 0:00:30\n"


def test_a_failing_poll_keeps_the_last_counts_and_done_means_eta_zero():
    state = {"fail": False}

    def poll():
        if state["fail"]:
            raise TimeoutError("coordinator busy")
        return (5, 50, 0)

    clock = Clock()
    p = JobProgress(5, poll, terminal=False, stream=io.StringIO(), clock=clock)
    clock.t += 1
    assert p.snapshot().rows == 5
    state["fail"] = True
    s = p.snapshot()
    assert (s.rows, s.tokens, s.eta) == (5, 50, 0.0)


def test_thread_prints_a_line_per_interval_and_a_last_one():
    out = io.StringIO()
    p = JobProgress(2, lambda: (2, 10, 0), interval_s=0.05, terminal=False, stream=out).start()
    import time

    time.sleep(0.2)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(ln.startswith("progress: 2/2 rows (100%), 0 errors") for ln in lines)
    quiet = io.StringIO()
    JobProgress(2, lambda: (0, 0, 0), interval_s=0, terminal=False, stream=quiet).start().close()
    assert quiet.getvalue() == ""  # interval 0: no lines


def test_terminal_bar_shows_rows_of_total():
    out = io.StringIO()
    p = JobProgress(4, lambda: (3, 30, 1), terminal=True, stream=out)
    p.draw()
    p._bar.close()
    text = out.getvalue()
    assert "3/4 rows" in text and "1 errors" in text and "tok/s" in text


def test_clock_text():
    assert clock_text(None) == "?" and clock_text(3725.4) == "1:02:05"


def test_coordinator_counts_a_retried_batch_once():
    c = Coordinator()
    c.batch_progress("b1", 2, 20, 0)
    c.batch_progress("b2", 1, 5, 1)
    assert c.progress() == (3, 25, 1)
    c.batch_progress("b1", 1, 8, 0)  # the actor died; the retry starts the batch over
    assert c.progress() == (2, 13, 1)
    c.batch_progress("b1", 4, 40, 0, committed=True)
    c.batch_progress("b1", 3, 30, 0)  # a late report of a superseded attempt does not undo the commit
    assert c.progress() == (5, 45, 1)
