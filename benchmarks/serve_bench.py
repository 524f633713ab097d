"""The online endpoint against the offline engine on the same prompts: throughput and latency by concurrency.

    python benchmarks/serve_bench.py --prompts 32 --concurrency 1,4,16 --max-new-tokens 64 --out docs/benchmarks/serve

A local Ray runs the app of ``jobs.serve`` (the bundled SmolLM2, ``search.drafter`` auto, one replica
with ``--threads`` torch threads) on loopback. For each concurrency C, interleaved, order rotated:

- ``serve cC``: C clients (the ``openai`` async client, streaming chat completions, greedy) send
  the prompts, each client its next prompt when its answer is complete;
- ``offline wC``: the same model held the same way (``pipeline.actor.GenerationActor``, in this
  process, the same drafter kind and threads) streams the same prompts through the engine with C
  rows in flight, as the batch job does.

The replica is idle while the offline runs go. Prints and writes (``--out``) ``table.md``: output
tokens/s, time to first token (serve) and request latency p50/p95, and the share of identical texts.
"""

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from engine_bench import load_prompts, table  # noqa: E402
from kernel_bench import cpu_name  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def serve_run(url, model, prompts, concurrency, max_tokens):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(enumerate(prompts))
    texts, ttft, latency, tokens = {}, [], [], 0

    async def worker():
        nonlocal tokens
        while queue:
            i, p = queue.pop(0)
            t0 = time.perf_counter()
            first, parts = None, []
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(c.choices[0].delta.content)
                if c.usage:
                    tokens += c.usage.completion_tokens
            latency.append(time.perf_counter() - t0)
            ttft.append((first or time.perf_counter()) - t0)
            texts[i] = "".join(parts)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"tokens": tokens, "wall": wall, "ttft": ttft, "latency": latency, "texts": texts}


def offline_run(host, ids, concurrency, max_tokens):
    from conflayers import GenerationConfig, Request

    reqs = [Request(p, max_tokens, group="default") for p in ids]
    t0 = time.perf_counter()
    texts, latency, tokens = {}, [], 0
    for i, r in host.engine.stream(reqs, GenerationConfig(max_new_tokens=max_tokens), host._drafter(["default"]),
                                   max_batch=concurrency):
        texts[i] = host.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        tokens += r.stats.new_tokens
        latency.append(time.perf_counter() - t0)  # all prompts arrive at once: latency from the start
    return {"tokens": tokens, "wall": time.perf_counter() - t0, "ttft": [], "latency": latency, "texts": texts}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--out")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray
    import torch

    from jobs.generate import load_config
    from jobs.serve import start
    from pipeline.actor import GenerationActor
    from pipeline.serve.app import ServeConfig, served_model_name, validate_serve
    from conflayers.models import encode_prompts

    cfg = load_config(None, [f"serve.port={args.port}", f"engine.threads={args.threads}",
                             f"engine.max_batch={max(levels)}", f"generation.max_tokens={args.max_new_tokens}"],
                      ServeConfig, validate_serve)
    ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, configure_logging=False)
    url = start(cfg)
    torch.set_num_threads(args.threads)
    host = GenerationActor(cfg)
    prompts = load_prompts(args.prompts)
    ids = encode_prompts(host.tokenizer, prompts, chat=True)
    model = served_model_name(cfg)
    asyncio.run(serve_run(url, model, prompts[:2], 1, 4))  # warm both paths up
    offline_run(host, ids[:2], 1, 4)

    rows, results = [], {}
    for k, c in enumerate(levels):
        order = [("serve", c), ("offline", c)]
        for method, conc in (order if k % 2 == 0 else order[::-1]):
            if method == "serve":
                res = asyncio.run(serve_run(url, model, prompts, conc, args.max_new_tokens))
            else:
                res = offline_run(host, ids, conc, args.max_new_tokens)
            results[(method, conc)] = res
            print(f"{method} c{conc}: {res['tokens'] / res['wall']:.1f} tok/s", flush=True)
    for c in levels:
        ref = results[("offline", c)]["texts"]
        for method in ("serve", "offline"):
            r = results[(method, c)]
            same = sum(r["texts"][i] == ref[i] for i in ref) / len(ref)
            rows.append([f"{method} c{c}", r["tokens"], f"{r['wall']:.1f}", f"{r['tokens'] / r['wall']:.1f}",
                         f"{pct(r['ttft'], .5):.2f} / {pct(r['ttft'], .95):.2f}" if r["ttft"] else "-",
                         f"{pct(r['latency'], .5):.2f} / {pct(r['latency'], .95):.2f}",
                         f"{same:.2f}"])
    head = ["method", "tokens", "wall s", "tok/s", "TTFT p50 / p95 s", "latency p50 / p95 s", "same text as offline"]
    out = table(head, rows)
    finish(args.out, "The online endpoint vs the offline engine",
           f"SmolLM2-135M-Instruct float32, drafter auto, greedy, {args.prompts} Spec-Bench prompts, "
           f"{args.max_new_tokens} new tokens at most, {args.threads} torch threads.\n"
           f"Offline latency counts from the start (all prompts arrive at once); serve latency per request.", out,
           {f"{m} c{c}": {k: v for k, v in r.items() if k != "texts"} for (m, c), r in results.items()})


def finish(out_dir: str | None, title: str, what: str, out: str, results) -> None:
    """Print the table, shut Serve and Ray down, and (``out_dir``) write ``table.md`` (the command, the
    date, the machine, ``what`` was run, the table) and ``results.json``."""
    import ray
    from ray import serve

    print(out)
    serve.shutdown()
    ray.shutdown()
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        cmd = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        (d / "table.md").write_text(
            f"# {title}\n\n`{cmd}`\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()} "
            f"({os.cpu_count()} cores, {platform.python_version()}), {what}\n\n{out}\n")
        (d / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
