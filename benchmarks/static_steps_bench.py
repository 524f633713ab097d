"""What static-shape steps cost when they run eagerly: one verify/decode step, dynamic vs static.

    python benchmarks/static_steps_bench.py [--out docs/benchmarks/static_steps]

SmolLM2-135M's shape with random weights (a step's cost depends on shapes, not weights), float32, the
engine's kernel plan, on this machine's CPU. A cache of 64 slots holds ``rows`` decode rows of ``context``
cached tokens each; a static step pads the rows to their width bucket (powers of two, and 64) and reads
a power-of-two number of columns (``conflayers.steps``). The two modes alternate, order rotated per
round; min over rounds. Rows that fill their bucket cost the same either way; rows just past one pay
for the whole next bucket: why CPU engines keep dynamic steps, and what graph capture has to win back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from gpu_check import SHAPES, build  # noqa: E402

from conflayers import Engine  # noqa: E402
from conflayers.costs.width import device_name  # noqa: E402
from conflayers.steps import StaticSteps, bucket, column_bucket, width_buckets  # noqa: E402

SLOTS = 64


@torch.inference_mode()
def cell(model, rows: int, context: int, q: int, reps: int) -> dict:
    kv, _ = Engine(model, steps="static").step_cache(SLOTS, columns=1024, context=context)
    kv.n = rows
    fns = {"dynamic": kv.forward, "static": StaticSteps(kv).forward}
    best = {m: float("inf") for m in fns}
    for rep in range(reps + 1):
        order = list(fns) if rep % 2 else list(fns)[::-1]
        for m in order:
            t0 = time.perf_counter()
            fns[m](torch.ones(rows, q, dtype=torch.long))
            dt = time.perf_counter() - t0
            kv.rollback()
            if rep:
                best[m] = min(best[m], dt)
    return {m: v * 1e3 for m, v in best.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write table.md here")
    p.add_argument("--reps", type=int, default=4)
    args = p.parse_args(argv)
    model = build(SHAPES["smollm2-135m"], torch.float32, "cpu")
    Engine(model)  # the engine's kernel and attention plan
    widths = width_buckets(SLOTS)
    head = (f"# Static-shape steps, eagerly, on a CPU\n\n`python benchmarks/static_steps_bench.py"
            f"{' --out ' + args.out if args.out else ''}`  \n{device_name(torch.device('cpu'))}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
            f"SmolLM2-135M shape (random weights), float32; a cache of {SLOTS} slots; min of {args.reps} rounds.\n\n"
            "| rows | cached tokens | static shape (rows x columns) | q | dynamic ms | static ms | static / dynamic |\n"
            "|---:|---:|---|---:|---:|---:|---:|")
    lines = [head]
    print(head, flush=True)
    for rows, context in ((8, 300), (5, 300), (9, 300), (16, 300), (17, 300), (32, 300), (33, 300), (33, 64)):
        for q in (1, 3):
            t = cell(model, rows, context, q, args.reps)
            shape = f"{bucket(rows, widths)} x {column_bucket(context + q, 1024)}"
            line = (f"| {rows} | {context} | {shape} | {q} | {t['dynamic']:.1f} | {t['static']:.1f} | "
                    f"{t['static'] / t['dynamic']:.2f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
