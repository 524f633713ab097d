"""The online endpoint: an OpenAI-compatible Ray Serve app over the same engine, drafters and skip sets.

One deployment, ``ConfLayersServer``, behind a FastAPI ingress: ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /healthz``. Each replica holds the model the
way a generation actor does (``pipeline.actor.GenerationActor``: model, tokenizer, engine, width, cost
surface, one skip-set policy per dataset, the ``auto`` controller) and a ``conflayers.scheduler.Scheduler``
whose thread decodes every request in flight in continuous batches: a request joins the batch at
its sampling setting's next round and leaves when it finishes. A request drafts under its dataset's
skip-set policy (``metadata.dataset``, else ``serve.dataset``); with ``search.searcher: cached`` and
``search.registry`` those are the skip sets the offline jobs learned.

Replicas: one GPU each where the cluster has GPUs (``serve.num_gpus``), else ``serve.num_cpus``
cores; ``serve.num_replicas`` / ``serve.autoscaling_config`` / ``serve.max_ongoing_requests`` are
Serve's own options. Protocol details: ``pipeline.serve.openai_api``.

Overload and timeouts use Serve's own mechanisms, which do the job: ``serve.max_queued_requests`` is the
deployment's ``max_queued_requests`` (requests waiting in the proxy for a replica slot), and a request
arriving when that queue is full gets 503 from the proxy with ``Retry-After`` (``backpressure_config``,
``RETRY_AFTER_S``), before it costs the replica anything. ``serve.request_timeout_s`` is the proxy's
HTTP ``request_timeout_s`` (set by ``jobs.serve.start``): past it the proxy answers 408, or closes a
stream it had started, and cancels the call in the replica, whose handler then cancels its scheduler
ticket exactly as for a client that went away (the slot frees at the next step). The replica also keeps
a deadline of its own, ``generation_deadline`` after the request reaches it (a second before the
proxy's, at most a tenth of it): a generation still running then is stopped with 504, or a stream ends
with an error event and ``[DONE]``. So a stream that did not wait long in the queue ends cleanly rather
than being cut, and no generation outlasts the timeout where the proxy's options are not ours (``serve
run``, a Serve already running on the cluster, a client's ``x-request-timeout-seconds`` header). The
replica cannot see how long the proxy queued a request, so a stream that waited there over a second and
is still generating at the timeout is closed by the proxy without an error event. A replica that dies is
restarted by Serve (its health check); the requests it held fail (500, or a stream cut off).
"""

import asyncio
import copy
import hmac
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig

from ..config import JobSections, check, validate
from .openai_api import ApiError, Limits, TextStream, chunk, new_id, now, parse_request, response, usage

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # the Retry-After of a 503 over serve.max_queued_requests: a slot frees as a request ends


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"  # the HTTP address; 0.0.0.0 exposes the server to the network
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "conflayers"
    model_name: Optional[str] = None  # the `model` clients name; None: the last part of model.source
    api_key: Optional[str] = None  # clients send "Authorization: Bearer <key>"; set it as ${oc.env:VARIABLE}
    dataset: str = "default"  # the dataset tag (skip-set policy) of a request without metadata.dataset
    num_replicas: Any = 1  # an integer, or "auto" (Serve autoscaling; see autoscaling_config)
    autoscaling_config: Optional[dict] = None  # Serve's, e.g. {min_replicas: 1, max_replicas: 4}
    max_ongoing_requests: int = 64  # per replica: requests over this wait in Serve's queue
    max_queued_requests: int = 64  # Serve's queue (per proxy); a request arriving when it is full: 503 + Retry-After
    request_timeout_s: float = 300.0  # a request not answered after this long gets 408 (504 / an error event if
    # it is generating), its slot freed
    num_cpus: float = 1.0  # per replica (also its torch threads on CPU unless engine.threads is set)
    num_gpus: Optional[float] = None  # per replica; None: 1 where the cluster has GPUs, else 0
    max_prompt_tokens: int = 1024  # longer prompts get 400 (at most the model's context minus one); with
    # generation.max_tokens_limit it sizes each row's KV share (the width `auto` picks fits that many rows)
    max_lanes: int = 2  # decode lanes (sampling settings) alive at once; they share the KV budget equally
    max_stop: int = 4  # entries of `stop`
    max_body_bytes: int = 1_000_000  # request bodies over this are refused (413)
    idle_lane_s: float = 60.0  # a sampling setting's decode lane closes (frees its KV cache) after this idle


@dataclass
class ServeConfig(JobSections):
    serve: ServeSettings = field(default_factory=ServeSettings)


