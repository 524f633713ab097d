"""The run's corpus pool in storage: each batch's finished outputs, where every actor and the driver read them.

An actor writes one file per batch, ``<output.path>/corpus_pool/<batch file name>`` (Parquet:
``dataset``, ``key``, ``tokens``), before it commits the batch; a retried batch rewrites its own file.
The coordinator passes only the files' addresses and token counts between actors
(``Coordinator.corpus_put`` / ``corpus_since``): no output crosses its mailbox, and its loss loses
no output. At the end of the run the driver reads the pool newest first, at most
``corpus_index.max_tokens_indexed`` tokens per dataset, merges it into the saved indexes
(``pipeline.corpus.save_pooled``), whether or not the coordinator survived, and removes it (so a
rerun does not merge it twice; a killed run's pool is merged by the next run's end).
"""

from __future__ import annotations

import io
import logging
from array import array

import pyarrow as pa
import pyarrow.parquet as pq

from . import io as storage_io

log = logging.getLogger(__name__)

POOL_SCHEMA = pa.schema([("dataset", pa.string()), ("key", pa.string()), ("tokens", pa.list_(pa.int32()))])


def pool_path(cfg) -> str:
    return storage_io.join(cfg.output.path, "corpus_pool")


def write_batch(cfg, batch: str, key: str, outputs: dict[str, list]) -> str | None:
    """A batch's outputs per dataset as one file; returns its address (None: nothing to pool)."""
    rows = [{"dataset": d, "key": key, "tokens": list(o)} for d, outs in sorted(outputs.items()) for o in outs if o]
    if not rows:
        return None
    path = storage_io.join(pool_path(cfg), batch)
    storage_io.write_parquet(cfg.storage, path, pa.Table.from_pylist(rows, schema=POOL_SCHEMA))
    return path


def read_batch(cfg, address: str, dataset: str, key: str) -> list[array]:
    """One pooled file's outputs for ``dataset`` under ``key`` (a file gone or damaged: none, and a warning)."""
    try:
        t = pq.read_table(io.BytesIO(storage_io.read_bytes(cfg.storage, address)))
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning("pooled outputs %s unreadable (%s): skipped", address, e)
        return []
    return [array("i", r["tokens"]) for r in t.to_pylist() if r["dataset"] == dataset and r["key"] == key]


def clear(cfg) -> None:
    """Remove the run's pool: after the driver merged it into the saved indexes (a pool left by a killed run
    is merged by the next run's end instead), or when a run starts over (``output.resume=false``)."""
    fs, p = storage_io.filesystem(cfg.storage, pool_path(cfg))
    if fs.exists(p):
        fs.rm(p, recursive=True)


def read_pool(cfg, cap: int) -> dict[str, tuple[str, list]]:
    """{dataset: (key, outputs oldest first)}: the newest pooled outputs of the run, at most ``cap``
    tokens per dataset (the first key seen per dataset: one model per run). Reads files newest first
    and holds no more than ``cap`` tokens per dataset."""
    fs, p = storage_io.filesystem(cfg.storage, pool_path(cfg))
    if not fs.exists(p):
        return {}
    files = fs.find(p, detail=True)

    def when(info: dict):
        t = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        return t.timestamp() if hasattr(t, "timestamp") else float(t)

    newest = sorted((f for f in files if f.endswith(".parquet")), key=lambda f: (when(files[f]), f), reverse=True)
    got: dict[str, tuple[str, list]] = {}
    tokens: dict[str, int] = {}
    for f in newest:
        try:
            with fs.open(f, "rb") as fh:
                rows = pq.read_table(fh).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as e:
            log.warning("pooled outputs %s unreadable (%s): skipped", f, e)
            continue
        for r in reversed(rows):
            d = r["dataset"]
            key, outs = got.setdefault(d, (r["key"], []))
            n = min(len(r["tokens"]), cap - 1) + 1
            if r["key"] != key or tokens.get(d, 0) + n > cap:
                continue
            tokens[d] = tokens.get(d, 0) + n
            outs.append(r["tokens"])
    return {d: (key, outs[::-1]) for d, (key, outs) in got.items() if outs}
