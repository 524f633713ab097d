"""The generation stage: a callable class for ``Dataset.map_batches`` (one instance per Ray actor).

Per actor: the model is loaded once, the in-flight width is chosen once (``engine.max_batch``;
``auto`` measures it), and one skip-set policy is kept per dataset (started from the coordinator's
cluster-wide best set when it has one). Per batch (hundreds of rows):

1. turn each row into token ids; unusable rows (too long, bad prompt) become error rows;
2. stream every row through the continuous engine, each with its own token budget, freed slots
   refilled at once, under ``search.drafter``. Rows of all datasets share the decode batch. With
   ``auto`` (default) one controller per actor (``conflayers.drafts.auto.AutoDrafter``) picks per
   step n-gram or corpus drafts (per row), a layer-skip draft for one dataset's rows (a draft pass
   runs one skip set for the whole forward; the other rows decode plainly that step), or plain
   decoding, whichever the cost surface predicts commits the most tokens/s; the surface is
   measured once per kind of accelerator and shared through the coordinator. ``layerskip`` gives
   the datasets the draft in turn (``conflayers.drafts.router.GroupRouter``), each under its own
   dataset's policy. Corpus drafts come from one index per dataset (``conflayers.drafts.corpus``): loaded
   from the last run's file, refreshed before each batch from the outputs other actors pooled
   (files in storage whose addresses the coordinator passes on), and the batch's own outputs
   written there after it (``pipeline.corpus_pool``);
3. the rows picked for the baseline (a fraction, and at least a few per dataset) stream on their
   own, once under the policies and once with plain decoding: same actor, same rows, same width;
4. report the batch's observations to the coordinator, write the batch's rows to one Parquet file
   whose name depends only on the batch's ids, and return them. A retried batch whose file is
   already committed (its first attempt committed, then its result was lost with a node) is read
   back and returned, not generated again.

The coordinator is advice (``pipeline.advice``): its reads are bounded and taken when they arrive,
its writes never waited on; when it is gone or slow the actor decodes on its own state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict

import pyarrow as pa

from . import io as storage_io
from .config import PipelineConfig
from .policies import current_set, is_settled, make_policy, search_iterations
from .reader import RowError

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.string()),
        ("reference", pa.string()),
        ("generated_text", pa.string()),
        ("num_input_tokens", pa.int64()),
        ("num_generated_tokens", pa.int64()),
        ("max_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("prefill_seconds", pa.float64()),
        ("decode_seconds", pa.float64()),
        ("compute_seconds", pa.float64()),  # this row's share of its engine call's wall time
        ("steps", pa.int64()),
        ("drafted", pa.int64()),
        ("accepted", pa.int64()),
        ("acceptance_rate", pa.float64()),
        ("tau", pa.float64()),
        ("accept_hist", pa.list_(pa.int64())),
        ("plain_steps", pa.int64()),  # steps by what was verified: no draft, an n-gram draft, a layer-skip draft
        ("ngram_steps", pa.int64()),
        ("corpus_steps", pa.int64()),
        ("layerskip_steps", pa.int64()),
        ("skip_set", pa.list_(pa.int64())),
        ("baseline", pa.bool_()),
        ("baseline_num_generated_tokens", pa.int64()),
        ("baseline_compute_seconds", pa.float64()),
        ("baseline_exact_match", pa.bool_()),
        ("baseline_width", pa.int64()),  # rows in flight when the baseline rows were decoded (both ways)
        ("search_iterations", pa.int64()),
        ("actor_id", pa.string()),
        ("accelerator", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
    ]
)


def batch_file_name(ids: list[str]) -> str:
    """Depends only on the batch's ids: a retried batch overwrites its own file, never duplicates it."""
    return "batch-" + hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20] + ".parquet"


