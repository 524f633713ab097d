"""A run lock in the output store (local or S3): one JSON object with an owner and an expiry.

``acquire`` writes the lock when there is none, when the one there has expired (its owner died
or hung past its lease), or, with ``replace``, over a live one; it then reads the lock back and
holds it only if its own owner id is what it reads (two runs racing for a free lock: the last
write wins and the other backs off). A holder renews its lease from a background thread every
third of the TTL, and checks ``still_held`` before it commits anything, so a run whose lock was
taken over (``replace``, or a lease that lapsed) does not commit. Object stores have no
compare-and-swap that every S3 implementation offers, so a window of one read-back remains
between two writers; the run's commit protocol (``pipeline.summarize``) keeps outputs exactly once
even then: a document is recorded by the manifest once, whichever run commits it first.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from .. import io as storage_io

CONCURRENCY = ("forbid", "replace")


class RunLock:
    def __init__(self, storage, path: str, ttl_s: float = 600.0, run_id: str = ""):
        self.storage, self.path, self.ttl_s, self.run_id = storage, path, ttl_s, run_id
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.taken_over: dict | None = None  # the lock this run replaced, if any

    def read(self) -> dict | None:
        if not storage_io.exists(self.storage, self.path):
            return None
        try:
            return json.loads(storage_io.read_bytes(self.storage, self.path))
        except (ValueError, OSError):
            return None  # unreadable or half-written by a foreign tool: treated as absent

    def _write(self) -> None:
        now = time.time()
        body = {"owner": self.owner, "run_id": self.run_id, "acquired_at": now, "expires_at": now + self.ttl_s}
        storage_io.write_bytes_atomic(self.storage, self.path, json.dumps(body).encode())

    def acquire(self, concurrency: str = "forbid") -> tuple[bool, str]:
        """(held, why): take the lock, or say who holds it."""
        if concurrency not in CONCURRENCY:
            raise ValueError(f"schedule.concurrency: must be one of {CONCURRENCY}, got {concurrency!r}")
        cur = self.read()
        if cur is not None:
            live = cur.get("expires_at", 0) > time.time()
            if live and concurrency == "forbid":
                left = cur["expires_at"] - time.time()
                return False, (f"run {cur.get('run_id')} ({cur.get('owner')}) holds the lock {self.path} for another "
                               f"{left:.0f} s (concurrency: forbid)")
            self.taken_over = cur
        self._write()
        time.sleep(0.05)
        if not self.still_held():
            cur = self.read() or {}
            return False, f"run {cur.get('run_id')} ({cur.get('owner')}) took the lock {self.path} at the same time"
        self._thread = threading.Thread(target=self._renew, name="run-lock-renew", daemon=True)
        self._thread.start()
        if self.taken_over:
            state = "live" if self.taken_over.get("expires_at", 0) > time.time() else "expired"
            return True, f"took over the {state} lock of run {self.taken_over.get('run_id')} ({self.taken_over.get('owner')})"
        return True, "acquired"

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if not self.still_held():
                return
            self._write()

    def still_held(self) -> bool:
        cur = self.read()
        return cur is not None and cur.get("owner") == self.owner

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.still_held():
            fs, p = storage_io.filesystem(self.storage, self.path)
            fs.rm(p)
