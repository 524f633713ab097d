"""Attention benchmark on the bundled SmolLM2 (GQA: 9 query heads share 3 key/value heads):
transformers' SDPA path against ``conflayers.attention.packed_sdpa``.

For a pass that scores q > 1 tokens per row under the engine's mask, transformers copies every
layer's keys and values 3 times (``repeat_kv``); the packed path does not. This times one engine
forward over q new tokens at batch width w after ``context`` cached tokens per row, under each
attention, alternating per repetition on the same cache (median of ``--reps``), on the oneDNN
kernel plan the engine runs. q = 1 is a plain step (both paths avoid the copy there); q = k + 1
verifies k drafted tokens, so "q=k÷q=1" is what a draft has to earn back.

    python benchmarks/attention_bench.py [--widths 1,8,32] [--qs 1,2,5,9] [--contexts 256,1024] [--out docs/benchmarks/attention]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from engine_bench import table, timed_forward  # noqa: E402  (run as a script from benchmarks/)

from conflayers import Engine
from conflayers.attention import NAME
from conflayers.costs.width import device_name
from conflayers.models import load_model

ATTENTION = ("sdpa", NAME)
LABEL = {"sdpa": "transformers SDPA", NAME: "packed"}


def forward_costs(engine, widths, qs, contexts, reps):
    """{(context, w, attention, q): median seconds of one forward of q new tokens}."""
    model = engine.model
    g = torch.Generator().manual_seed(0)
    out = {}
    for context in contexts:
        for w in widths:
            prompts = torch.randint(100, 40000, (w, context), generator=g).tolist()
            times = {(a, q): [] for a in ATTENTION for q in qs}
            with torch.inference_mode():
                kv, _ = engine.prefill(prompts)
                for rep in range(reps + 1):  # rep 0 warms up
                    for a in ATTENTION if rep % 2 else ATTENTION[::-1]:
                        model.set_attn_implementation(a)
                        for q in qs:
                            dt = timed_forward(kv, q, g)
                            if rep:
                                times[a, q].append(dt)
            for (a, q), ts in times.items():
                out[context, w, a, q] = statistics.median(ts)
            print(f"  context {context}, width {w}: q={qs[-1]} " + ", ".join(
                f"{LABEL[a]} {out[context, w, a, qs[-1]] * 1e3:.0f} ms" for a in ATTENTION), file=sys.stderr, flush=True)
    model.set_attn_implementation(NAME)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="1,8,32")
    ap.add_argument("--qs", default="1,2,5,9")
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="folder for table.md")
    args = ap.parse_args(argv)
    widths, qs, contexts = ([int(x) for x in s.split(",")] for s in (args.widths, args.qs, args.contexts))
    if qs[0] != 1:
        ap.error("--qs must start with 1 (the plain step the ratios are taken against)")
    model, _ = load_model()
    engine = Engine(model)
    t0 = time.time()
    costs = forward_costs(engine, widths, qs, contexts, args.reps)
    rows = []
    for context in contexts:
        for w in widths:
            c = {a: [costs[context, w, a, q] for q in qs] for a in ATTENTION}
            rows.append([context, w,
                         *(f"{s * 1e3:.0f} / {p * 1e3:.0f}" for s, p in zip(c["sdpa"], c[NAME])),
                         *(", ".join(f"{x / v[0]:.2f}" for x in v[1:]) for v in (c["sdpa"], c[NAME])),
                         f"{c['sdpa'][-1] / c[NAME][-1]:.2f}x"])
    head = ["context", "width", *(f"q={q} ms (SDPA / packed)" for q in qs),
            f"SDPA q={'/'.join(map(str, qs[1:]))} ÷ q=1", f"packed q={'/'.join(map(str, qs[1:]))} ÷ q=1",
            f"packed speedup q={qs[-1]}"]
    text = "\n".join([
        "# Attention: transformers SDPA vs packed GQA (one engine forward)",
        "",
        f"- Command: `python benchmarks/attention_bench.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Machine: {device_name(engine.device)}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"SmolLM2-135M fp32, kernels {engine.kernel_plan.name}; {time.strftime('%Y-%m-%d')}; took {time.time() - t0:.0f} s",
        f"- Median of {args.reps} forwards per cell, the two attentions alternating on the same cache (random tokens).",
        "",
        table(head, rows),
        "",
    ])
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "table.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
