"""A generation actor's side of the coordinator: advice taken when it arrives, never waited on for long.

The coordinator (``pipeline.coordinator``) only makes the job faster, so nothing here may fail or
stall a batch:

- **writes** (reports, progress, pool entries, the actor's start-up info and cost surface) are sent
  and not waited on; a failed one is dropped (the next report carries the actor's whole state again);
- **reads** are bounded: ``ask`` waits at most ``timeout_s``; the per-batch read (``advice``: best
  sets, new pool entries) is sent before the batch is decoded and taken at the next batch if it
  has arrived by then (``prefetch`` / ``arrived``); nothing is read inside the decode loop;
- a call that fails or times out marks the coordinator **down** for ``retry_s``: meanwhile every
  call is skipped at once and the actor runs on its own state (its policy, its cost surface, its
  corpus index); then it tries again;
- the reply carries the coordinator's **epoch**: a new one means it restarted and lost its state,
  so the actor re-sends what it holds (``on_restart``).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Advice:
    def __init__(self, handle, timeout_s: float = 2.0, retry_s: float = 30.0, clock=time.monotonic):
        self.handle = handle
        self.timeout_s, self.retry_s, self.clock = timeout_s, retry_s, clock
        self.down_until = 0.0
        self.epoch: str | None = None
        self.failures = 0
        self.pending = None  # the per-batch read in flight
        self.sent: list = []  # writes in flight (checked now and then, so their errors are seen, not logged by Ray)
        self.on_restart = None  # called (no arguments) when the epoch changes

    @property
    def up(self) -> bool:
        return self.handle is not None and self.clock() >= self.down_until

    def _failed(self, what: str, e: BaseException) -> None:
        self.failures += 1
        self.down_until = self.clock() + self.retry_s
        self.pending = None
        log.warning("coordinator %s failed (%s: %s): running on this actor's own state, retrying in %g s",
                    what, type(e).__name__, str(e)[:200], self.retry_s)

    def _seen(self, epoch: str | None) -> None:
        if epoch is None or epoch == self.epoch:
            return
        restarted = self.epoch is not None
        self.epoch = epoch
        if restarted:
            log.warning("the coordinator restarted (epoch %s): re-sending this actor's state", epoch)
            if self.on_restart is not None:
                self.on_restart()

    def send(self, method: str, *args) -> None:
        """Fire and forget."""
        if not self.up:
            return
        import ray

        if self.sent:
            done, self.sent = ray.wait(self.sent, num_returns=len(self.sent), timeout=0)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - advice: a lost write costs nothing but speed
                    self._failed(method, e)
                    return
        if len(self.sent) > 10000:  # a hung coordinator: stop queueing behind it
            self._failed(method, TimeoutError(f"{len(self.sent)} writes unanswered"))
            self.sent = []
            return
        try:
            self.sent.append(getattr(self.handle, method).remote(*args))
        except Exception as e:  # noqa: BLE001
            self._failed(method, e)

    def ask(self, method: str, *args, timeout_s: float | None = None):
        """A bounded read: the answer, or None (down, failed, or not back within the timeout)."""
        if not self.up:
            return None
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout_s or self.timeout_s)
        except Exception as e:  # noqa: BLE001 - GetTimeoutError, ActorDiedError, ActorUnavailableError, ...
            self._failed(method, e)
            return None

    def prefetch(self, *args) -> None:
        """Send the per-batch read (``Coordinator.advice``) unless one is in flight."""
        if self.pending is None and self.up:
            try:
                self.pending = (self.clock(), self.handle.advice.remote(*args))
            except Exception as e:  # noqa: BLE001
                self._failed("advice", e)

    def arrived(self, wait_s: float = 0.0) -> dict | None:
        """The per-batch read if it has arrived (waiting at most ``wait_s``), else None; a read out
        longer than ``timeout_s`` counts as failed."""
        if self.pending is None:
            return None
        import ray

        t0, ref = self.pending
        done, _ = ray.wait([ref], timeout=wait_s)
        if not done:
            if self.clock() - t0 > self.timeout_s:
                self._failed("advice", TimeoutError(f"no answer in {self.clock() - t0:.1f} s"))
            return None
        self.pending = None
        try:
            got = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            self._failed("advice", e)
            return None
        self._seen(got.get("epoch"))
        return got
