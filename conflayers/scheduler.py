"""Requests that arrive at any time, decoded in continuous batches: the engine behind a server.

A ``Scheduler`` owns one thread that runs the engine (the model is used by that thread only: a
layer-skip draft pass shadows layers of the shared model, so two threads may not run it at once).
Other threads ``submit`` requests and get their tokens back through callbacks.

Requests join *lanes*: one ``Engine.stream`` (one slot KV cache, up to ``max_batch`` rows) per
sampling setting, since a stream samples all its rows alike. Every greedy request shares one lane;
sampled requests share a lane per (temperature, top_p, top_k); a request with a ``seed`` gets a lane
of its own, one row wide, so its tokens depend on its seed alone (given the same drafts). The thread
runs the lanes that have work a round at a time (``stream(pulse=True)``: one prefill chunk and/or one
decode step), takes in new requests between rounds, and closes a lane that stayed idle ``idle_s``.
At most ``max_lanes`` lanes live at once (each may hold a KV cache of ``max_batch`` rows within
``kv_budget_bytes``): a request for another setting waits until a lane is idle, which then closes.

A request's tokens reach ``on_tokens`` as it commits them; returning a finish reason ends it there
(a stop string, a client that went away). ``cancel`` ends it at its next step, or before it starts.
``on_done`` gets the ``RowResult`` once (finish reason ``abort`` for a cancelled request that never
ran; ``error`` set if the engine refused it or failed).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .drafts.seam import Drafter
from .engine import Engine, GenerationConfig, Request, RowResult, RowStats
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One submitted request."""

    token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int | None
    group: str
    on_tokens: Callable[[list[int]], str | None] | None
    on_done: Callable[[RowResult], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    lane_key: tuple | None = None
    _done: bool = False

    def _tokens(self, toks: list[int]) -> str | None:
        if self.cancelled:
            return "abort"
        return self.on_tokens(toks) if self.on_tokens is not None else None

    def finish(self, result: RowResult) -> None:
        if not self._done:
            self._done = True
            self.on_done(result)

    def request(self) -> Request:
        return Request(self.token_ids, self.max_new_tokens, self.group, on_tokens=self._tokens)


def _aborted() -> RowResult:
    return RowResult([], RowStats(finish_reason="abort"))


class _Lane:
    def __init__(self, engine: Engine, sampling: SamplingParams, seed: int | None, drafter: Drafter,
                 max_batch: int, prefill_tokens: int, kv_budget_bytes: int | None,
                 stop_token_ids: tuple[int, ...] | None):
        self.pending: deque[Ticket] = deque()
        self.inflight: dict[int, Ticket] = {}
        self.fed = 0  # items the feed has yielded (the stream's input indices)
        self.idle_since = time.monotonic()
        config = GenerationConfig(max_new_tokens=1, sampling=sampling, seed=seed, stop_token_ids=stop_token_ids)
        self.stream = engine.stream(self._feed(), config, drafter, max_batch, prefill_tokens, kv_budget_bytes,
                                    pulse=True)

    def _feed(self):
        while True:
            while self.pending and self.pending[0].cancelled:
                self.pending.popleft().finish(_aborted())
            item = None
            if self.pending:
                t = self.pending.popleft()
                self.inflight[self.fed] = t
                item = t.request()
            self.fed += 1
            yield item

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.inflight)

    def round(self) -> None:
        """One round of the stream (until its next pulse), handing out the rows that finished."""
        for i, result in self.stream:
            if i < 0:
                break
            self.inflight.pop(i).finish(result)
        if not self.busy:
            self.idle_since = time.monotonic()

    def fail(self, message: str) -> None:
        for t in list(self.inflight.values()) + list(self.pending):
            t.finish(RowResult([], RowStats(finish_reason="error"), error=message))
        self.inflight.clear()
        self.pending.clear()
        self.stream.close()


