"""Kernel-plan benchmark on the bundled SmolLM2: PyTorch's default linears vs prepacked oneDNN.

1. Forward cost surface: median seconds of one engine forward over q new tokens (q = 1, 2, 4, 8)
   at batch width w (1, 8, 32, 64) after a ~200-token context, under both plans. q = 1 is a
   plain decode step; q = k + 1 is a verify of k drafted tokens. The kernels alternate per
   repetition, on the same cache, so machine noise does not favour one.
2. The engine against ``transformers.generate`` (greedy, fixed length) at batch 1 and 8 under
   both plans, the run order rotating per batch: tokens/s, outputs identical to the default
   kernels' (a near-tie can flip an argmax when the kernel changes), and self-speculative output
   identical to plain decoding under the oneDNN plan.

    python benchmarks/kernel_bench.py [--out docs/benchmarks/kernels] [--prompts 8] [--max-new-tokens 64]

Writes ``table.md`` and ``forward_costs.json`` (the cost surface) under ``--out`` when given.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from engine_bench import hf_generate, load_prompts, table, timed_forward  # noqa: E402  (run as a script from benchmarks/)

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter
from conflayers.costs.width import device_name
from conflayers.kernels import apply_kernels, restore_native
from conflayers.models import encode_prompts, load_model

KERNELS = ("native", "onednn")


def cpu_name() -> str:
    return device_name(torch.device("cpu"))


def resident_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def forward_costs(model, widths, qs, context, reps):
    """{kernel: {w: {q: median seconds}}}: one forward of q new tokens after ``context`` tokens."""
    engine = Engine(model, "native")
    out = {k: {w: {} for w in widths} for k in KERNELS}
    g = torch.Generator().manual_seed(0)
    for w in widths:
        restore_native(model)
        prompts = torch.randint(100, 40000, (w, context), generator=g).tolist()
        with torch.inference_mode():
            kv, _ = engine.prefill(prompts)
            times = {k: {q: [] for q in qs} for k in KERNELS}
            for rep in range(reps + 1):  # rep 0 warms up
                order = KERNELS if rep % 2 == 0 else KERNELS[::-1]
                for k in order:
                    apply_kernels(model, k)
                    for q in qs:
                        dt = timed_forward(kv, q, g)
                        if rep:
                            times[k][q].append(dt)
        for k in KERNELS:
            for q in qs:
                out[k][w][q] = statistics.median(times[k][q])
        print(f"  width {w}: " + ", ".join(f"{k} q=1 {out[k][w][qs[0]] * 1e3:.0f} ms" for k in KERNELS),
              file=sys.stderr, flush=True)
    return out


def cost_table(costs, widths, qs) -> str:
    rows = []
    for w in widths:
        n, o = costs["native"][w], costs["onednn"][w]
        rows.append([
            w,
            *(f"{n[q] * 1e3:.0f} / {o[q] * 1e3:.0f}" for q in qs),
            f"{w / n[1]:.1f} / {w / o[1]:.1f}",
            ", ".join(f"{n[q] / n[1]:.2f}" for q in qs[1:]),
            ", ".join(f"{o[q] / o[1]:.2f}" for q in qs[1:]),
            f"{n[1] / o[1]:.2f}x",
        ])
    head = ["width", *(f"q={q} ms (native / oneDNN)" for q in qs), "decode tok/s (native / oneDNN)",
            f"native q={'/'.join(map(str, qs[1:]))} ÷ q=1", f"oneDNN q={'/'.join(map(str, qs[1:]))} ÷ q=1",
            "oneDNN speedup q=1"]
    return table(head, rows)


def engine_vs_generate(model, prompts, n, batch_sizes, skip):
    """Tokens/s and outputs of generate and the engine (plain, and speculative under oneDNN) per plan."""
    engine = Engine(model, "native")
    cfg = GenerationConfig(max_new_tokens=n, stop_token_ids=())  # fixed length: equal work per method
    methods = [("generate", "native"), ("engine", "native"), ("generate", "onednn"), ("engine", "onednn"),
               ("engine+skip", "onednn")]
    results = {}
    for bs in batch_sizes:
        batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
        acc = {m: {"tokens": 0, "seconds": 0.0, "outputs": []} for m in methods}
        for k in KERNELS:  # warm-up per plan, excluded
            apply_kernels(model, k)
            engine.generate(batches[0][:1], GenerationConfig(max_new_tokens=4))
            hf_generate(model, batches[0][:1], 4)
        for bi, batch in enumerate(batches):
            order = methods[bi % len(methods):] + methods[: bi % len(methods)]
            for m in order:
                what, k = m
                apply_kernels(model, k)
                t0 = time.perf_counter()
                if what == "generate":
                    outs = hf_generate(model, batch, n)
                else:
                    drafter = LayerSkipDrafter(model, FixedSkip(skip), 0.8, 8) if what == "engine+skip" else None
                    outs = [r.token_ids for r in engine.generate(batch, cfg, drafter)]
                acc[m]["seconds"] += time.perf_counter() - t0
                acc[m]["tokens"] += sum(map(len, outs))
                acc[m]["outputs"] += outs
            print(f"  batch size {bs}: {bi + 1}/{len(batches)} batches done", file=sys.stderr, flush=True)
        results[bs] = acc
    rows = []
    for bs, acc in results.items():
        gen = acc[("generate", "native")]
        base = gen["tokens"] / gen["seconds"]
        ref = acc[("engine", "native")]["outputs"]
        plain_onednn = acc[("engine", "onednn")]["outputs"]
        for m in methods:
            a = acc[m]
            tps = a["tokens"] / a["seconds"]
            same_native = sum(x == y for x, y in zip(a["outputs"], ref))
            same_plain = "-" if m[1] == "native" else f"{sum(x == y for x, y in zip(a['outputs'], plain_onednn))}/{len(ref)}"
            rows.append([bs, m[0], m[1], a["tokens"], f"{a['seconds']:.1f}", f"{tps:.1f}", f"{tps / base:.2f}",
                         f"{same_native}/{len(ref)}", same_plain])
    return table(["batch", "method", "kernels", "tokens", "seconds", "tok/s", "vs generate (native)",
                  "identical to engine (native)", "identical to engine plain (same kernels)"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="1,8,32,64")
    ap.add_argument("--qs", default="1,2,4,8")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--skip-layers", default="15", help="fixed skip set for the speculative check")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", help="directory for table.md and forward_costs.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(x) for x in args.widths.split(",")]
    qs = [int(x) for x in args.qs.split(",")]
    if qs[0] != 1:
        raise SystemExit("--qs must start with 1 (the decode step the others are compared to)")

    model, tok = load_model()
    with torch.inference_mode():  # touch every weight: the memory-mapped file becomes resident
        model(torch.arange(1, 65)[None])
    rss_native = resident_mib()
    plan = apply_kernels(model, "onednn")
    rss_packed = resident_mib()
    header = (f"SmolLM2-135M-Instruct float32, {cpu_name()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/kernel_bench.py", *sys.argv[1:]])
    print(f"# Kernel plans: {header}\n\n`{command}`\n", flush=True)

    print(f"## 1. Forward cost (ms, median of {args.reps}) after a {args.context}-token context\n", flush=True)
    costs = forward_costs(model, widths, qs, args.context, args.reps)
    t1 = cost_table(costs, widths, qs)
    print(t1, flush=True)

    print(f"\n## 2. Engine vs transformers generate: {args.prompts} prompts x {args.max_new_tokens} new tokens, "
          f"greedy; engine+skip = skip set [{args.skip_layers}]\n", flush=True)
    prompts = encode_prompts(tok, load_prompts(args.prompts))
    skip = [int(x) for x in args.skip_layers.split(",")]
    t2 = engine_vs_generate(model, prompts, args.max_new_tokens, [int(x) for x in args.batch_sizes.split(",")], skip)
    print(t2)
    mem = (f"\nResident memory of the process: {rss_native:.0f} MiB on the default kernels, {rss_packed:.0f} MiB after "
           f"packing {plan.linears} linears (the tied LM head's packed copy is {plan.extra_bytes / 2**20:.0f} MiB; "
           f"every other dense weight is released)")
    print(mem)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(
            f"# Kernel plans\n\n{header}\n\n`{command}`\n\n## 1. Forward cost (ms, median of {args.reps}) after a "
            f"{args.context}-token context\n\n{t1}\n\n## 2. Engine vs transformers generate ({args.prompts} prompts x "
            f"{args.max_new_tokens} new tokens, greedy; engine+skip = skip set [{args.skip_layers}])\n\n{t2}\n{mem}\n")
        (out / "forward_costs.json").write_text(json.dumps({
            "model": "smollm2-135m-instruct", "dtype": "float32", "device": cpu_name(),
            "threads": torch.get_num_threads(), "context": args.context, "date": time.strftime("%Y-%m-%d"),
            "seconds": {k: {str(w): {str(q): s for q, s in v.items()} for w, v in c.items()} for k, c in costs.items()},
        }, indent=1))
        print(f"\nwrote {out / 'table.md'} and {out / 'forward_costs.json'}")


if __name__ == "__main__":
    main()
