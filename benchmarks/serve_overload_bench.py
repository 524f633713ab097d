"""The online endpoint under overload: what clients get at 1x to 8x the load one replica serves.

    python benchmarks/serve_overload_bench.py --levels 1,2,4,8 --out docs/benchmarks/serve_overload

A local Ray runs the app of ``jobs.serve`` on loopback (the bundled SmolLM2, ``search.drafter`` auto, one
replica with ``serve.max_ongoing_requests`` M, ``serve.max_queued_requests`` Q and
``serve.request_timeout_s`` T). At load level k, k * M clients each send ``--per-client`` streamed chat
completions (greedy, Spec-Bench prompts) one after another: a fixed count of k * M * per-client requests.
A client that gets a 503 waits its ``Retry-After`` before its next request, and no client starts a
request after ``--level-s`` seconds. Every request ends one way (``send``):

- ``ok``: 200, the stream ended with ``data: [DONE]``;
- ``rejected``: 503 with a ``Retry-After`` header (the queue was full);
- ``timeout``: 408 (Serve's proxy), 504 or a stream ended by an error event with code 504 (the replica), or
  a stream closed without ``[DONE]`` once T has passed (Serve's proxy closes a stream it times out);
- ``other``: any other status, a 503 without ``Retry-After``, another error event, a stream cut off before T;
- ``hung``: no end within T + ``--slack-s`` (the client gives up): must be 0.

Per level: the counts (and how many timeouts were streams closed without an error event: those that
waited in Serve's queue longer than the replica's margin, see ``pipeline.serve.app``), and over the
``ok`` requests the time to first token and the inter-token latency (the gap between streamed chunks:
one chunk carries one decode step's tokens), p50 / p99.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_bench import finish, pct  # noqa: E402

KINDS = ("ok", "rejected", "timeout", "other", "hung")


@dataclass
class Outcome:
    kind: str  # one of KINDS
    status: int | None  # the HTTP status (None: no response)
    seconds: float  # from sending to the end
    retry_after: str | None = None
    ttft: float | None = None  # streamed: sending to the first text
    gaps: list[float] = field(default_factory=list)  # streamed: between successive chunks with text
    closed: bool = False  # streamed: the stream closed without [DONE] (nor an error event)
    detail: str = ""


def _classify(status: int, retry_after: str | None) -> str:
    if status == 200:
        return "ok"
    if status == 503 and retry_after:
        return "rejected"
    if status in (408, 504):
        return "timeout"
    return "other"


async def _send(session, url: str, body: dict, headers: dict, timeout_s: float) -> Outcome:
    import aiohttp

    t0 = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as r:
        retry = r.headers.get("Retry-After")
        if r.status != 200 or not body.get("stream"):
            text = (await r.read()).decode(errors="replace")
            return Outcome(_classify(r.status, retry), r.status, time.perf_counter() - t0, retry, detail=text[:200])
        first, last, gaps, detail = None, None, [], "the stream ended without [DONE]"
        try:
            async for line in r.content:  # server-sent events, one "data: ..." line each
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    return Outcome("ok", 200, time.perf_counter() - t0, ttft=first, gaps=gaps)
                obj = json.loads(data)
                if "error" in obj:  # the replica ended the stream (504: the request's deadline)
                    code = obj["error"].get("code")
                    return Outcome("timeout" if code == 504 else "other", 200, time.perf_counter() - t0,
                                   ttft=first, gaps=gaps, detail=obj["error"].get("message", "")[:200])
                choice = (obj.get("choices") or [{}])[0]
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
        except aiohttp.ClientPayloadError as e:  # the connection closed mid-stream
            detail = f"the stream was cut off: {e}"[:200]
        took = time.perf_counter() - t0
        return Outcome("timeout" if took >= timeout_s - 0.05 else "other", 200, took, ttft=first, gaps=gaps,
                       closed=True, detail=detail)


async def send(session, url: str, body: dict, timeout_s: float, slack_s: float, key: str | None = None) -> Outcome:
    """POST ``body`` to ``url`` (an aiohttp session) on a server whose ``serve.request_timeout_s`` is ``timeout_s``
    and say how it ended; "hung" if it has not within ``timeout_s + slack_s``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(_send(session, url, body, headers, timeout_s), timeout_s + slack_s)
    except TimeoutError:
        return Outcome("hung", None, time.perf_counter() - t0, detail=f"no end within {timeout_s + slack_s:g} s")
    except Exception as e:  # a connection cut off mid-stream, refused, reset
        return Outcome("other", None, time.perf_counter() - t0, detail=f"{type(e).__name__}: {e}"[:200])


async def load_level(url: str, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
                     timeout_s: float, slack_s: float, level_s: float) -> tuple[list[Outcome], float]:
    """``clients`` closed-loop clients, ``per_client`` streamed chat completions each: (outcomes, wall seconds)."""
    import aiohttp

    outcomes: list[Outcome] = []
    t0 = time.perf_counter()

    async def client(c, session):
        for j in range(per_client):
            if time.perf_counter() - t0 > level_s:
                return
            p = prompts[(c * per_client + j) % len(prompts)]
            body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            o = await send(session, url + "/v1/chat/completions", body, timeout_s, slack_s)
            outcomes.append(o)
            if o.kind == "rejected":
                await asyncio.sleep(float(o.retry_after))

    conn = aiohttp.TCPConnector(limit=0)  # no client-side cap: every client has its own connection
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(client(c, session) for c in range(clients)))
    return outcomes, time.perf_counter() - t0