def validate_serve(cfg: ServeConfig) -> ServeConfig:
    from ..config import InputConfig, OutputConfig, PipelineConfig

    validate(PipelineConfig(**{k: getattr(cfg, k) for k in JobSections.__dataclass_fields__},
                            input=InputConfig(), output=OutputConfig()))
    s = cfg.serve
    check(bool(s.host), "serve.host", "must not be empty")
    check(0 <= s.port <= 65535, "serve.port", f"must be a TCP port (0..65535), got {s.port}")
    check(s.route_prefix.startswith("/"), "serve.route_prefix", f"must start with '/', got {s.route_prefix!r}")
    check(s.num_replicas == "auto" or (isinstance(s.num_replicas, int) and not isinstance(s.num_replicas, bool)
                                       and s.num_replicas >= 1),
          "serve.num_replicas", f"must be an integer >= 1 or auto, got {s.num_replicas!r}")
    check(s.max_ongoing_requests >= 1, "serve.max_ongoing_requests", f"must be >= 1, got {s.max_ongoing_requests}")
    check(isinstance(s.max_queued_requests, int) and not isinstance(s.max_queued_requests, bool)
          and s.max_queued_requests >= 1, "serve.max_queued_requests",
          f"must be an integer >= 1 (requests waiting in Serve's queue), got {s.max_queued_requests!r}")
    check(0 < s.request_timeout_s < math.inf, "serve.request_timeout_s",
          f"must be a number of seconds > 0, got {s.request_timeout_s}")
    check(s.num_cpus > 0, "serve.num_cpus", f"must be > 0, got {s.num_cpus}")
    check(s.num_gpus is None or s.num_gpus >= 0, "serve.num_gpus", f"must be >= 0 or null, got {s.num_gpus}")
    check(s.max_prompt_tokens >= 1, "serve.max_prompt_tokens", f"must be >= 1, got {s.max_prompt_tokens}")
    check(s.max_lanes >= 1, "serve.max_lanes", f"must be >= 1, got {s.max_lanes}")
    check(s.max_stop >= 0, "serve.max_stop", f"must be >= 0, got {s.max_stop}")
    check(s.max_body_bytes >= 1024, "serve.max_body_bytes", f"must be >= 1024, got {s.max_body_bytes}")
    check(s.idle_lane_s > 0, "serve.idle_lane_s", f"must be > 0, got {s.idle_lane_s}")
    check(s.api_key is None or len(s.api_key) >= 8, "serve.api_key", "must be at least 8 characters (or null: no key)")
    return cfg


def served_model_name(cfg: ServeConfig) -> str:
    return cfg.serve.model_name or os.path.basename(cfg.model.source.rstrip("/")) or cfg.model.source


class _Metrics:
    """Per-request figures as Ray metrics (exported by Ray's Prometheus endpoint), named like vLLM's, and
    running totals for ``/healthz``."""

    def __init__(self, model: str):
        from ray.util.metrics import Counter, Histogram

        tags = ("model_name",)
        seconds = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
        self.e2e = Histogram("conflayers_e2e_request_latency_seconds", "request latency, arrival to last token",
                             seconds, tags)
        self.ttft = Histogram("conflayers_time_to_first_token_seconds", "arrival to the first token", seconds, tags)
        self.tps = Histogram("conflayers_request_tokens_per_second", "a request's new tokens / its decode time",
                             [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tags)
        self.prompt = Counter("conflayers_prompt_tokens_total", "prompt tokens", tags)
        self.generation = Counter("conflayers_generation_tokens_total", "generated tokens", tags)
        self.drafted = Counter("conflayers_spec_decode_num_draft_tokens_total", "draft tokens verified", tags)
        self.accepted = Counter("conflayers_spec_decode_num_accepted_tokens_total", "draft tokens accepted", tags)
        self.requests = Counter("conflayers_request_success_total", "finished requests by finish reason",
                                tags + ("finished_reason",))
        self.tags = {"model_name": model}
        self.totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "drafted": 0, "accepted": 0,
                       "aborted": 0, "aborted_tokens": 0, "timed_out": 0}

    def record(self, prompt_tokens: int, completion_tokens: int, stats, t0: float, first: float | None,
               finish: str) -> None:
        t = self.tags
        self.e2e.observe(time.perf_counter() - t0, t)
        if first is not None:
            self.ttft.observe(first - t0, t)
        if stats.decode_seconds > 0:
            self.tps.observe(completion_tokens / (stats.prefill_seconds + stats.decode_seconds), t)
        self.prompt.inc(prompt_tokens, t)
        if completion_tokens:
            self.generation.inc(completion_tokens, t)
        if stats.drafted:
            self.drafted.inc(stats.drafted, t)
        if stats.accepted:
            self.accepted.inc(stats.accepted, t)
        self.requests.inc(1, {**t, "finished_reason": finish})
        tot = self.totals
        tot["requests"] += 1
        tot["prompt_tokens"] += prompt_tokens
        tot["completion_tokens"] += completion_tokens
        tot["drafted"] += stats.drafted
        tot["accepted"] += stats.accepted

    def aborted(self, result) -> None:
        """A request whose client went away: its row ended early (or never started)."""
        self.requests.inc(1, {**self.tags, "finished_reason": "abort"})
        self.totals["aborted"] += 1
        self.totals["aborted_tokens"] += result.stats.new_tokens

    def snapshot(self) -> dict:
        tot = dict(self.totals)
        tot["acceptance_rate"] = tot["accepted"] / tot["drafted"] if tot["drafted"] else None
        return tot