class Scheduler:
    """``drafter_for(group)`` returns the drafter for a lane, and is called once for every group (dataset
    tag) the first time a request of it arrives, so a shared drafter (the ``auto`` controller, a group
    router) can take that group's layer-skip policy on."""

    def __init__(self, engine: Engine, drafter_for: Callable[[str], Drafter], max_batch: int,
                 prefill_tokens: int = 512, kv_budget_bytes: int | None = None,
                 stop_token_ids: tuple[int, ...] | None = None, idle_s: float = 60.0, max_lanes: int = 4):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if max_lanes < 1:
            raise ValueError(f"max_lanes must be >= 1, got {max_lanes!r}")
        self.max_lanes = max_lanes
        self._waiting: deque[Ticket] = deque()  # tickets for a setting without a lane, while max_lanes are busy
        self.engine = engine
        self.drafter_for = drafter_for
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.kv_budget_bytes = kv_budget_bytes
        self.stop_token_ids = stop_token_ids
        self.idle_s = idle_s
        self._cv = threading.Condition()
        self._incoming: list[Ticket] = []
        self._lanes: dict[tuple, _Lane] = {}
        self._groups: set[str] = set()
        self._unique = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="conflayers-scheduler", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, token_ids: list[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               seed: int | None = None, group: str = "", on_tokens: Callable[[list[int]], str | None] | None = None,
               on_done: Callable[[RowResult], None] = lambda r: None) -> Ticket:
        ticket = Ticket(list(token_ids), max_new_tokens, sampling, seed, group, on_tokens, on_done)
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._incoming.append(ticket)
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """End the request at its next step (its slot is freed), or drop it if it has not started."""
        ticket.cancelled = True
        with self._cv:
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    def lanes(self) -> int:
        return len(self._lanes)

    def in_flight(self) -> int:
        """Requests submitted and not finished (read from another thread: a snapshot)."""
        return (len(self._incoming) + len(self._waiting)
                + sum(len(l.pending) + len(l.inflight) for l in list(self._lanes.values())))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine's thread ----------------------------------------------------------------------
    def _key(self, t: Ticket) -> tuple:
        sp = t.sampling
        if sp.greedy:
            return ("greedy",)
        if t.seed is not None:
            return ("seeded", next(self._unique))
        return ("sampled", sp.temperature, sp.top_p, sp.top_k)

    def _place(self, t: Ticket) -> bool:
        """Put ``t`` in its lane (made if need be); False if it must wait for a lane."""
        if t.cancelled:
            t.finish(_aborted())
            return True
        if t.group not in self._groups:
            self.drafter_for(t.group)
            self._groups.add(t.group)
        key = t.lane_key if t.lane_key is not None else self._key(t)
        t.lane_key = key
        lane = self._lanes.get(key)
        if lane is None:
            if len(self._lanes) >= self.max_lanes:
                idle = [k for k, l in self._lanes.items() if not l.busy]
                if not idle:
                    return False
                self._lanes.pop(min(idle, key=lambda k: self._lanes[k].idle_since)).stream.close()
            seeded = key[0] == "seeded"
            lane = _Lane(self.engine, t.sampling, t.seed, self.drafter_for(t.group),
                         1 if seeded else self.max_batch, self.prefill_tokens, self.kv_budget_bytes,
                         self.stop_token_ids)
            self._lanes[key] = lane
        lane.pending.append(t)
        return True

    def _reap(self, everything: bool = False) -> None:
        now = time.monotonic()
        for key, lane in list(self._lanes.items()):
            if everything or (not lane.busy and (key[0] == "seeded" or now - lane.idle_since > self.idle_s)):
                if everything:
                    for t in list(lane.inflight.values()) + list(lane.pending):
                        t.finish(_aborted())
                lane.stream.close()
                del self._lanes[key]

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # never leave a request waiting on a dead thread
            log.exception("the scheduler's thread failed")
            with self._cv:
                self._closed = True
            self._fail_all(f"the scheduler failed: {type(e).__name__}: {e}")
            raise

    def _fail_all(self, message: str) -> None:
        with self._cv:
            tickets, self._incoming = self._incoming, []
        tickets += list(self._waiting)
        self._waiting.clear()
        for lane in self._lanes.values():
            tickets += list(lane.inflight.values()) + list(lane.pending)
        self._lanes.clear()
        for t in tickets:
            t.finish(RowResult([], RowStats(finish_reason="error"), error=message))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._waiting or self._closed
                           or any(l.busy for l in self._lanes.values())):
                    self._cv.wait(timeout=min(self.idle_s, 5.0))
                    self._reap()
                if self._closed:
                    break
                incoming, self._incoming = self._incoming, []
            queue, self._waiting = list(self._waiting) + incoming, deque()
            for t in queue:
                try:
                    if not self._place(t):
                        self._waiting.append(t)
                except Exception as e:  # e.g. a group's policy failed to load
                    log.exception("request refused")
                    t.finish(RowResult([], RowStats(finish_reason="error"), error=f"{type(e).__name__}: {e}"))
            for key, lane in list(self._lanes.items()):
                if not lane.busy:
                    continue
                try:
                    lane.round()
                except Exception as e:  # the lane's requests fail; the others and later ones go on
                    log.exception("decode failed")
                    lane.fail(f"{type(e).__name__}: {e}")
                    del self._lanes[key]
            self._reap()
        with self._cv:
            incoming, self._incoming = self._incoming, []
        for t in incoming + list(self._waiting):
            t.finish(_aborted())
        self._waiting.clear()
        self._reap(everything=True)
