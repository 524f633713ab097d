"""The scheduled summarization job's tick: new or changed documents -> summaries, exactly once.

Layout under ``output.path`` (local or ``s3://``)::

    state/lock.json                      the run lock (pipeline.summarize.lock)
    state/manifest.parquet               per document: the version last committed, and by which run
    state/corpus/                        the corpus indexes the ticks' summaries teach (pipeline.corpus)
    runs/<run_id>/documents.jsonl        the run's plan: its document versions (and prompts)
    runs/<run_id>/input.jsonl            the prompts, as the generation pipeline reads them
    runs/<run_id>/work/                  the generation pipeline's outputs (batches, metrics, skip sets)
    runs/<run_id>/summaries/part-0.parquet   the run's committed summaries: the commit point
    runs.parquet                         one row per run

A tick (``run_tick``): take the lock (or skip the tick and say who holds it); recover what a killed
run left: a run whose summaries file exists but that the manifest does not know is folded into
the manifest; a run that wrote its plan but never committed is finished first, under its own id,
its committed generation batches kept (the pipeline resumes them); a run directory without a plan
is deleted. Then list the documents, take the new and changed ones (up to ``max_docs_per_run``),
truncate each to fit the context, write the plan, run the generation pipeline (``pipeline.run``,
the same model, search, engine and Ray settings as ``jobs.generate``) on them, check each
summary, write the summaries file in one atomic write (the commit), then the manifest, then the
run's row in ``runs.parquet``. A run killed at any point leaves no summaries file (finished or
redone next tick) or a complete one (recorded next tick, never redone): every document version is
committed once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .. import io as storage_io
from ..config import (GenerationSettings, InputConfig, JobSections, OutputConfig, PipelineConfig, check,
                     shared_sections, validate)
from .documents import Document, list_documents, read_documents
from .lock import CONCURRENCY, RunLock
from .manifest import ON_CHANGE, Manifest
from .schedule import Schedule, parse_run_id, run_id

log = logging.getLogger("pipeline")

DEMO_DOCUMENTS = str(Path(__file__).parents[1] / "data" / "documents")
TOO_LONG = ("truncate", "error")


@dataclass
class DocumentInput:
    path: str = ""  # a directory or s3:// prefix; "" = the demo documents in pipeline/data/documents
    text_field: str = "text"  # tables (JSONL / Parquet / CSV): the column holding the document
    id_field: Optional[str] = "id"  # tables: the column holding a document id (else its position)
    reference_field: Optional[str] = "reference"  # tables: a reference summary (ROUGE-2 is reported against it)
    on_change: str = "resummarize"  # an edited document: resummarize (a new version) | ignore
    max_docs_per_run: int = 100  # the rest wait for the next tick
    max_input_tokens: int = 1024  # document tokens kept (also capped by the model's context)
    on_too_long: str = "truncate"  # truncate (and flag truncated=true) | error (an error row)


@dataclass
class SummaryConfig:
    template: str = ("Summarize the following article in two or three sentences.\n\n{document}")
    dataset: str = "summarize"  # the dataset name skip sets and metrics are kept under


@dataclass
class ScheduleConfig:
    cron: str = "0 * * * *"
    timezone: str = "UTC"
    catch_up: bool = False  # on start, run the ticks missed since the last recorded run (oldest first)
    max_catch_up: int = 24
    concurrency: str = "forbid"  # forbid: skip a tick while another run holds a live lock | replace: take it over
    lock_ttl_s: float = 900.0  # a lock not renewed for this long is stale (its run died)


@dataclass
class SummarizeConfig(JobSections):
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_tokens=96))
    input: DocumentInput = field(default_factory=DocumentInput)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(path="outputs/summarize"))
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def validate_summarize(cfg: SummarizeConfig) -> SummarizeConfig:
    validate(pipeline_config(cfg, "runs/check"))  # the shared sections, checked as jobs.generate checks them
    i, s = cfg.input, cfg.schedule
    check(bool(cfg.output.path), "output.path", "must not be empty")
    check(bool(i.text_field), "input.text_field", "must not be empty")
    check(i.on_change in ON_CHANGE, "input.on_change", f"must be one of {ON_CHANGE}, got {i.on_change!r}")
    check(i.on_too_long in TOO_LONG, "input.on_too_long", f"must be one of {TOO_LONG}, got {i.on_too_long!r}")
    check(i.max_docs_per_run >= 1, "input.max_docs_per_run", f"must be >= 1, got {i.max_docs_per_run}")
    check(i.max_input_tokens >= 16, "input.max_input_tokens", f"must be >= 16, got {i.max_input_tokens}")
    check("{document}" in cfg.summary.template, "summary.template", "must contain {document}")
    try:
        cfg.summary.template.format(document="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"summary.template: only {{document}} may be a field (escape braces as {{{{ }}}}): {e}") from None
    check(s.concurrency in CONCURRENCY, "schedule.concurrency", f"must be one of {CONCURRENCY}, got {s.concurrency!r}")
    check(s.lock_ttl_s > 0, "schedule.lock_ttl_s", f"must be > 0, got {s.lock_ttl_s}")
    check(s.max_catch_up >= 1, "schedule.max_catch_up", f"must be >= 1, got {s.max_catch_up}")
    Schedule(s.cron, s.timezone)  # names the key when the expression or the timezone is bad
    return cfg


def pipeline_config(cfg: SummarizeConfig, run_dir: str) -> PipelineConfig:
    """The generation pipeline's config for one tick: the shared sections as given, except that the
    corpus indexes are kept under ``state/corpus`` unless ``corpus_index.path`` says where (so each tick
    starts from what the earlier ticks' summaries taught it)."""
    shared = shared_sections(cfg)
    if not cfg.corpus_index.path:
        shared["corpus_index"] = replace(cfg.corpus_index, path=_p(cfg, "state", "corpus"))
    return PipelineConfig(
        **shared,
        input=InputConfig(path=storage_io.join(run_dir, "input.jsonl"), format="records"),
        output=OutputConfig(path=storage_io.join(run_dir, "work"), resume=True),
    )


SUMMARY_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("row_id", pa.string()), ("version", pa.int64()),
    ("fingerprint", pa.string()), ("run_id", pa.string()), ("summary", pa.string()),
    ("num_input_tokens", pa.int64()), ("num_document_tokens", pa.int64()), ("num_generated_tokens", pa.int64()),
    ("compression_ratio", pa.float64()), ("truncated", pa.bool_()), ("hit_budget", pa.bool_()),
    ("rouge2", pa.float64()), ("finish_reason", pa.string()), ("tau", pa.float64()),
    ("acceptance_rate", pa.float64()), ("plain_steps", pa.int64()), ("ngram_steps", pa.int64()),
    ("corpus_steps", pa.int64()), ("layerskip_steps", pa.int64()), ("skip_set", pa.list_(pa.int64())), ("error_type", pa.string()),
    ("error_message", pa.string()),
])
RUN_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("scheduled_time", pa.string()), ("start_time", pa.string()), ("end_time", pa.string()),
    ("docs_new", pa.int64()), ("docs_done", pa.int64()), ("docs_error", pa.int64()), ("docs_skipped", pa.int64()),
    ("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("tokens_per_s", pa.float64()),
    ("speedup", pa.float64()), ("status", pa.string()), ("message", pa.string()),
])


