"""The driver: corpus -> Ray Data -> generation actors -> Parquet, metrics, skip sets.

1. list the input files; read them in Ray tasks (each builds its own filesystem) into rows;
2. drop ids already committed under ``<output>/generations/`` (resume): Ray tasks build hash buckets
   of the committed ids, and the input is filtered against them (``pipeline.idsets``);
3. count the rows to do (a rerun that finds them all committed says so and stops there);
   ``map_batches(GenerationActor)`` on a fixed actor pool; each batch is written by its actor as
   one Parquet file; the job's progress (rows done of total, tok/s, ETA, error rows) is drawn from
   the actors' reports to the coordinator (``pipeline.progress``);
4. check that every input id is committed and count ids committed twice (one pass over hash buckets
   of the input's and the outputs' ids, in Ray tasks),
   stream the committed generations through running sums into ``metrics.parquet``, write
   ``skip_sets.json`` and ``actors.json``, merge searched sets into the skip-set registry, merge
   the run's pooled outputs (``pipeline.corpus_pool``, in storage) into the saved corpus indexes
   (``pipeline.corpus``), and return the metrics.

The coordinator is advice: every call the driver makes to it is bounded (``ray.coordinator_timeout_s``),
progress falls back on the batches the driver has received, and the final merge uses what
survives: a coordinator lost or restarted late leaves the skip sets to the generations' own
columns and the actors' start-up times unknown, each named in a warning (``final_advice``).

The driver never holds the corpus's outputs, and holds ids only up to ``ray.driver_ids`` of them
(the resume filter's set on small runs); above that it sees only counts, example ids and one object
reference per hash bucket, so its memory does not grow with the corpus
(``benchmarks/id_accounting_bench.py``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import io as storage_io
from .actor import GenerationActor
from .config import PipelineConfig, validate
from .coordinator import start_coordinator
from .memory import actor_memory
from .corpus import corpus_dir, save_pooled, uses_corpus
from .corpus_pool import clear as clear_pool
from .corpus_pool import read_pool
from .metrics import MetricsAccumulator, metrics_table, summary_table
from .progress import JobProgress
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


def committed_files(cfg: PipelineConfig) -> list[str]:
    """The committed batch files under ``generations/`` (names only: a few MB for millions of rows)."""
    fs, p = storage_io.filesystem(cfg.storage, generations_path(cfg))
    if not fs.exists(p):
        return []
    return sorted(f for f in fs.find(p) if f.endswith(".parquet"))


def outputs_dataset(cfg: PipelineConfig, columns: list[str] | None = None):
    """The committed generations as a Ray Dataset (read in Ray tasks, never whole on the driver); None if none."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    files = committed_files(cfg)
    if not files:
        return None
    fs, _ = storage_io.filesystem(cfg.storage, generations_path(cfg))
    return ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=columns,
                                 partitioning=None)


def input_dataset(cfg: PipelineConfig, files: list[str]):
    """The input rows (read in Ray tasks, ``input.limit`` applied) as a Ray Dataset."""
    import ray

    r = cfg.ray
    ds = ray.data.from_items([{"path": f} for f in files])
    with remote_args_accepted():
        ds = ds.map_batches(_read_files(cfg.storage, cfg.input.format, cfg.input.file_format,
                                        cfg.generation.max_tokens_limit), batch_size=1, batch_format="pyarrow",
                            max_retries=r.max_task_retries if r.max_task_retries >= 0 else 3)  # finite
    if cfg.input.limit:
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # a deterministic first N
        ds = ds.limit(cfg.input.limit)
    return ds