class BatchProgress:
    """A batch's rows as they finish, sent to the coordinator at most every 5 s (and by ``send``):
    the driver's progress display counts them before the batch is committed. ``advice`` is a
    ``pipeline.advice.Advice`` (a send never waits) or None."""

    def __init__(self, advice, batch: str, errors: int, every_s: float = 5.0):
        self.advice, self.batch, self.every_s = advice, batch, every_s
        self.rows = self.errors = errors  # rows that failed before generation are done already
        self.tokens = 0
        self.sent = time.monotonic()

    def row(self, tokens: int, error: bool) -> None:
        self.rows += 1
        self.errors += error
        self.tokens += tokens
        if time.monotonic() - self.sent >= self.every_s:
            self.send()

    def send(self) -> None:
        self.sent = time.monotonic()
        if self.advice is not None:
            self.advice.send("batch_progress", self.batch, self.rows, self.tokens, self.errors)


def committed_counts(out: list[dict]) -> tuple[int, int, int]:
    """(rows, generated tokens, error rows) of a committed batch."""
    return (len(out), sum(r.get("num_generated_tokens") or 0 for r in out), sum(bool(r.get("error_type")) for r in out))


def in_baseline_fraction(row_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(row_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class GenerationActor:
    def __init__(self, cfg: PipelineConfig, coordinator: str | None = None, namespace: str | None = None,
                 row_tokens: int | None = None, lanes: int | None = None, expected_rows: int | None = None):
        """``row_tokens``: KV positions a row may need (default: ``generation.max_tokens`` + 1024);
        ``lanes``: a server's decode lanes, which share the KV budget (always set then: half of free
        memory unless ``engine.kv_cache_gb``), each getting an equal part."""
        import torch

        t_init = time.perf_counter()

        from conflayers import Engine
        from conflayers.models import load_model
        from conflayers.search.registry import model_identity

        self.cfg = cfg
        self.device = resolve_device(cfg.model.device)
        if self.device == "cpu":
            torch.set_num_threads(cfg.engine.threads or max(1, int(cfg.ray.num_cpus_per_actor)))
        self.accelerator = torch.cuda.get_device_name() if self.device.startswith("cuda") else "cpu"
        m = cfg.model
        if not cfg.progress.verbose:  # the job draws its own progress: no per-actor "Loading weights" bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        self.model, self.tokenizer = load_model(m.source, m.dtype, self.device, allow_pickle=m.allow_pickle,
                                                trust_remote_code=m.trust_remote_code, revision=m.revision)
        self.engine = Engine(self.model, cfg.model.kernels, compile=cfg.engine.compile)
        e = cfg.engine
        self.kv_budget = None if e.kv_cache_gb is None else int(e.kv_cache_gb * 2**30)
        if lanes:
            from conflayers.costs.width import default_kv_budget

            total = self.kv_budget if self.kv_budget is not None else default_kv_budget(self.engine.device)
            self.kv_budget = total // lanes
        row_tokens = row_tokens or cfg.generation.max_tokens + 1024
        if e.max_batch == "auto":
            from conflayers.costs.width import choose_width

            choice = choose_width(self.engine, self.kv_budget, row_tokens=row_tokens)
            self.width, eager_tps = choice.width, choice.tokens_per_s[choice.width]
            log.warning("actor width %d (auto; measured plain decode tok/s by width: %s)", self.width,
                        {w: round(v, 1) for w, v in choice.tokens_per_s.items()})
        else:
            self.width, eager_tps = int(e.max_batch), None
        if e.compile == "auto" and (expected_rows or lanes):  # compiled steps where they are faster at this width
            # and the run pays back compiling (a server's run is open-ended; a run of unknown size stays eager)
            from conflayers.costs.compile import choose_compile

            compiled = choose_compile(self.engine, self.width, expected_rows and expected_rows * cfg.generation.max_tokens,
                                      eager_tokens_per_s=eager_tps)
            log.warning("actor steps: %s (%s)", "compiled" if compiled.compiled else f"eager, {compiled.kernels} kernels",
                        compiled.reason)
        self.model_id = model_identity(self.model)
        self.actor_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.policies: dict[str, object] = {}
        self.auto = None  # the drafter: auto controller, made at the first batch
        self.corpus = None  # the corpus drafter (its index per dataset), made at the first batch
        self.corpus_key = None  # the model/tokenizer its indexes are for (pipeline.corpus.index_key)
        self.corpus_seen: dict[str, int] = {}  # per dataset: the last pooled output taken from the coordinator
        self.pooled: dict[str, dict[str, int]] = defaultdict(dict)  # per dataset: this actor's pool files -> tokens
        self.reports: dict[str, dict] = {}  # per dataset: this actor's cumulative report (re-sent whole each time)
        self.committed: dict[str, tuple[int, int, int]] = {}  # batches this actor committed -> counts
        self.batch_news: dict = {}  # this batch's reports and pooled file, sent with its commit
        # a server (lanes) drafts from the saved indexes as they are: an identical seeded request must
        # get identical drafts (and so the same samples), whatever was served in between
        self.learns_corpus = not lanes
        self.baseline_count: Counter = Counter()
        self.advice = None  # pipeline.advice.Advice: the coordinator, every call bounded
        self.surface_shared = None  # (key, surface dict) this actor measured or loaded: re-sent after a restart
        if coordinator:
            import ray

            from .advice import Advice

            try:
                handle = ray.get_actor(coordinator, namespace=namespace)
            except ValueError as e:  # gone for good (not restarting): the actor runs on its own state
                log.warning("coordinator %s not found (%s): this actor runs without it", coordinator, e)
                handle = None
            self.advice = Advice(handle, cfg.ray.coordinator_timeout_s, cfg.ray.coordinator_retry_s)
            self.advice.on_restart = self._resend
            hello = self.advice.ask("hello")
            self.advice.epoch = hello["epoch"] if hello else None
        # start-up ends with the cost surface in hand (drafter auto), not in the first batch
        self.surface = self._surface() if cfg.search.drafter == "auto" else None
        self.threads = torch.get_num_threads() if self.device == "cpu" else 0
        self.ready_info = {"accelerator": self.accelerator, "width": self.width, "threads": self.threads,
                           "init_seconds": time.perf_counter() - t_init, "ready_at": time.time()}
        if self.advice is not None:
            self.advice.send("actor_ready", self.actor_id, self.ready_info)

    # -- helpers ------------------------------------------------------------------------------
    def _crash_once(self) -> None:
        marker = self.cfg.debug.crash_once_marker
        if marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(self.actor_id)
            log.warning("debug.crash_once_marker: actor %s exits mid-batch on purpose", self.actor_id)
            os._exit(1)

    def _hang_if_asked(self, ids: list[str]) -> None:
        """Tests: a batch that never finishes (a hung kernel, a stuck read)."""
        d = self.cfg.debug
        once = d.hang_once_marker and not os.path.exists(d.hang_once_marker)
        if once:
            with open(d.hang_once_marker, "w") as f:
                f.write(self.actor_id)
        if once or set(ids) & set(map(str, d.hang_ids)):
            log.warning("debug: actor %s hangs on purpose (batch of %s)", self.actor_id, ids[:3])
            time.sleep(3600)

    def _attempt(self, ids: list[str]) -> int:
        """This batch's attempt number (1 = first), counted in ``<output>/attempts/`` (a retried batch runs
        on a restarted or another actor, so the count lives with the outputs)."""
        path = storage_io.join(self.cfg.output.path, "attempts", batch_file_name(ids).replace(".parquet", ".json"))
        n = 0
        if storage_io.exists(self.cfg.storage, path):
            n = int(json.loads(storage_io.read_bytes(self.cfg.storage, path)).get("attempts", 0))
        storage_io.write_bytes_atomic(self.cfg.storage, path, json.dumps({"attempts": n + 1}).encode())
        return n + 1

    def _watchdog(self, ids: list[str]):
        """``ray.batch_timeout_s``: a timer that ends this actor's process if the batch outlives it (Ray then
        restarts the actor and retries the batch; nothing of the batch was committed)."""
        timeout = self.cfg.ray.batch_timeout_s

        def expire():
            log.error("batch of %d rows (%s ...) still running after ray.batch_timeout_s=%g s: actor %s exits so "
                      "Ray retries it", len(ids), ids[0], timeout, self.actor_id)
            os._exit(3)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        return timer

    def _resend(self) -> None:
        """The coordinator restarted empty: send it what this actor holds (start-up info, cost surface,
        cumulative reports, committed batches' counts, pooled files), each idempotent."""
        a = self.advice
        a.send("actor_ready", self.actor_id, self.ready_info)
        if self.surface_shared is not None:
            a.send("put_surface", *self.surface_shared)
        for d, state in self.reports.items():
            a.send("report", d, self.actor_id, state)
        if self.committed:
            a.send("batches_committed", dict(self.committed))
        for d, files in self.pooled.items():
            for path, n in files.items():
                a.send("corpus_put", d, self.corpus_key, self.actor_id, path, n)

    def _take_advice(self, datasets: list[str]) -> dict:
        """The per-batch read: take the one sent before the last batch if it has arrived, and send the
        next. For a dataset this actor has no policy for yet, wait for it (bounded by
        ``ray.coordinator_timeout_s``): its best set is where the policy starts."""
        a = self.advice
        if a is None:
            return {}
        searching = self.cfg.search.drafter in ("auto", "layerskip")  # a policy per dataset, started from the best set
        new = [d for d in datasets if d not in self.policies] if searching else []
        got = a.arrived(wait_s=a.timeout_s if new and a.pending is not None else 0.0)
        if got is not None and not all(d in got.get("best", {}) for d in new):
            a.prefetch(self.actor_id, datasets, dict(self.corpus_seen), self.cfg.corpus_index.share_tokens)
            got2 = a.arrived(wait_s=a.timeout_s)
            got = _merge_advice(got, got2)
        elif got is None and new:
            a.prefetch(self.actor_id, datasets, dict(self.corpus_seen), self.cfg.corpus_index.share_tokens)
            got = a.arrived(wait_s=a.timeout_s)
        return got or {}

    def _policy(self, dataset: str, warm: list[int] | None = None):
        if dataset not in self.policies:
            s = self.cfg.search
            self.policies[dataset] = make_policy(s.searcher, self.model, s.skip_layers, s.knobs, warm, dataset,
                                                 s.registry)
        return self.policies[dataset]

    def _drafter(self, datasets: list[str]):
        """The drafter for a batch's rows (``search.drafter``). ``auto``: one controller per actor, so
        its acceptance estimates and the refined cost surface carry over from batch to batch; each
        dataset's layer-skip drafts run under that dataset's policy."""
        from conflayers import LayerSkipDrafter
        from conflayers.drafts.auto import build_drafter

        s = self.cfg.search
        advice = self._take_advice(datasets)
        best = advice.get("best", {})
        layer_skip = None
        if s.drafter in ("auto", "layerskip"):
            layer_skip = {d: LayerSkipDrafter(self.model, self._policy(d, best.get(d)), s.stop_threshold,
                                              s.max_draft_len)
                          for d in datasets}
        self._refresh_corpus(datasets, advice.get("pool", {}))
        if self.advice is not None:  # the next batch's advice, sent now, taken then if it has arrived
            self.advice.prefetch(self.actor_id, datasets, dict(self.corpus_seen), self.cfg.corpus_index.share_tokens)
        if s.drafter != "auto":
            return build_drafter(s.drafter, self.model, layer_skip, None, s.max_draft_len, s.ngram_max,
                                 corpus=self.corpus)
        if self.auto is None:
            self.auto = build_drafter("auto", self.model, {}, self.surface, s.max_draft_len, s.ngram_max,
                                      corpus=self.corpus)
        for d, drafter in layer_skip.items():
            self.auto.layer_skip.setdefault(d, drafter)
        return self.auto

    def _refresh_corpus(self, datasets: list[str], pool: dict | None = None) -> None:
        """Corpus drafts on: make the drafter (each dataset's index loads its saved file when first
        used), then index the outputs other actors pooled that the coordinator's last answer named
        (``pool``: {dataset: (last sequence number, file addresses)}; read from storage here)."""
        from .corpus import index_key, load_index, uses_corpus

        if not uses_corpus(self.cfg):
            return
        if self.corpus is None:
            from conflayers.drafts.corpus import CorpusDrafter

            self.corpus_key = index_key(self.model_id, self.tokenizer)
            self.corpus = CorpusDrafter(new_index=lambda d: load_index(self.cfg, d, self.corpus_key),
                                        max_tokens=self.cfg.search.max_draft_len,
                                        learn_finished=self.learns_corpus, learn_prompts=self.cfg.corpus_index.learn_prompts)
        for d in datasets:
            self.corpus.index_for(d)  # the saved index first, then this run's pooled outputs
        from .corpus_pool import read_batch

        for d, (last, addresses) in (pool or {}).items():
            if d not in datasets or last <= self.corpus_seen.get(d, 0):
                continue  # a dataset this batch does not draft, or an answer already taken
            self.corpus_seen[d] = last
            for address in addresses:
                for o in read_batch(self.cfg, address, d, self.corpus_key):
                    self.corpus.learn(o, d)

    def _share_corpus(self, batch: str, outputs: dict[str, list]) -> None:
        """This batch's finished outputs per dataset: one file in storage (``pipeline.corpus_pool``),
        its address to the coordinator for other actors; the driver saves the pool at the end."""
        if self.corpus is None or not self.learns_corpus or not any(outputs.values()):
            return
        from .corpus_pool import write_batch

        path = write_batch(self.cfg, batch, self.corpus_key, outputs)
        for d, outs in outputs.items():
            n = sum(len(o) + 1 for o in outs)
            if outs and path:
                self.pooled[d][path] = n
                files = self.pooled[d]  # kept for a re-send after a restart: the newest within the pool's cap
                while sum(files.values()) > self.cfg.corpus_index.max_tokens_indexed and len(files) > 1:
                    del files[next(iter(files))]
                self.batch_news.setdefault("pool", {})[d] = (self.corpus_key, path, n)

    def _surface(self):
        """The cost surface for this accelerator: the coordinator's if another actor measured it,
        else the cache file's, else measured now (and shared)."""
        from conflayers.costs.calibrate import load_or_calibrate
        from conflayers.costs.surface import CostSurface, surface_key
        from conflayers.drafts.auto import surface_grid

        widths, qs = surface_grid(self.width, self.cfg.search.max_draft_len)
        key = surface_key(self.engine)
        if self.advice is not None:
            raw = self.advice.ask("surface", key)
            if raw:
                s = CostSurface.from_dict(raw)
                if s.covers(widths, qs):
                    return s
        s = self.cfg.search
        cache = s.costs or (os.path.join(os.path.dirname(os.path.abspath(s.registry)), "costs.json")
                            if s.registry else None)
        surface, cached = load_or_calibrate(self.engine, widths, qs, cache_file=cache)
        log.warning("cost surface for %s: %s", key, "from the cache" if cached else "measured")
        if self.advice is not None:
            self.surface_shared = (key, surface.as_dict())
            self.advice.send("put_surface", *self.surface_shared)
        return surface

    def _gen_config(self):
        """Sampling for every row; each row's token budget travels with its ``Request``."""
        from conflayers import GenerationConfig, SamplingParams

        g = self.cfg.generation
        return GenerationConfig(g.max_tokens, SamplingParams(g.temperature, g.top_p, g.top_k), seed=g.seed)

    def _encode(self, row: dict) -> list[int]:
        from conflayers.models import encode_prompts

        prompt = json.loads(row["messages"]) if row.get("messages") else row["prompt"]
        ids = encode_prompts(self.tokenizer, [prompt], chat=self.cfg.generation.chat)[0]
        if len(ids) >= self.engine.context:
            raise RowError("prompt_too_long", f"the prompt has {len(ids)} tokens; the model's context is "
                                               f"{self.engine.context} tokens")
        return ids

    def _decode(self, items: list[tuple[int, object]], drafter, progress: "BatchProgress | None" = None):
        """Stream (row index, Request) items through the engine, shortest prompt first (rows in flight
        attend over the longest one's positions); returns ({row index: result}, wall). Each finished
        row counts in ``progress``."""
        items = sorted(items, key=lambda it: len(it[1].token_ids))
        t0 = time.perf_counter()
        results = {}
        stream = self.engine.stream([req for _, req in items], self._gen_config(),
                                    drafter, max_batch=min(self.width, len(items)),
                                    prefill_tokens=self.cfg.engine.prefill_tokens, kv_budget_bytes=self.kv_budget)
        for j, r in stream:
            results[items[j][0]] = r
            if progress is not None:
                progress.row(r.stats.new_tokens, bool(r.error))
        return results, time.perf_counter() - t0

    # -- the batch ------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        self._crash_once()
        rows = batch.to_pylist()
        done = self._already_committed([r["id"] for r in rows])
        if done is not None:
            return done
        if self.cfg.ray.batch_timeout_s is None:
            return self._run_batch(rows)
        ids = [r["id"] for r in rows]
        attempt = self._attempt(ids)
        if attempt > self.cfg.ray.batch_attempts:
            return self._timed_out(rows, attempt - 1)
        timer = self._watchdog(ids)
        try:
            self._hang_if_asked(ids)
            return self._run_batch(rows)
        finally:
            timer.cancel()

    def _already_committed(self, ids: list[str]) -> pa.Table | None:
        """The batch's committed file, if a previous attempt wrote it (its result lost on the way back,
        e.g. with a node): read back and returned as is, so the retry costs a read, not a generation."""
        import pyarrow.parquet as pq

        name = batch_file_name(ids)
        path = storage_io.join(self.cfg.output.path, "generations", name)
        try:
            if not storage_io.exists(self.cfg.storage, path):
                return None
            table = pq.read_table(pa.BufferReader(storage_io.read_bytes(self.cfg.storage, path)))
        except (OSError, ValueError, pa.ArrowException) as e:
            log.warning("batch file %s exists but cannot be read (%s): the batch is generated again", path, e)
            return None
        if sorted(table.column("id").to_pylist()) != sorted(ids):
            return None
        log.warning("batch %s (%d rows) is already committed: returned as written, not generated again", name, len(ids))
        table = table.cast(OUTPUT_SCHEMA) if table.schema != OUTPUT_SCHEMA else table
        self._committed(name, table.to_pylist())
        return table

    def _committed(self, name: str, out: list[dict]) -> None:
        """A committed batch's final counts, its datasets' reports and pooled file, to the coordinator in one
        message (every path that commits goes through here)."""
        self.committed[name] = committed_counts(out)
        news, self.batch_news = self.batch_news, {}
        if self.advice is not None:
            self.advice.send("batch_done", self.actor_id, name, self.committed[name], news.get("reports", {}),
                             news.get("pool", {}))

    def _timed_out(self, rows: list[dict], attempts: int) -> pa.Table:
        """The rows of a batch that timed out in every attempt, as ``timeout`` error rows (committed like
        any batch, so the job finishes and the rows can be rerun on their own)."""
        out = []
        for row in rows:
            rec = {k: row.get(k) for k in ("id", "dataset", "prompt", "messages", "reference", "max_tokens")}
            rec.update(actor_id=self.actor_id, accelerator=self.accelerator, baseline=False,
                       error_type=row.get("error_type") or "timeout",
                       error_message=row.get("error_message") or (
                           f"its batch did not finish within ray.batch_timeout_s={self.cfg.ray.batch_timeout_s:g} s "
                           f"in {attempts} attempt(s) (ray.batch_attempts)"))
            out.append(rec)
        log.error("batch of %d rows (%s ...) timed out %d time(s): written as timeout error rows", len(rows),
                  rows[0]["id"] if rows else "-", attempts)
        return self._commit(out)

    def _run_batch(self, rows: list[dict]) -> pa.Table:
        from conflayers import NoDrafter, Request

        out: list[dict] = []
        todo: dict[str, list[tuple[int, Request]]] = defaultdict(list)
        for row in rows:
            rec = {k: row.get(k) for k in ("id", "dataset", "prompt", "messages", "reference", "max_tokens",
                                           "error_type", "error_message")}
            rec.update(actor_id=self.actor_id, accelerator=self.accelerator, baseline=False)
            out.append(rec)
            if rec["error_type"] is None:
                try:
                    ids = self._encode(rec)
                except RowError as e:
                    rec["error_type"], rec["error_message"] = e.error_type, str(e)
                except ValueError as e:
                    rec["error_type"], rec["error_message"] = "bad_prompt", str(e)
                else:
                    rec["num_input_tokens"] = len(ids)
                    max_new = rec["max_tokens"] or self.cfg.generation.max_tokens
                    todo[rec["dataset"]].append((len(out) - 1, Request(ids, max_new, group=rec["dataset"])))
        errors = [r for r in out if r["error_type"]]
        if errors and self.cfg.fail_fast:
            e = errors[0]
            raise RuntimeError(f"fail_fast: row {e['id']!r} ({e['dataset']}): {e['error_type']}: {e['error_message']}")
        progress = BatchProgress(self.advice, batch_file_name([r["id"] for r in out]), len(errors))

        b = self.cfg.baseline
        base, rest = [], []
        for dataset, items in todo.items():
            for item in items:
                rid = out[item[0]]["id"]
                if in_baseline_fraction(rid, b.fraction) or self.baseline_count[dataset] < b.min_per_dataset:
                    base.append(item)
                    self.baseline_count[dataset] += 1
                else:
                    rest.append(item)
        drafter = self._drafter(sorted(todo)) if todo else None
        per_dataset: dict[str, dict] = defaultdict(lambda: Counter())
        finished: dict[str, list] = defaultdict(list)  # outputs for the corpus index, per dataset
        for group, is_base in ((base, True), (rest, False)):
            if not group:
                continue
            results, secs = self._decode(group, drafter, progress)
            prompt_ids = {i: req.token_ids for i, req in group}
            tokens = sum(r.stats.new_tokens for r in results.values()) or 1
            for i, r in results.items():
                if r.error:
                    out[i]["error_type"], out[i]["error_message"] = "kv_budget", r.error
                    continue
                dataset = out[i]["dataset"]
                if self.corpus is not None:  # corpus drafts on: the output goes to the pool
                    finished[dataset].append((list(prompt_ids[i]) if self.cfg.corpus_index.learn_prompts else [])
                                             + list(r.token_ids))
                obs = per_dataset[dataset]
                # a row's share of the stream's wall time is its share of the tokens generated
                share = secs * r.stats.new_tokens / tokens
                self._fill(out[i], r, share, self.policies.get(dataset))
                obs["tokens"] += r.stats.new_tokens
                obs["steps"] += r.stats.steps
                obs["drafted"] += r.stats.drafted
                obs["accepted"] += r.stats.accepted
                obs["rows"] += 1
                obs["seconds"] += share
            if is_base:
                ok = [(i, req) for i, req in group if not results[i].error]
                plain, psecs = self._decode(ok, NoDrafter()) if ok else ({}, 0.0)
                ptokens = sum(r.stats.new_tokens for r in plain.values()) or 1
                for i, r in plain.items():
                    rec = out[i]
                    obs = per_dataset[rec["dataset"]]
                    rec["baseline"] = True
                    rec["baseline_num_generated_tokens"] = r.stats.new_tokens
                    rec["baseline_compute_seconds"] = psecs * r.stats.new_tokens / ptokens
                    rec["baseline_exact_match"] = list(r.token_ids) == list(rec.pop("_token_ids"))
                    rec["baseline_width"] = min(self.width, len(group))
                    obs["baseline_tokens"] += r.stats.new_tokens
                    obs["baseline_seconds"] += rec["baseline_compute_seconds"]
        for dataset, obs in per_dataset.items():
            policy = self.policies.get(dataset)  # None: drafter none runs no search
            obs["search_iterations"] = search_iterations(policy)
            obs["skip_set"] = current_set(policy)
            obs["settled"] = is_settled(policy)
            obs["model_id"], obs["n_layers"] = self.model_id, self.engine.n_layers
        for rec in out:
            rec.pop("_token_ids", None)

        for dataset, obs in per_dataset.items():
            self._report(dataset, obs)
        self._share_corpus(progress.batch, finished)
        return self._commit(out)

    def _report(self, dataset: str, obs: dict) -> None:
        """Add a batch's observations to this actor's cumulative report for ``dataset`` and send it whole."""
        from .coordinator import add_obs

        state = self.reports.setdefault(dataset, {"sets": {}, "settled": []})
        key = tuple(sorted(obs.get("skip_set") or ()))
        add_obs(state["sets"].setdefault(key, {}), obs)
        state["latest"] = list(key)
        if obs.get("settled", True) and list(key) not in state["settled"]:
            state["settled"].append(list(key))
        state["search_iterations"] = max(state.get("search_iterations", 0), int(obs.get("search_iterations") or 0))
        state["model_id"], state["n_layers"] = obs.get("model_id"), obs.get("n_layers")
        self.batch_news.setdefault("reports", {})[dataset] = state  # sent with the commit (``_committed``)

    def _commit(self, out: list[dict]) -> pa.Table:
        """Write the batch's rows as one Parquet file named by its ids (the commit), and return them."""
        table = pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)
        if out:
            name = batch_file_name([r["id"] for r in out])
            storage_io.write_parquet(self.cfg.storage, storage_io.join(self.cfg.output.path, "generations", name), table)
            self._committed(name, out)
        return table

    def _fill(self, rec: dict, r, compute_seconds: float, policy) -> None:
        s = r.stats.as_dict()
        rec["_token_ids"] = list(r.token_ids)
        rec["generated_text"] = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        rec["num_generated_tokens"] = s["new_tokens"]
        rec["compute_seconds"] = compute_seconds
        rec["search_iterations"] = search_iterations(policy)
        for k in ("finish_reason", "prefill_seconds", "decode_seconds", "steps", "drafted", "accepted",
                  "acceptance_rate", "tau", "accept_hist", "skip_set"):
            rec[k] = s[k]
        for k in ("ngram", "corpus", "layerskip"):
            rec[f"{k}_steps"] = s["drafter_steps"].get(k, 0)
        rec["plain_steps"] = s["drafter_steps"].get("none", 0)


def _merge_advice(a: dict | None, b: dict | None) -> dict | None:
    """Two answers of ``Coordinator.advice``: the later one's fields over the earlier one's."""
    if a is None or b is None:
        return a or b
    return {"epoch": b.get("epoch"), "best": {**a.get("best", {}), **b.get("best", {})},
            "pool": {**a.get("pool", {}), **b.get("pool", {})}}
