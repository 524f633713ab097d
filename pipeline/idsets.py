"""The job's id accounting in Ray tasks: hash-partitioned id sets over the input and the committed outputs.

Map tasks read the id column of a group of files (committed batch files, or input files through the
job's own reader) and split the ids into buckets by a stable 64-bit hash; one reduce task per bucket
then compares only that bucket's ids, exactly (the hash only places and searches them). The tasks are
launched by a small actor that owns their results (a task result under 100 kB is otherwise stored in
the memory of the process that launched it: the driver): the driver sees counts, up to 3 example ids
and one object reference per bucket, whatever the corpus size. ``pipeline.run`` uses it for the resume
filter and the exactly-once check.

A module of its own, importing only pyarrow, numpy, polars and the pipeline's reader and storage, so
the Ray workers running these tasks start in well under a second (``pipeline.run`` imports torch).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import io as storage_io
from .reader import read_rows

_OUT_FILES_PER_TASK = 128  # committed batch files (``ray.batch_size`` rows each) per map task
_IN_FILES_PER_TASK = 4  # input files per map task
_MAX_BUCKETS = 64
_BUCKET_FILES = 256  # one more bucket per this many committed files (~65k ids at 256 rows a batch)


def _buckets(n_out_files: int) -> int:
    """Hash buckets: each reduce task holds about 1/buckets of the ids (bounded up to ~16M ids)."""
    return max(1, min(_MAX_BUCKETS, n_out_files // _BUCKET_FILES + 1))


def _id_hashes(ids) -> np.ndarray:
    """A stable 64-bit hash per id (polars' hash with a fixed seed: the same in every process of one
    installation). Only used to place ids into buckets and to search them; ids are compared exactly."""
    import polars as pl

    return pl.Series(values=ids).hash(seed=0).to_numpy()


def _split(ids: pa.Array, buckets: int, extra: dict | None = None) -> list[pa.Table]:
    """``ids`` (and ``extra`` columns) as one table per bucket, with their hashes in column ``h``."""
    h = _id_hashes(ids)
    t = pa.table({"h": pa.array(h, pa.uint64()), "id": ids, **(extra or {})})
    b = h % np.uint64(buckets)
    order = np.argsort(b, kind="stable")
    ends = np.cumsum(np.bincount(b.astype(np.int64), minlength=buckets))
    # take() gives each bucket its own buffers: a slice would pickle its parent's whole buffers
    return [t.take(order[e - c:e]) for e, c in zip(ends, np.diff(ends, prepend=0))]


def _map_committed(storage, root: str, paths: list[str], buckets: int):
    """The ids of committed batch files, split into buckets; then how many rows they hold."""
    import pyarrow.parquet as pq

    fs, _ = storage_io.filesystem(storage, root)
    chunks = []
    for p in paths:
        with fs.open(p, "rb") as f:
            chunks += [c.cast(pa.string()) for c in pq.read_table(f, columns=["id"]).column("id").chunks]
    ids = pa.chunked_array(chunks, pa.string()).combine_chunks()
    return (*_split(ids, buckets), len(ids))


def _map_input(storage, paths: list[str], reading: tuple, buckets: int, indexed: bool):
    """The ids of input files as the job reads them (``read_rows``: error rows keep their ids), split
    into buckets, with each id's row number within ``paths`` when ``indexed`` (for ``input.limit``)."""
    ids = pa.array([r["id"] for p in paths for r in read_rows(p, storage, *reading)], pa.string())
    return (*_split(ids, buckets, {"i": np.arange(len(ids), dtype=np.int64)} if indexed else None), len(ids))


def _ids_of(tables, keeps=None) -> pa.Array:
    parts = []
    for k, t in enumerate(tables):
        if keeps is not None and keeps[k] is not None:
            t = t.filter(pc.less(t.column("i"), keeps[k]))
        parts += t.column("id").chunks
    return pa.chunked_array(parts, pa.string()).combine_chunks()


def _reduce_check(n_in: int, keeps: list, *tables: pa.Table) -> tuple[int, list[str], int]:
    """One bucket: (input ids not committed, the 3 smallest of them, ids committed more than once)."""
    ins, outs = _ids_of(tables[:n_in], keeps), _ids_of(tables[n_in:])
    counts = pc.value_counts(outs)
    missing = ins.filter(pc.invert(pc.is_in(ins, value_set=counts.field("values"))))
    distinct = pc.unique(missing)
    some = distinct.take(pc.select_k_unstable(distinct, min(3, len(distinct)), [("dummy", "ascending")]))
    return len(missing), sorted(some.to_pylist()), int(pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0)