@contextmanager
def remote_args_accepted():
    """Ray Data 2.60-2.63 takes ``max_retries`` / ``max_restarts`` / ``max_task_retries`` only as
    ``ray_remote_args`` and warns that those go in 2.64 (pyproject.toml's upper bound): that one
    warning is known and silenced here, every other one shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def _accounting_actor(cfg: PipelineConfig):
    from .idsets import accounting_actor

    return accounting_actor(cfg.storage, generations_path(cfg),
                            cfg.ray.max_task_retries if cfg.ray.max_task_retries >= 0 else 3)  # finite


def _drop_ids(done: frozenset):
    values = pa.array(sorted(done), pa.string())

    def drop(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=values)))

    return drop


def without_committed(cfg: PipelineConfig, ds):
    """``ds`` minus the rows whose id is already committed, and how many rows are committed. Ray tasks
    read the committed ids into hash buckets; up to ``ray.driver_ids`` committed rows the driver then
    ships them as one filter set (fast), above it the filter binary-searches the buckets in the object
    store, so the driver never holds ids that grow with the corpus."""
    import ray

    files = committed_files(cfg)
    if not files:
        return ds, 0
    owner = _accounting_actor(cfg)
    n, buckets = ray.get(owner.committed.remote(files))
    if n <= cfg.ray.driver_ids:
        done = frozenset(i for t in ray.get(buckets) for i in t.column("id").to_pylist())
        ray.kill(owner)
        return ds.map_batches(_drop_ids(done), batch_format="pyarrow"), n
    from .idsets import drop_committed

    return ds.map_batches(drop_committed(buckets, owner), batch_format="pyarrow"), n


def check_exactly_once(cfg: PipelineConfig, files: list[str]) -> int:
    """Every input id (within ``input.limit``) is committed. Returns how many ids are committed more
    than once (0 by design: a retried batch rewrites its own file); raises if any is missing. Runs in
    Ray tasks over hash buckets of the input's and the outputs' ids (one pass); the driver receives
    three counts and up to 3 example ids."""
    import ray

    owner = _accounting_actor(cfg)
    try:
        missing, some, duplicated = ray.get(owner.check.remote(
            committed_files(cfg), list(files),
            (cfg.input.format, cfg.input.file_format, cfg.generation.max_tokens_limit), cfg.input.limit))
    finally:
        ray.kill(owner)
    if missing:
        raise RuntimeError(f"{missing} input id(s) missing from the output, e.g. {sorted(some)}")
    return duplicated


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


def _check_room(cfg: PipelineConfig, gpu: bool) -> None:
    """CPU actors that take every CPU of the cluster leave none to the tasks that read the input and
    feed them: Ray Data would wait forever with nothing printed. Refuse that before starting."""
    import ray

    if gpu:
        return  # GPU actors take no CPU
    r = cfg.ray
    cpus, need = ray.cluster_resources().get("CPU", 0.0), r.concurrency * r.num_cpus_per_actor
    if cpus - need < 1:
        raise ValueError(
            f"ray.concurrency={r.concurrency} x ray.num_cpus_per_actor={r.num_cpus_per_actor:g} = {need:g} CPUs leave "
            f"{max(0.0, cpus - need):g} of the cluster's {cpus:g} to the tasks that read the input (at least 1 is "
            f"needed, or the job waits forever): lower one of them, or add a node")


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
    # no silent loss: a block that fails for good fails the job (Ray Data could drop up to this many)
    ray.data.DataContext.get_current().max_errored_blocks = 0
    t0, t0_wall = time.perf_counter(), time.time()
    if not cfg.input.path:
        cfg = replace(cfg, input=replace(cfg.input, path=DEMO_CORPUS))
    files = storage_io.list_input_files(cfg.storage, cfg.input.path)
    if not cfg.output.resume:
        _clear_generations(cfg)
        clear_pool(cfg)
    gpu = _uses_gpu(cfg)
    inputs = input_dataset(cfg, files)
    _check_room(cfg, gpu)
    ds, done = without_committed(cfg, inputs)
    total = ds.count()  # reads the input once more (Ray tasks): cheap next to generating it
    log.info("input: %d file(s) from %s; %d row(s) to generate, %d id(s) already committed under %s", len(files),
             cfg.input.path, total, done, cfg.output.path)
    if total == 0 and done:
        previous = read_metrics(cfg)
        if previous is not None:
            n = inputs.count()
            print(f"{n} of {n} rows already committed; nothing to do; pass output.resume=false to regenerate",
                  flush=True)
            return previous

    coord_name = f"conflayers-coordinator-{uuid.uuid4().hex[:8]}"
    coordinator = start_coordinator(coord_name, corpus_cap=cfg.corpus_index.max_tokens_indexed,
                                    hang_s=cfg.debug.coordinator_hang_s)
    r = cfg.ray
    first = _ask(coordinator, "hello", max(r.coordinator_timeout_s, 30.0))  # its start, before any batch waits
    epoch0 = first["epoch"] if first else None
    memory = actor_memory(cfg, gpu)

    ds = ds.repartition(target_num_rows_per_block=r.batch_size)  # one block per actor call: spread, and logged per batch
    with remote_args_accepted():
        ds = ds.map_batches(
            GenerationActor,
            fn_constructor_kwargs={"cfg": memory.config, "coordinator": coord_name,
                                   "namespace": ray.get_runtime_context().namespace,
                                   "expected_rows": -(-total // r.concurrency)},  # prices compiling (engine.compile)
            batch_size=r.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=r.concurrency),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else r.num_cpus_per_actor,
            memory=memory.declared,
            max_restarts=r.max_restarts,
            max_task_retries=r.max_task_retries,
        )

    received = [0, 0, 0]  # rows, tokens, errors of the batches the driver has received (all committed)

    def poll() -> tuple[int, int, int]:
        """The coordinator's counts (rows as they finish), never fewer than the committed batches received:
        a restarted coordinator has lost its counts, a hung one does not answer."""
        got = _ask(coordinator, "progress", r.coordinator_timeout_s) or (0, 0, 0)
        return tuple(max(a, b) for a, b in zip(got, received))

    progress = JobProgress(total, poll, interval_s=cfg.progress.interval_s, clock=time.perf_counter,
                           started=t0).start()
    rows_done = errors = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if batch.num_rows == 0:
                continue
            rows_done += batch.num_rows
            errors += batch.num_rows - pc.sum(pc.is_null(batch.column("error_type"))).as_py()
            received[:] = [rows_done, received[1] + (pc.sum(batch.column("num_generated_tokens")).as_py() or 0), errors]
            if cfg.progress.verbose:
                current = _ask(coordinator, "current", r.coordinator_timeout_s,
                               sorted(set(batch.column("dataset").to_pylist()))) or {}
                log.info("batch committed: %d rows (%d so far, %d errors), skip set %s", batch.num_rows, rows_done,
                         errors, " ".join(f"{d}:{s}" for d, s in current.items()) or "-")
    finally:
        progress.close()
    wall = time.perf_counter() - t0

    if cfg.debug.kill_coordinator_at == "merge":
        _kill_coordinator(coordinator, r.coordinator_timeout_s)
    # the end of the run can wait a little longer (a restart takes seconds): no batch is waiting now
    final = final_advice(_ask(coordinator, "final", max(r.coordinator_timeout_s, 10.0)), epoch0)
    ray.kill(coordinator)

    duplicated = check_exactly_once(cfg, files)
    # the metrics: the outputs streamed through running sums (the driver holds one block at a time)
    acc, seen = MetricsAccumulator(), (set() if duplicated else None)
    if duplicated:
        log.warning("%d id(s) committed more than once: the metrics count each once", duplicated)
    outs = outputs_dataset(cfg)
    for block in (outs.iter_batches(batch_size=4096, batch_format="pyarrow") if outs is not None else []):
        batch_rows = block.to_pylist()
        if seen is not None:
            batch_rows = [x for x in batch_rows if x["id"] not in seen and not seen.add(x["id"])]
        acc.add(batch_rows)
    sets, model, actors = fill_from_generations(final, acc, cfg)
    metrics = acc.result(wall, model.get("n_layers"), sets, accelerator_count=r.concurrency if gpu else 0,
                         startup_seconds=startup_seconds(actors, t0_wall, r.concurrency, wall))
    storage_io.write_parquet(cfg.storage, storage_io.join(cfg.output.path, "metrics.parquet"), metrics_table(metrics))
    storage_io.write_bytes_atomic(cfg.storage, storage_io.join(cfg.output.path, "skip_sets.json"),
                                  json.dumps({"model": model, "datasets": sets}, indent=2, sort_keys=True).encode())
    storage_io.write_bytes_atomic(cfg.storage, storage_io.join(cfg.output.path, "actors.json"),
                                  json.dumps(actors, indent=2, sort_keys=True).encode())
    merged = _merge_registry(cfg, sets, model)
    if merged:
        log.info("merged %d skip set(s) into the registry %s", merged, cfg.search.registry)
    saved = save_pooled(cfg, read_pool(cfg, cfg.corpus_index.max_tokens_indexed)) if uses_corpus(cfg) else 0
    clear_pool(cfg)  # merged: a rerun must not merge it again
    if saved:
        log.info("saved %d corpus index(es) under %s", saved, corpus_dir(cfg))
    print(summary_table(metrics), flush=True)
    log.info("%d rows (%d errors) in %.1f s; outputs under %s", rows_done, errors, wall, cfg.output.path)
    return metrics


def _ask(coordinator, method: str, timeout_s: float, *args):
    """A bounded call to the coordinator: its answer, or None (gone, restarting past the timeout, hung)."""
    import ray

    try:
        return ray.get(getattr(coordinator, method).remote(*args), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - advice: GetTimeoutError, ActorDiedError, ActorUnavailableError, ...
        log.debug("coordinator %s: %s: %s", method, type(e).__name__, e)
        return None


def _kill_coordinator(coordinator, timeout_s: float) -> None:
    """Tests (``debug.kill_coordinator_at=merge``): SIGKILL the coordinator's process, as the OOM killer would."""
    import os
    import signal

    hello = _ask(coordinator, "hello", timeout_s)
    if hello:
        log.warning("debug.kill_coordinator_at=merge: SIGKILLing the coordinator (pid %d)", hello["pid"])
        os.kill(hello["pid"], signal.SIGKILL)