# ---- paths ---------------------------------------------------------------------------------------
def _p(cfg: SummarizeConfig, *parts: str) -> str:
    return storage_io.join(cfg.output.path, *parts)


def summaries_file(cfg: SummarizeConfig, rid: str) -> str:
    return _p(cfg, "runs", rid, "summaries", "part-0.parquet")


def _read_table(storage, path: str) -> pa.Table | None:
    if not storage_io.exists(storage, path):
        return None
    return pq.read_table(io.BytesIO(storage_io.read_bytes(storage, path)))


def read_runs(cfg: SummarizeConfig) -> list[dict]:
    t = _read_table(cfg.storage, _p(cfg, "runs.parquet"))
    return t.to_pylist() if t is not None else []


def _append_run(cfg: SummarizeConfig, row: dict) -> None:
    rows = [r for r in read_runs(cfg) if r["run_id"] != row["run_id"]] + [row]
    rows.sort(key=lambda r: r["run_id"])
    storage_io.write_parquet(cfg.storage, _p(cfg, "runs.parquet"), pa.Table.from_pylist(rows, schema=RUN_SCHEMA))


def committed_runs(cfg: SummarizeConfig) -> list[str]:
    """Run ids whose summaries file exists (their outputs are committed)."""
    fs, root = storage_io.filesystem(cfg.storage, _p(cfg, "runs"))
    if not fs.exists(root):
        return []
    return sorted(posixpath.basename(posixpath.dirname(posixpath.dirname(f)))
                  for f in fs.glob(posixpath.join(root, "*", "summaries", "part-0.parquet")))