def _failure(result) -> ApiError:
    """A request the engine refused (over the KV budget: the client's to fix), failed, or dropped (shutdown)."""
    if result.finish_reason == "abort":
        return ApiError(503, "the server is shutting down: retry", kind="server_error")
    if "KV" in (result.error or ""):
        return ApiError(400, f"the request does not fit this replica's KV cache: {result.error}", "max_tokens")
    return ApiError(500, f"generation failed: {result.error}", kind="server_error")


def generation_deadline(timeout_s: float) -> float:
    """Seconds from a request's arrival at the replica until the ingress stops it: a second (at most a tenth of
    the timeout) before Serve's proxy would cut the connection at ``timeout_s``, so a stream ends with an error
    event rather than a broken connection."""
    return timeout_s - min(1.0, timeout_s / 10)


async def _next(events: asyncio.Queue, deadline: float):
    """The request's next event (a text delta or its result), or None once its deadline has passed."""
    try:
        return await asyncio.wait_for(events.get(), max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        return None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


api = FastAPI(title="ConfLayers", docs_url=None, redoc_url=None, openapi_url=None)


def error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@serve.deployment
@serve.ingress(api)
class ConfLayersServer:
    def __init__(self, cfg: ServeConfig):
        from conflayers.scheduler import Scheduler

        from ..actor import GenerationActor

        if cfg.engine.threads is None:
            cfg.engine.threads = max(1, int(cfg.serve.num_cpus))
        self.cfg = cfg
        s, g = cfg.serve, cfg.generation
        # the model as an offline actor holds it (no coordinator); the KV budget is always set here, shared
        # by the lanes, and a row may need the longest prompt plus the most new tokens
        self.host = GenerationActor(cfg, row_tokens=s.max_prompt_tokens + g.max_tokens_limit, lanes=s.max_lanes)
        self.tokenizer = self.host.tokenizer
        self.detokenizer = copy.deepcopy(self.tokenizer)  # the scheduler's thread decodes with its own copy
        self.model_name = served_model_name(cfg)
        context = self.host.engine.context
        self.limits = Limits(max_prompt_tokens=min(s.max_prompt_tokens, context - 1),
                             max_tokens=g.max_tokens_limit, default_max_tokens=g.max_tokens, max_stop=s.max_stop)
        self._router = None
        self.metrics = _Metrics(self.model_name)
        self.scheduler = Scheduler(self.host.engine, self._drafter_for, self.host.width,
                                   cfg.engine.prefill_tokens, self.host.kv_budget, idle_s=s.idle_lane_s,
                                   max_lanes=s.max_lanes)
        log.warning("serving %s: width %d, drafter %s", self.model_name, self.host.width, cfg.search.drafter)

    def check_health(self):
        """Serve's health check: a replica whose decode thread died is restarted."""
        if not self.scheduler.alive:
            raise RuntimeError("the decode thread has stopped")

    def _drafter_for(self, group: str):
        """The lane's drafter; every group's layer-skip policy joins the shared auto controller (or
        the shared group router of ``layerskip``)."""
        d = self.host._drafter([group])
        if self.cfg.search.drafter != "layerskip":
            return d
        if self._router is None:
            self._router = d
        for k, v in d.drafters.items():
            self._router.drafters.setdefault(k, v)
        return self._router

    def __del__(self):
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            sched.close(timeout=2)

    # -- checks ----------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        key = self.cfg.serve.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           kind="authentication_error")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid API key", kind="authentication_error")

    async def _body(self, request: Request):
        cap = self.cfg.serve.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"the request body has {declared} bytes; this server takes at most {cap}")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > cap:
                raise ApiError(413, f"the request body is over {cap} bytes; this server takes at most {cap}")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _encode(self, req) -> list[int]:
        from conflayers.models import encode_prompts

        if req.chat:
            ids = encode_prompts(self.tokenizer, [req.prompt], chat=True)[0]
        else:
            ids = list(self.tokenizer(req.prompt)["input_ids"])
        if not ids:
            raise ApiError(400, "the prompt has no tokens", "messages" if req.chat else "prompt")
        cap = self.limits.max_prompt_tokens
        if len(ids) > cap:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most {cap}",
                           "messages" if req.chat else "prompt")
        return ids

    def _timed_out(self) -> ApiError:
        self.metrics.totals["timed_out"] += 1
        return ApiError(504, f"the request did not finish within serve.request_timeout_s "
                             f"({self.cfg.serve.request_timeout_s:g} s); its generation was stopped",
                        kind="timeout_error")

    # -- routes ----------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        if not self.scheduler.alive:
            return JSONResponse({"status": "failed", "detail": "the decode thread has stopped"}, status_code=503)
        return {"status": "ok", "model": self.model_name, "width": self.host.width,
                "drafter": self.cfg.search.drafter, "lanes": self.scheduler.lanes(),
                "in_flight": self.scheduler.in_flight(),
                "served": self.metrics.snapshot()}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except ApiError as e:
            return error(e)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "conflayers", "root": self.cfg.model.source,
                                            "max_model_len": self.host.engine.context}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool):
        from conflayers import SamplingParams

        t0 = time.perf_counter()
        deadline = t0 + generation_deadline(self.cfg.serve.request_timeout_s)
        try:
            self._auth(request)
            req = parse_request(await self._body(request), chat, self.model_name, self.limits)
            ids = self._encode(req)
            sampling = SamplingParams(req.temperature, req.top_p, req.top_k)
        except ApiError as e:
            return error(e)
        except ValueError as e:
            return error(ApiError(400, str(e)))
        if not self.scheduler.alive:
            return error(ApiError(503, "the replica's decode thread has stopped: see its log", kind="server_error"))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        text = TextStream(self.detokenizer, req.stop)
        first: list[float] = []
        gone: list[bool] = []  # set when the handler has returned or was cancelled (the client went away)

        def on_tokens(toks):  # the scheduler's thread
            if not first:
                first.append(time.perf_counter())
            delta = text.add(toks)
            if delta:
                loop.call_soon_threadsafe(events.put_nowait, delta)
            return "stop" if text.stopped else None

        def on_done(result):  # the scheduler's thread
            if gone:
                loop.call_soon_threadsafe(self.metrics.aborted, result)
            else:
                loop.call_soon_threadsafe(events.put_nowait, result)

        ticket = self.scheduler.submit(ids, req.max_tokens, sampling, req.seed, req.dataset or self.cfg.serve.dataset,
                                       on_tokens, on_done)
        rid, created = new_id(chat), now()

        def finished(result) -> tuple[str, dict]:
            finish = "stop" if text.stopped else result.finish_reason
            use = usage(len(ids), text.tokens)
            self.metrics.record(len(ids), text.tokens, result.stats, t0, first[0] if first else None, finish)
            return finish, use

        if not req.stream:
            try:
                parts = []
                while True:
                    item = await _next(events, deadline)
                    if item is None:
                        return error(self._timed_out())
                    if isinstance(item, str):
                        parts.append(item)
                        continue
                    if item.error or item.finish_reason == "abort":
                        return error(_failure(item))
                    finish, use = finished(item)
                    return response(req, rid, created, "".join(parts) + text.flush(), finish, use)
            finally:
                gone.append(True)
                self.scheduler.cancel(ticket)  # the client went away: free the slot (no-op once done)

        async def sse():
            try:
                opening = True
                while True:
                    item = await _next(events, deadline)
                    if item is None:  # past the deadline: an error event ends the stream
                        yield _sse(self._timed_out().body())
                        yield "data: [DONE]\n\n"
                        return
                    if isinstance(item, str):
                        yield _sse(chunk(req, rid, created, item, None, first=opening))
                        opening = False
                        continue
                    if item.error or item.finish_reason == "abort":
                        yield _sse(_failure(item).body())
                    else:
                        finish, use = finished(item)
                        yield _sse(chunk(req, rid, created, text.flush(), finish, first=opening))
                        if req.include_usage:
                            yield _sse(chunk(req, rid, created, None, None, use))
                    yield "data: [DONE]\n\n"
                    return
            finally:
                gone.append(True)
                self.scheduler.cancel(ticket)

        return StreamingResponse(sse(), media_type="text/event-stream")


def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg`` (``serve.run(build_app(cfg))``)."""
    s = cfg.serve
    num_gpus = s.num_gpus
    if num_gpus is None:
        num_gpus = 1 if _cluster_has_gpus(cfg) else 0
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,  # Serve's proxy answers 503 + Retry-After past it
        "backpressure_config": BackpressureConfig(retry_after_s=RETRY_AFTER_S),
        "num_replicas": s.num_replicas,
    }
    if s.autoscaling_config is not None:
        options["autoscaling_config"] = dict(s.autoscaling_config)
        if s.num_replicas == 1:  # the default: let the autoscaling config decide
            del options["num_replicas"]
    return ConfLayersServer.options(**options).bind(cfg)


def _cluster_has_gpus(cfg: ServeConfig) -> bool:
    if cfg.model.device == "cpu":
        return False
    if cfg.model.device == "cuda":
        return True
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()