def final_advice(final: dict | None, epoch0: str | None) -> dict:
    """The coordinator's end-of-run state as far as it survived: {summary, model, actors, lost}.
    ``lost`` names what a coordinator gone (no answer) or restarted (another epoch: it holds only what
    actors re-sent after the restart) could not give."""
    if final is None:
        return {"summary": {}, "model": {}, "actors": {}, "lost": "did not answer at the end of the run (dead or hung)"}
    out = {k: final[k] for k in ("summary", "model", "actors")}
    out["lost"] = None
    if epoch0 is not None and final.get("epoch") != epoch0:
        out["lost"] = "restarted during the run (it holds only what the actors alive after the restart re-sent)"
    return out


def fill_from_generations(final: dict, acc: MetricsAccumulator, cfg: PipelineConfig) -> tuple[dict, dict, dict]:
    """(skip sets, model, actors) for the outputs: the coordinator's, and where it lost them, what the
    committed generations say (each dataset's most used skip set, unsettled, so the registry is not
    fed from it; the actors that wrote rows, without start-up times); a warning names what was lost."""
    sets, model, actors = dict(final["summary"]), dict(final["model"]), dict(final["actors"])
    lost_sets = sorted(d for d in acc.groups if d not in sets)
    for d in lost_sets:
        g = acc.groups[d]
        sets[d] = {"skip_set": list(g.sets.most_common(1)[0][0]) if g.sets else [], "tokens_per_s": None, "tau": None,
                   "acceptance_rate": None, "baseline_tokens_per_s": None, "search_iterations": g.iters,
                   "sets_tried": len(g.sets), "rows": g.ok, "settled": False, "from_generations": True}
    lost_actors = sorted(a for a in acc.all.actors if a and a not in actors)
    for a in lost_actors:
        actors[a] = {"from_generations": True}
    if final["lost"] or lost_sets or lost_actors:
        what = []
        if lost_sets:
            what.append(f"skip-set statistics of dataset(s) {', '.join(lost_sets)} (skip_sets.json gives the "
                        "generations' most used set; the skip-set registry is not updated for them)")
        if lost_actors:
            what.append(f"start-up info of {len(lost_actors)} actor(s) (actors.json lists them without it; "
                        "startup_seconds may be missing)")
        if not model:
            what.append("the model's layer count (skip_ratio is empty)")
        log.warning("the coordinator %s; lost: %s. Rows, metrics and the corpus pool are unaffected (they come "
                    "from the committed outputs).", final["lost"] or "lost part of its state",
                    "; ".join(what) or "nothing the outputs needed")
    return sets, model, actors


def read_metrics(cfg: PipelineConfig) -> list[dict] | None:
    """The metrics a finished run wrote (``metrics.parquet``), or None if there are none."""
    import pyarrow.parquet as pq

    path = storage_io.join(cfg.output.path, "metrics.parquet")
    if not storage_io.exists(cfg.storage, path):
        return None
    return pq.read_table(pa.BufferReader(storage_io.read_bytes(cfg.storage, path))).to_pylist()


def startup_seconds(actors: dict, t0_wall: float, concurrency: int, wall: float) -> float | None:
    """Seconds from the job's start until its pool was ready: the ``concurrency``-th actor to report
    ready (a restarted actor reports later and is not start-up)."""
    ready = sorted(a["ready_at"] for a in actors.values() if a.get("ready_at"))
    if not ready:
        return None
    return min(wall, max(0.0, ready[min(concurrency, len(ready)) - 1] - t0_wall))