def _reduce_committed(*tables: pa.Table) -> pa.Table:
    """One bucket of the committed ids: distinct, sorted by hash (column ``h``), for searching."""
    ids = pc.unique(_ids_of(tables))
    h = _id_hashes(ids)
    order = np.argsort(h, kind="stable")
    return pa.table({"h": pa.array(h[order], pa.uint64()), "id": ids.take(order)})


class IdAccounting:
    """Launches the map and reduce tasks and owns their results (so they never land in the driver)."""

    def __init__(self, storage, root: str, retries: int):
        import ray

        self.storage, self.root, self.retries = storage, root, retries
        self.committed_map = ray.remote(_map_committed)
        self.input_map = ray.remote(_map_input)
        self.check_reduce = ray.remote(_reduce_check)
        self.committed_reduce = ray.remote(_reduce_committed)
        self.keep = []

    def _map_out(self, files: list[str], buckets: int) -> list[list]:
        return [self.committed_map.options(num_returns=buckets + 1, max_retries=self.retries).remote(
            self.storage, self.root, files[i:i + _OUT_FILES_PER_TASK], buckets)
            for i in range(0, len(files), _OUT_FILES_PER_TASK)]

    def committed(self, files: list[str]) -> tuple[int, list]:
        """(committed rows, one reference per bucket to its distinct ids sorted by hash)."""
        import ray

        buckets = _buckets(len(files))
        maps = self._map_out(files, buckets)
        self.keep = [self.committed_reduce.options(max_retries=self.retries).remote(*[m[b] for m in maps])
                     for b in range(buckets)]
        return sum(ray.get([m[-1] for m in maps])), self.keep

    def check(self, out_files: list[str], in_files: list[str], reading: tuple, limit: int | None
              ) -> tuple[int, list[str], int]:
        """(input ids missing from the outputs, up to 3 of them, ids committed more than once)."""
        import ray

        buckets = _buckets(len(out_files))
        outs = self._map_out(out_files, buckets)
        ins = [self.input_map.options(num_returns=buckets + 1, max_retries=self.retries).remote(
            self.storage, in_files[i:i + _IN_FILES_PER_TASK], reading, buckets, bool(limit))
            for i in range(0, len(in_files), _IN_FILES_PER_TASK)]
        keeps = [None] * len(ins)
        if limit:  # the first ``limit`` rows in file order, as the job's input dataset takes them
            seen = 0
            for k, n in enumerate(ray.get([m[-1] for m in ins])):
                keeps[k], seen = max(0, min(n, limit - seen)), seen + n
        results = ray.get([self.check_reduce.options(max_retries=self.retries).remote(
            len(ins), keeps, *[m[b] for m in ins], *[m[b] for m in outs]) for b in range(buckets)])
        some = sorted(i for r in results for i in r[1])[:3]
        return sum(r[0] for r in results), some, sum(r[2] for r in results)


def drop_committed(buckets: list, owner):
    """A filter dropping the rows whose id is in the bucketed committed ids (``_reduce_committed``);
    each task maps the buckets from the object store (zero-copy) and binary-searches the hashes.
    ``owner`` (the actor that owns the buckets) is kept alive by this closure."""

    def drop(batch: pa.Table) -> pa.Table:
        import ray

        _ = owner
        tables = ray.get(buckets)
        ids = batch.column("id").combine_chunks().cast(pa.string())
        h = _id_hashes(ids)
        b = h % np.uint64(len(tables))
        keep = np.ones(len(ids), dtype=bool)
        for k in np.unique(b):
            t = tables[int(k)]
            if not t.num_rows:
                continue
            hs = t.column("h").to_numpy()
            rows = np.nonzero(b == k)[0]
            pos = np.searchsorted(hs, h[rows])
            hit = pos < len(hs)
            hit[hit] = hs[pos[hit]] == h[rows[hit]]
            rows, pos = rows[hit], pos[hit]
            same = pc.equal(t.column("id").take(pa.array(pos)), ids.take(pa.array(rows))).to_numpy(
                zero_copy_only=False)
            keep[rows[same]] = False
            for row, p in zip(rows[~same], pos[~same]):  # a 64-bit hash collision: look at its equals
                target = ids[int(row)].as_py()
                while p < len(hs) and hs[p] == h[row]:
                    if t.column("id")[int(p)].as_py() == target:
                        keep[row] = False
                        break
                    p += 1
        return batch.filter(pa.array(keep))

    return drop


def accounting_actor(storage, root: str, retries: int):
    """An ``IdAccounting`` actor (no CPU of its own: it waits on its tasks) for committed files under ``root``."""
    import ray

    return ray.remote(num_cpus=0)(IdAccounting).remote(storage, root, retries)
