"""The driver: corpus -> Ray Data -> generation actors -> Parquet, metrics, skip sets.

1. list the input files; read them in Ray tasks (each builds its own filesystem) into rows;
2. drop ids already committed under ``<output>/generations/`` (resume);
3. ``map_batches(GenerationActor)`` on a fixed actor pool; each batch is written by its actor as
   one Parquet file; the driver logs one line per finished batch;
4. read the committed generations back (deduplicated by id), check every input id is there
   exactly once, write ``metrics.parquet`` and ``skip_sets.json``, merge searched sets into the
   skip-set registry, and return the metrics.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import io as storage_io
from .actor import OUTPUT_SCHEMA, GenerationActor
from .config import PipelineConfig, validate
from .coordinator import start_coordinator
from .metrics import compute_metrics, dedupe, metrics_table, summary_table
from .reader import ROW_FIELDS, read_rows

log = logging.getLogger("pipeline")

DEMO_CORPUS = str(Path(__file__).parent / "data" / "demo.jsonl")

INPUT_SCHEMA = pa.schema(
    [(k, pa.int64()) if k == "max_tokens" else (k, pa.string()) for k in ROW_FIELDS]
)


def _read_files(storage, fmt: str, file_format: str, max_tokens_limit: int):
    def read(batch: pa.Table) -> pa.Table:
        rows = []
        for path in batch.column("path").to_pylist():
            rows += read_rows(path, storage, fmt, file_format, max_tokens_limit)
        return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)

    return read


def _drop_ids(done: frozenset):
    def drop(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=pa.array(sorted(done), pa.string()))))

    return drop


def committed_ids(cfg: PipelineConfig) -> frozenset:
    table = storage_io.read_parquet_dir(cfg.storage, generations_path(cfg), columns=["id"])
    return frozenset(table.column("id").to_pylist()) if table is not None else frozenset()


def generations_path(cfg: PipelineConfig) -> str:
    return storage_io.join(cfg.output.path, "generations")


def _clear_generations(cfg: PipelineConfig) -> None:
    fs, p = storage_io.filesystem(cfg.storage, generations_path(cfg))
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _uses_gpu(cfg: PipelineConfig) -> bool:
    import ray

    if cfg.model.device == "cuda":
        return True
    if cfg.model.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def _merge_registry(cfg: PipelineConfig, sets: dict, model: dict) -> int:
    """Merge the searched per-dataset sets into the skip-set registry; returns entries written."""
    if not cfg.search.registry or cfg.search.searcher not in ("conflayers", "swift") or not model:
        return 0
    from conflayers.registry import SkipSetEntry, save_entry

    n = 0
    for dataset, s in sets.items():
        if not s["settled"]:
            continue  # still a candidate: nothing a later run should load
        save_entry(cfg.search.registry, SkipSetEntry(
            model=model["model_id"], dataset=dataset, layers=list(s["skip_set"]), n_layers=int(model["n_layers"]),
            acceptance=s["acceptance_rate"], tau=s["tau"], iterations=int(s["search_iterations"]),
            speedup=(s["tokens_per_s"] / s["baseline_tokens_per_s"]) if s["baseline_tokens_per_s"] else None,
        ))
        n += 1
    return n


def run(cfg: PipelineConfig) -> list[dict]:
    """Run the job on an already initialised Ray; returns the metrics rows (also written out)."""
    import ray

    validate(cfg)
    t0, t0_wall = time.perf_counter(), time.time()
    if not cfg.input.path:
        cfg = replace(cfg, input=replace(cfg.input, path=DEMO_CORPUS))
    files = storage_io.list_input_files(cfg.storage, cfg.input.path)
    if not cfg.output.resume:
        _clear_generations(cfg)
    done = committed_ids(cfg)
    log.info("input: %d file(s) from %s; %d id(s) already committed under %s", len(files), cfg.input.path,
             len(done), cfg.output.path)

    coord_name = f"conflayers-coordinator-{uuid.uuid4().hex[:8]}"
    coordinator = start_coordinator(coord_name)
    r = cfg.ray
    gpu = _uses_gpu(cfg)

    ds = ray.data.from_items([{"path": f} for f in files])
    ds = ds.map_batches(_read_files(cfg.storage, cfg.input.format, cfg.input.file_format,
                                    cfg.generation.max_tokens_limit), batch_size=1, batch_format="pyarrow")
    if cfg.input.limit:
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # a deterministic first N
        ds = ds.limit(cfg.input.limit)
    if done:
        ds = ds.map_batches(_drop_ids(done), batch_format="pyarrow")
    ds = ds.repartition(target_num_rows_per_block=r.batch_size)  # one block per actor call: spread, and logged per batch
    with warnings.catch_warnings():  # max_restarts / max_task_retries still travel as ray_remote_args
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            GenerationActor,
            fn_constructor_kwargs={"cfg": cfg, "coordinator": coord_name,
                                   "namespace": ray.get_runtime_context().namespace},
            batch_size=r.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=r.concurrency),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else r.num_cpus_per_actor,
            max_restarts=r.max_restarts,
            max_task_retries=r.max_task_retries,
        )

    rows_done, tokens, errors = 0, 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if batch.num_rows == 0:
            continue
        rows_done += batch.num_rows
        tokens += pc.sum(batch.column("num_generated_tokens")).as_py() or 0
        errors += batch.num_rows - pc.sum(pc.is_null(batch.column("error_type"))).as_py()
        current = ray.get(coordinator.current.remote(sorted(set(batch.column("dataset").to_pylist()))))
        elapsed = time.perf_counter() - t0
        log.info("batch done: %d rows (%d so far, %d errors), %.1f tok/s overall, skip set %s", batch.num_rows,
                 rows_done, errors, tokens / elapsed if elapsed else 0.0,
                 " ".join(f"{d}:{s}" for d, s in current.items()) or "-")
    wall = time.perf_counter() - t0

    sets = ray.get(coordinator.summary.remote())
    model = ray.get(coordinator.model_info.remote())
    actors = ray.get(coordinator.actors_info.remote())
    ray.kill(coordinator)

    table = storage_io.read_parquet_dir(cfg.storage, generations_path(cfg))
    if table is None:
        table = OUTPUT_SCHEMA.empty_table()
    table = dedupe(table)
    expected = committed_ids_expected(cfg, files)
    missing = expected - set(table.column("id").to_pylist())
    if missing:
        raise RuntimeError(f"{len(missing)} input id(s) missing from the output, e.g. {sorted(missing)[:3]}")
    metrics = compute_metrics(table, wall, model.get("n_layers"), sets,
                              accelerator_count=r.concurrency if gpu else 0,
                              startup_seconds=startup_seconds(actors, t0_wall, r.concurrency, wall))
    storage_io.write_parquet(cfg.storage, storage_io.join(cfg.output.path, "metrics.parquet"), metrics_table(metrics))
    storage_io.write_bytes_atomic(cfg.storage, storage_io.join(cfg.output.path, "skip_sets.json"),
                                  json.dumps({"model": model, "datasets": sets}, indent=2, sort_keys=True).encode())
    storage_io.write_bytes_atomic(cfg.storage, storage_io.join(cfg.output.path, "actors.json"),
                                  json.dumps(actors, indent=2, sort_keys=True).encode())
    merged = _merge_registry(cfg, sets, model)
    if merged:
        log.info("merged %d skip set(s) into the registry %s", merged, cfg.search.registry)
    print(summary_table(metrics), flush=True)
    log.info("%d rows (%d errors) in %.1f s; outputs under %s", rows_done, errors, wall, cfg.output.path)
    return metrics


def startup_seconds(actors: dict, t0_wall: float, concurrency: int, wall: float) -> float | None:
    """Seconds from the job's start until its pool was ready: the ``concurrency``-th actor to report
    ready (a restarted actor reports later and is not start-up)."""
    ready = sorted(a["ready_at"] for a in actors.values() if a.get("ready_at"))
    if not ready:
        return None
    return min(wall, max(0.0, ready[min(concurrency, len(ready)) - 1] - t0_wall))


def committed_ids_expected(cfg: PipelineConfig, files: list[str]) -> set:
    """Every id the input holds (within ``input.limit``), read on the driver for the exactly-once check."""
    ids = []
    for f in files:
        ids += [r["id"] for r in read_rows(f, cfg.storage, cfg.input.format, cfg.input.file_format,
                                           cfg.generation.max_tokens_limit)]
        if cfg.input.limit and len(ids) >= cfg.input.limit:
            return set(ids[: cfg.input.limit])
    return set(ids)
