"""What a scheduled job has already done: one row per document, the version it last committed.

``state/manifest.parquet`` under the job's output holds ``key, source, row_id, fingerprint,
version, run_id, status`` per document. A document is pending when its key is new (version 1),
or when its fingerprint changed and either ``on_change: resummarize`` or its last version was an
error (version + 1); ``on_change: ignore`` leaves an edited document alone. The manifest is only
ever rewritten whole and atomically, and only after the outputs it records are committed.
"""

from __future__ import annotations

import pyarrow as pa

from .. import io as storage_io
from .documents import Document

ON_CHANGE = ("resummarize", "ignore")

SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("row_id", pa.string()),
                    ("fingerprint", pa.string()), ("version", pa.int64()), ("run_id", pa.string()),
                    ("status", pa.string())])


class Manifest:
    def __init__(self, rows: dict[str, dict] | None = None):
        self.rows = rows or {}

    @classmethod
    def load(cls, storage, path: str) -> "Manifest":
        if not storage_io.exists(storage, path):
            return cls()
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(storage_io.read_bytes(storage, path)))
        return cls({r["key"]: r for r in table.to_pylist()})

    def save(self, storage, path: str) -> None:
        rows = [self.rows[k] for k in sorted(self.rows)]
        storage_io.write_parquet(storage, path, pa.Table.from_pylist(rows, schema=SCHEMA))

    @property
    def run_ids(self) -> set[str]:
        return {r["run_id"] for r in self.rows.values()}

    def pending(self, docs: list[Document], on_change: str = "resummarize") -> tuple[list[tuple[Document, int]], int, int]:
        """([(document, version to write)], unchanged, edited but ignored)."""
        if on_change not in ON_CHANGE:
            raise ValueError(f"input.on_change: must be one of {ON_CHANGE}, got {on_change!r}")
        todo, unchanged, ignored = [], 0, 0
        for d in docs:
            prev = self.rows.get(d.key)
            if prev is None:
                todo.append((d, 1))
            elif prev["fingerprint"] == d.fingerprint:
                unchanged += 1
            elif on_change == "resummarize" or prev["status"] == "error":
                todo.append((d, prev["version"] + 1))
            else:
                ignored += 1
        return todo, unchanged, ignored

    def record(self, rows: list[dict], run_id: str) -> int:
        """Record committed summary rows (``id`` = the document key, ``source, row_id, fingerprint,
        version, error_type``);
        a row older than what is recorded is ignored. Returns rows recorded."""
        n = 0
        for r in rows:
            prev = self.rows.get(r["id"])
            if prev is not None and prev["version"] >= r["version"]:
                continue
            self.rows[r["id"]] = {"key": r["id"], "source": r["source"], "row_id": r["row_id"],
                                   "fingerprint": r["fingerprint"], "version": r["version"], "run_id": run_id,
                                   "status": "error" if r.get("error_type") else "ok"}
            n += 1
        return n