def summarize(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.kind == "ok"]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    gaps = [g for o in ok for g in o.gaps]
    return {"requests": len(outcomes), **{k: sum(o.kind == k for o in outcomes) for k in KINDS},
            "timeout_closed": sum(o.kind == "timeout" and o.closed for o in outcomes),
            "ttft_p50": pct(ttft, .5), "ttft_p99": pct(ttft, .99), "itl_p50": pct(gaps, .5), "itl_p99": pct(gaps, .99),
            "longest_s": max((o.seconds for o in outcomes), default=0.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,2,4,8", help="load levels, in multiples of max_ongoing_requests")
    ap.add_argument("--max-ongoing", type=int, default=4, help="serve.max_ongoing_requests (and engine.max_batch)")
    ap.add_argument("--max-queued", type=int, default=4, help="serve.max_queued_requests")
    ap.add_argument("--timeout", type=float, default=15.0, help="serve.request_timeout_s")
    ap.add_argument("--per-client", type=int, default=4, help="requests each client sends")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--level-s", type=float, default=60.0, help="no request starts later than this into a level")
    ap.add_argument("--slack-s", type=float, default=10.0, help="a request not ended by timeout + this is hung")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--port", type=int, default=8792)
    ap.add_argument("--out")
    ap.add_argument("--note", default="", help="a sentence for table.md (what else ran on the machine, say)")
    args = ap.parse_args()
    levels = [int(k) for k in args.levels.split(",")]

    import ray

    from engine_bench import load_prompts, table
    from jobs.generate import load_config
    from jobs.serve import start
    from pipeline.serve.app import ServeConfig, served_model_name, validate_serve

    cfg = load_config(None, [f"serve.port={args.port}", f"engine.threads={args.threads}",
                             f"engine.max_batch={args.max_ongoing}", f"serve.max_ongoing_requests={args.max_ongoing}",
                             f"serve.max_queued_requests={args.max_queued}", f"serve.request_timeout_s={args.timeout}",
                             f"generation.max_tokens={args.max_new_tokens}"], ServeConfig, validate_serve)
    ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False, configure_logging=False)
    url = start(cfg)
    model = served_model_name(cfg)
    prompts = load_prompts(64)
    limit = args.timeout + args.slack_s
    asyncio.run(load_level(url, model, prompts[:1], 1, 1, 4, args.timeout, args.slack_s, limit))  # warm up

    results, rows = {}, []
    for k in levels:
        clients = k * args.max_ongoing
        outcomes, wall = asyncio.run(load_level(url, model, prompts, clients, args.per_client, args.max_new_tokens,
                                                args.timeout, args.slack_s, args.level_s))
        s = summarize(outcomes)
        s.update(level=f"{k}x", clients=clients, wall_s=wall)
        results[f"{k}x"] = {**s, "outcomes": [asdict(o) for o in outcomes]}
        print(f"{k}x ({clients} clients): " + ", ".join(f"{n} {s[n]}" for n in ("requests", *KINDS)), flush=True)
        for o in outcomes:
            if o.kind in ("other", "hung"):
                print(f"  {o.kind}: status {o.status}, {o.seconds:.1f} s, {o.detail}", flush=True)
        rows.append([f"{k}x", clients, s["requests"], s["ok"], s["rejected"], f"{s['timeout']} ({s['timeout_closed']})",
                     s["other"], s["hung"],
                     f"{s['ttft_p50']:.2f} / {s['ttft_p99']:.2f}",
                     f"{s['itl_p50'] * 1000:.0f} / {s['itl_p99'] * 1000:.0f}", f"{s['longest_s']:.1f}", f"{wall:.1f}"])
    head = ["load", "clients", "requests", "200", "503", "timeout (closed)", "other", "hung", "TTFT p50 / p99 s",
            "ITL p50 / p99 ms", "longest s", "wall s"]
    out = table(head, rows)
    finish(args.out, "The online endpoint under overload",
           f"SmolLM2-135M-Instruct float32, drafter auto, greedy streamed chat "
            f"completions of Spec-Bench prompts, {args.max_new_tokens} new tokens at most, {args.threads} torch "
            f"threads; one replica: serve.max_ongoing_requests={args.max_ongoing}, "
            f"serve.max_queued_requests={args.max_queued}, serve.request_timeout_s={args.timeout:g}. Load kx: "
            f"k x {args.max_ongoing} closed-loop clients, {args.per_client} requests each (a 503 waits its "
            f"Retry-After). 200: the stream ended with [DONE]; 503: with Retry-After; timeout: 408, 504, a "
            f"504 error event or (closed) a stream closed by Serve's proxy at the timeout, without an error "
            f"event; hung: no end within {limit:g} s. TTFT and ITL "
            f"(the gap between streamed chunks) over the 200s; longest: the slowest request of any kind."
            f"{' ' + args.note if args.note else ''}", out,
           {"args": vars(args), "levels": results})


if __name__ == "__main__":
    main()