def read_summaries(cfg: SummarizeConfig) -> pa.Table:
    """Every committed summary of every run (the union a reader should use)."""
    tables = [_read_table(cfg.storage, summaries_file(cfg, rid)) for rid in committed_runs(cfg)]
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables) if tables else SUMMARY_SCHEMA.empty_table()


# ---- recovery ------------------------------------------------------------------------------------
def _run_row(rid: str, start: str, end: str, status: str, message: str = "", **counts) -> dict:
    row = dict.fromkeys(RUN_SCHEMA.names)
    row.update(run_id=rid, scheduled_time=parse_run_id(rid).isoformat(), start_time=start, end_time=end,
               status=status, message=message)
    for k in ("docs_new", "docs_done", "docs_error", "docs_skipped", "input_tokens", "output_tokens"):
        row[k] = int(counts.get(k) or 0)
    row["tokens_per_s"], row["speedup"] = counts.get("tokens_per_s"), counts.get("speedup")
    return row


def recover(cfg: SummarizeConfig, manifest: Manifest, current: str) -> tuple[list[str], list[str]]:
    """Fold runs that committed but were killed before recording into the manifest (and runs.parquet);
    list the runs that planned their documents but never committed (to be finished first), and
    delete run directories killed before that. Call with the lock held. Returns (notes, runs to resume)."""
    notes, resume = [], []
    done = committed_runs(cfg)
    known_runs = {r["run_id"] for r in read_runs(cfg)}
    for rid in done:
        if rid in manifest.run_ids and rid in known_runs:
            continue
        rows = _read_table(cfg.storage, summaries_file(cfg, rid)).to_pylist()
        n = manifest.record(rows, rid)
        if rid not in known_runs:
            now = datetime.now(timezone.utc).isoformat()
            _append_run(cfg, _run_row(rid, "", now, "recovered", "committed, then killed before it was recorded",
                                      docs_new=len(rows), docs_done=sum(not r["error_type"] for r in rows),
                                      docs_error=sum(bool(r["error_type"]) for r in rows)))
        notes.append(f"run {rid}: its {len(rows)} committed summaries recorded ({n} new in the manifest)")
    fs, root = storage_io.filesystem(cfg.storage, _p(cfg, "runs"))
    if fs.exists(root):
        for d in sorted(fs.ls(root, detail=False)):
            rid = posixpath.basename(d.rstrip("/"))
            if rid in done or rid == current:
                continue
            if storage_io.exists(cfg.storage, _plan_file(cfg, rid)):
                resume.append(rid)
                notes.append(f"run {rid}: never committed; it is finished first (its committed batches are kept)")
            else:
                fs.rm(d, recursive=True)
                notes.append(f"run {rid}: killed before it planned its documents; its directory deleted")
    return notes, resume


def _plan_file(cfg: SummarizeConfig, rid: str) -> str:
    return _p(cfg, "runs", rid, "documents.jsonl")


# ---- prompts -------------------------------------------------------------------------------------
class Prompter:
    """Truncates documents to fit and builds each tick's prompt rows."""

    def __init__(self, cfg: SummarizeConfig):
        from transformers import AutoConfig, AutoTokenizer

        from conflayers.models import encode_prompts, resolve_source

        path, kwargs = resolve_source(cfg.model.source)
        self.tok = AutoTokenizer.from_pretrained(path, **kwargs)
        context = int(getattr(AutoConfig.from_pretrained(path, **kwargs), "max_position_embeddings", 0) or 1 << 30)
        overhead = len(encode_prompts(self.tok, [cfg.summary.template.format(document=".")], cfg.generation.chat)[0])
        self.budget = min(cfg.input.max_input_tokens, context - overhead - cfg.generation.max_tokens - 1)
        if self.budget < 16:
            raise ValueError(f"generation.max_tokens: {cfg.generation.max_tokens} new tokens plus the template leave "
                             f"{self.budget} of the model's {context}-token context for a document")
        self.cfg = cfg

    def row(self, doc: Document, version: int) -> tuple[dict, dict]:
        """(prompt row for the pipeline, the summary row's document fields)."""
        pid = hashlib.sha1(f"{doc.key}\x00{version}".encode()).hexdigest()[:20]
        meta = {"id": doc.key, "source": doc.source, "row_id": doc.row_id, "version": version,
                "fingerprint": doc.fingerprint, "truncated": False, "num_document_tokens": None,
                "reference": doc.reference, "error_type": doc.error_type, "error_message": doc.error_message}
        rec = {"id": pid, "dataset": self.cfg.summary.dataset, "prompt": "", "reference": doc.reference}
        if doc.error_type:
            return rec, meta
        ids = self.tok(doc.text, add_special_tokens=False)["input_ids"]
        meta["num_document_tokens"] = min(len(ids), self.budget)
        text = doc.text
        if len(ids) > self.budget:
            if self.cfg.input.on_too_long == "error":
                meta.update(error_type="too_long", error_message=(
                    f"the document has {len(ids)} tokens; input.max_input_tokens / the context allow {self.budget} "
                    "(input.on_too_long: error)"))
                return rec, meta
            text, meta["truncated"] = self.tok.decode(ids[: self.budget]), True
        rec["prompt"] = self.cfg.summary.template.format(document=text)
        return rec, meta


