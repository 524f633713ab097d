"""Predicted time of plain continuous decoding, from the cost surface and a length distribution.

``Engine.stream`` admits rows shortest prompt first into free slots, prefills the joiners in
chunks of about ``prefill_tokens`` tokens a forward with a decode step of the running rows
between chunks, and decodes the running rows one token a step until each reaches its length.
``stream_seconds`` replays exactly that loop with no model: each forward costs what the cost
surface says (``CostSurface.seconds(w, 1)`` plus the loop's measured overhead,
``step_overhead + row_overhead * w``, a decode step of ``w`` rows; ``CostSurface.prefill_seconds`` a prefill chunk). ``job_seconds`` splits rows into the calls a
Ray Data actor pool gets (``batch_size`` rows each, given to whichever actor is free first) and
returns the makespan.

It predicts plain decoding only. Speculative drafters change the step count and shape by how
much of each row's text an n-gram or a layer-skip draft guesses, which the surface cannot know:
``pipeline.cost`` carries a measured cell's ratio (measured / predicted plain) to the settings
it did not run, and says so.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from .surface import CostSurface


@dataclass
class StreamForecast:
    seconds: float  # prefill + decode
    prefill_seconds: float
    decode_seconds: float
    steps: int  # decode steps
    tokens: int  # generated tokens


def stream_seconds(surface: CostSurface, rows: Sequence[tuple[int, int]], width: int,
                   prefill_tokens: int = 512) -> StreamForecast:
    """One ``Engine.stream`` call over ``rows`` = (prompt tokens, generated tokens) at ``width`` rows
    in flight (the actor streams at ``min(width, len(rows))``), plain decoding."""
    if width < 1 or prefill_tokens < 1:
        raise ValueError(f"width and prefill_tokens must be >= 1, got {width} and {prefill_tokens}")
    bad = [r for r in rows if r[0] < 1 or r[1] < 0]
    if bad:
        raise ValueError(f"rows must be (prompt tokens >= 1, generated tokens >= 0), got {bad[0]}")
    queue = sorted(rows, key=lambda r: r[0])  # the actor streams shortest prompt first
    width = min(width, max(1, len(queue)))
    nxt = 0
    running: list[int] = []  # decode steps left per running row
    joiners: list[list[int]] = []  # [prompt tokens left, decode steps left after the first token]
    prefill = decode = 0.0
    steps = 0
    while True:
        if not joiners and nxt < len(queue):
            free = width - len(running)
            take = queue[nxt : nxt + free]
            nxt += len(take)
            joiners = [[p, max(0, n - 1)] for p, n in sorted(take, key=lambda r: -r[0])]
        if joiners:
            left = [j for j in joiners if j[0] > 0]
            per_row = max(16, prefill_tokens // len(left))
            segs = [min(per_row, j[0]) for j in left]
            prefill += surface.prefill_seconds(len(left), max(segs))
            for j, s in zip(left, segs):
                j[0] -= s
            if all(j[0] == 0 for j in joiners):
                running += [n for _, n in joiners if n > 0]  # a row of 0 or 1 token ends with its prefill
                joiners = []
        if not running:
            if joiners:
                continue
            if nxt >= len(queue):
                break
            continue
        decode += surface.seconds(len(running), 1) + surface.step_overhead + surface.row_overhead * len(running)
        steps += 1
        running = [n - 1 for n in running if n > 1]
    return StreamForecast(prefill + decode, prefill, decode, steps, sum(n for _, n in rows))


def job_seconds(surface: CostSurface, rows: Sequence[tuple[int, int]], width: int, actors: int,
                batch_size: int, prefill_tokens: int = 512) -> tuple[float, list[float]]:
    """Makespan of ``rows`` split in order into calls of ``batch_size`` rows over ``actors`` actors,
    each call going to the actor that is free first; returns (seconds, each call's seconds)."""
    if actors < 1 or batch_size < 1:
        raise ValueError(f"actors and batch_size must be >= 1, got {actors} and {batch_size}")
    calls = [stream_seconds(surface, rows[i : i + batch_size], width, prefill_tokens).seconds
             for i in range(0, len(rows), batch_size)]
    free = [0.0] * actors
    for c in calls:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free), calls