# ---- one tick ------------------------------------------------------------------------------------
def _summary_rows(meta: dict[str, dict], gens: dict[str, dict], rid: str) -> list[dict]:
    from ..metrics import rouge2

    out = []
    for pid, m in meta.items():
        g = gens.get(pid, {})
        row = dict.fromkeys(SUMMARY_SCHEMA.names)
        row.update({k: m[k] for k in ("id", "source", "row_id", "version", "fingerprint", "truncated",
                                      "num_document_tokens", "error_type", "error_message")})
        row["run_id"] = rid
        if not m["error_type"]:
            for k in ("num_input_tokens", "num_generated_tokens", "finish_reason", "tau", "acceptance_rate",
                      "plain_steps", "ngram_steps", "corpus_steps", "layerskip_steps", "skip_set", "error_type", "error_message"):
                row[k] = g.get(k)
            text = (g.get("generated_text") or "").strip()
            row["summary"] = text
            row["hit_budget"] = g.get("finish_reason") == "length"
            n = row["num_generated_tokens"] or 0
            row["compression_ratio"] = (m["num_document_tokens"] / n) if n else None
            if not row["error_type"] and not text:
                row["error_type"], row["error_message"] = "empty_summary", "the model produced no text"
            if m["reference"] and text:
                row["rouge2"] = rouge2([(m["reference"], text)])
        out.append(row)
    return out


def _driver_exit(cfg: SummarizeConfig, point: str) -> None:
    if cfg.debug.driver_exit_at == point:  # tests: a driver killed at this point of the commit protocol
        logging.shutdown()
        os._exit(17)


def run_tick(cfg: SummarizeConfig, tick: datetime) -> dict:
    """One tick (Ray initialised): returns its runs.parquet row (status ``skipped`` when the lock is held)."""
    rid = run_id(tick)
    start = datetime.now(timezone.utc).isoformat()
    lock = RunLock(cfg.storage, _p(cfg, "state", "lock.json"), cfg.schedule.lock_ttl_s, rid)
    held, why = lock.acquire(cfg.schedule.concurrency)
    if not held:
        log.warning("tick %s skipped: %s", rid, why)
        return _run_row(rid, start, datetime.now(timezone.utc).isoformat(), "skipped", why)
    log.info("tick %s: lock %s", rid, why)
    try:
        return _run_locked(cfg, rid, start, lock)
    finally:
        lock.release()


def _run_locked(cfg: SummarizeConfig, rid: str, start: str, lock: RunLock) -> dict:
    manifest_path = _p(cfg, "state", "manifest.parquet")
    manifest = Manifest.load(cfg.storage, manifest_path)
    notes, resume = recover(cfg, manifest, rid)
    for n in notes:
        log.info("recovery: %s", n)
    if notes:
        manifest.save(cfg.storage, manifest_path)
    for old in resume:  # a killed run's documents, as it planned them: its committed batches are not redone
        plan = [json.loads(line) for line in storage_io.read_bytes(cfg.storage, _plan_file(cfg, old)).decode().splitlines()]
        _generate_and_commit(cfg, old, plan, manifest, lock, {"docs_new": len(plan)}, start, "resumed")
    if rid in committed_runs(cfg):
        log.info("tick %s: already committed; nothing to do", rid)
        return next(r for r in read_runs(cfg) if r["run_id"] == rid)

    source = cfg.input.path or DEMO_DOCUMENTS
    files, ignored_files = list_documents(cfg.storage, source)
    docs = [d for f in files for d in read_documents(cfg.storage, f, cfg.input.text_field, cfg.input.id_field,
                                                         cfg.input.reference_field)]
    todo, unchanged, edits_ignored = manifest.pending(docs, cfg.input.on_change)
    take, deferred = todo[: cfg.input.max_docs_per_run], todo[cfg.input.max_docs_per_run:]
    log.info("tick %s: %d document(s) in %d file(s) under %s (%d other file(s) ignored): %d new or changed, "
             "%d unchanged, %d edited but ignored (on_change: ignore), %d deferred past max_docs_per_run", rid,
             len(docs), len(files), source, len(ignored_files), len(todo), unchanged, edits_ignored, len(deferred))
    counts = {"docs_new": len(todo), "docs_skipped": len(deferred) + edits_ignored}
    if not take:
        row = _run_row(rid, start, datetime.now(timezone.utc).isoformat(), "no_new_documents", **counts)
        _append_run(cfg, row)
        return row
    prompter = Prompter(cfg)
    plan = []
    for doc, version in take:
        rec, m = prompter.row(doc, version)
        plan.append({**m, "pid": rec["id"], "record": rec if not m["error_type"] else None})
    # the plan first (atomic): a run killed after this point is finished by the next tick, not redone
    storage_io.write_bytes_atomic(cfg.storage, _plan_file(cfg, rid), "".join(json.dumps(p) + "\n" for p in plan).encode())
    return _generate_and_commit(cfg, rid, plan, manifest, lock, counts, start, "ok")


def _generate_and_commit(cfg: SummarizeConfig, rid: str, plan: list[dict], manifest: Manifest, lock: RunLock,
                         counts: dict, start: str, status: str) -> dict:
    """Generate the planned documents' summaries (resuming the run's committed batches), commit them,
    record them in the manifest and runs.parquet; returns the run's row."""
    from ..run import generations_path, run as run_pipeline

    pcfg = pipeline_config(cfg, _p(cfg, "runs", rid))
    recs = [p["record"] for p in plan if p["record"]]
    meta = {p["pid"]: p for p in plan}
    metrics_all, gens = {}, {}
    t0 = time.perf_counter()
    if recs:
        storage_io.write_bytes_atomic(cfg.storage, pcfg.input.path, "".join(json.dumps(r) + "\n" for r in recs).encode())
        metrics = run_pipeline(pcfg)
        metrics_all = next((m for m in metrics if m["dataset"] == "__all__"), {})
        table = storage_io.read_parquet_dir(cfg.storage, generations_path(pcfg))
        gens = {r["id"]: r for r in (table.to_pylist() if table is not None else [])}
    wall = time.perf_counter() - t0
    rows = _summary_rows(meta, gens, rid)
    _driver_exit(cfg, "before_commit")
    if not lock.still_held():
        raise RuntimeError(f"run {rid}: the run lock was taken over by another run; nothing committed "
                           "(the documents stay pending)")
    storage_io.write_parquet(cfg.storage, summaries_file(cfg, rid), pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA))
    _driver_exit(cfg, "after_commit")
    manifest.record(rows, rid)
    manifest.save(cfg.storage, _p(cfg, "state", "manifest.parquet"))
    errors = sum(bool(r["error_type"]) for r in rows)
    out_tokens = sum(r["num_generated_tokens"] or 0 for r in rows)
    if errors and status == "ok":
        status = "ok_with_errors"
    row = _run_row(rid, start, datetime.now(timezone.utc).isoformat(), status,
                   docs_done=len(rows) - errors, docs_error=errors,
                   input_tokens=sum(r["num_input_tokens"] or 0 for r in rows), output_tokens=out_tokens,
                   tokens_per_s=out_tokens / wall if wall and out_tokens else None,
                   speedup=metrics_all.get("spec_gain"), **counts)
    _append_run(cfg, row)
    log.info("run %s: committed %d summaries (%d errors) to %s", rid, len(rows), errors, summaries_file(cfg, rid))
    return row


def missed_ticks(cfg: SummarizeConfig, schedule: Schedule, now: datetime) -> list[datetime]:
    """The ticks due since the last recorded run, oldest first, at most ``schedule.max_catch_up``
    (the most recent ones); none before a first run."""
    runs = [r for r in read_runs(cfg) if r["status"] != "skipped"]
    if not runs:
        return []
    due = schedule.due(parse_run_id(runs[-1]["run_id"]), now, limit=100_000)
    return due[-cfg.schedule.max_catch_up:]


def runs_table(rows: list[dict], last: int = 10) -> str:
    """The last runs as a printed table."""
    head = ["run_id", "status", "new", "done", "error", "skipped", "out tokens", "tok/s", "speedup"]
    body = [[r["run_id"], r["status"], r["docs_new"], r["docs_done"], r["docs_error"], r["docs_skipped"],
             r["output_tokens"], "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
             "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"] for r in rows[-last:]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
