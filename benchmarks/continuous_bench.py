"""Continuous batching benchmark on the bundled SmolLM2: throughput against width.

Methods, all greedy with a fixed token budget (no stop tokens, so every method does equal work):
- ``generate b8``: transformers ``generate`` on padded batches of 8 prompts of similar length;
- ``static b8``: the engine on the same fixed batches of 8 (finished rows leave, nothing refills:
  the engine and pipeline before continuous batching);
- ``continuous wN``: one ``Engine.stream`` over all prompts with N rows in flight, for each
  ``--widths`` entry and ``auto`` (``conflayers.costs.width.choose_width``);
- ``ceiling wN``: tokens/s of bare plain decode forwards at width N after a ~200-token context
  (no prefill, no sampling, no bookkeeping): the most the engine could do at that width.

Each method decodes all prompts once (halves with a rotated order would cap the width at half the
prompts); the methods run interleaved, narrow and wide, padded and continuous. Outputs are
compared with batch-1 plain decoding (``--no-reference`` skips that slow pass). Writes
``table.md``, ``results.json`` and ``throughput_vs_width.png`` under ``--out`` when given.

    python benchmarks/continuous_bench.py --prompts 64 --max-new-tokens 64 --out docs/benchmarks/continuous
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from engine_bench import hf_generate, load_prompts, table  # noqa: E402  (run as a script from benchmarks/)
from kernel_bench import cpu_name, resident_mib  # noqa: E402

from conflayers import Engine, GenerationConfig
from conflayers.costs.width import choose_width, measure_step_seconds
from conflayers.models import encode_prompts, load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--widths", default="8,32,64")
    ap.add_argument("--no-reference", action="store_true", help="skip batch-1 plain decoding (identical fraction)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    N = args.max_new_tokens
    cfg = GenerationConfig(max_new_tokens=N, stop_token_ids=())

    model, tok = load_model()
    engine = Engine(model)
    prompts = encode_prompts(tok, load_prompts(args.prompts))
    context = round(sum(map(len, prompts)) / len(prompts) + N / 2)
    t0 = time.perf_counter()
    auto = choose_width(engine, row_tokens=max(map(len, prompts)) + N)
    auto_s = time.perf_counter() - t0
    header = (f"SmolLM2-135M-Instruct float32, kernels {engine.kernel_plan.name}, {cpu_name()}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
              f"{len(prompts)} Spec-Bench prompts (mixed categories, {min(map(len, prompts))}-{max(map(len, prompts))} "
              f"prompt tokens), {N} new tokens each, greedy")
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/continuous_bench.py", *sys.argv[1:]])
    print(f"# Continuous batching: {header}\n\n`{command}`\n", flush=True)
    print(f"auto width: {auto.width} ({'cached' if auto.cached else f'measured in {auto_s:.1f} s'}; "
          f"plain decode tok/s by width: {({w: round(v, 1) for w, v in auto.tokens_per_s.items()})})", flush=True)

    def in_length_order(batch_fn):
        """Batches of 8 prompts of similar length (as the pipeline cut them before), outputs in input order."""
        def fn(ps):
            order = sorted(range(len(ps)), key=lambda i: len(ps[i]))
            out = [None] * len(ps)
            for s in range(0, len(ps), 8):
                idx = order[s : s + 8]
                for i, o in zip(idx, batch_fn([ps[i] for i in idx])):
                    out[i] = o
            return out
        return fn

    run_generate = in_length_order(lambda batch: hf_generate(model, batch, N))
    run_static = in_length_order(lambda batch: [r.token_ids for r in engine.generate(batch, cfg)])

    def run_continuous(width):
        def fn(ps):
            out = engine.generate(ps, cfg, max_batch=width)
            kv_peak[width] = max(kv_peak.get(width, 0), engine.last_stream["kv_bytes"])
            split[width] = dict(engine.last_stream)
            return [r.token_ids for r in out]
        return fn

    kv_peak: dict[int, int] = {}
    split: dict[int, dict] = {}  # prefill / decode seconds of each continuous run
    auto_width = min(auto.width, len(prompts))  # wider than the prompts is the same run
    all_widths = sorted(set(widths) | {auto_width})
    cont = {f"continuous w{w}" + (" (auto)" if w == auto_width else ""): run_continuous(w) for w in all_widths}
    names = list(cont)
    methods = {names[-1]: cont[names[-1]], "generate b8": run_generate}  # interleave wide, padded, narrow, static
    for i, name in enumerate(names[:-1]):
        methods[name] = cont[name]
        if i == 0:
            methods["static b8"] = run_static
    methods.setdefault("static b8", run_static)
    engine.generate(prompts[:2], GenerationConfig(max_new_tokens=4))  # warm-up
    hf_generate(model, prompts[:2], 4)
    acc = {}
    for m, fn in methods.items():
        t = time.perf_counter()
        outs = fn(prompts)
        acc[m] = {"seconds": time.perf_counter() - t, "tokens": sum(map(len, outs)), "outputs": outs}
        print(f"  {m}: {acc[m]['tokens'] / acc[m]['seconds']:.1f} tok/s", file=sys.stderr, flush=True)
    ceiling = {w: w / measure_step_seconds(engine, w, context) for w in all_widths}
    # every row in flight attends over the longest in-flight row's positions: the ceiling there
    longest = max(map(len, prompts)) + N // 2
    ceiling_long = {w: w / measure_step_seconds(engine, w, longest) for w in all_widths}
    reference = None
    if not args.no_reference:
        reference = [engine.generate([p], cfg)[0].token_ids for p in prompts]

    base = acc["generate b8"]["tokens"] / acc["generate b8"]["seconds"]
    rows, results = [], {}
    for m, a in acc.items():
        tps = a["tokens"] / a["seconds"]
        w = int(m.split()[1][1:]) if m.startswith("continuous") else 8
        same = "-" if reference is None else f"{sum(x == y for x, y in zip(a['outputs'], reference))}/{len(prompts)}"
        is_cont = m.startswith("continuous")
        ceil = ceiling.get(w) if is_cont else None  # at the mean context
        kv = kv_peak.get(w) if is_cont else None
        sp = split.get(w) if is_cont else None
        dec_tps = a["tokens"] / sp["decode_seconds"] if sp else None
        rows.append([m, w, a["tokens"], f"{a['seconds']:.1f}", f"{tps:.1f}", f"{tps / base:.2f}x",
                     "-" if ceil is None else f"{ceil:.1f}", "-" if ceil is None else f"{tps / ceil:.0%}",
                     "-" if sp is None else f"{sp['prefill_seconds']:.1f} / {sp['decode_seconds']:.1f}",
                     "-" if sp is None else f"{dec_tps:.1f} ({dec_tps / ceil:.0%} / {dec_tps / ceiling_long[w]:.0%})",
                     "-" if kv is None else f"{kv / 2**20:.0f}", same])
        results[m] = {"width": w, "tokens": a["tokens"], "seconds": a["seconds"], "tokens_per_s": tps,
                      "ceiling_tokens_per_s": ceil, "kv_cache_mib": None if kv is None else kv / 2**20,
                      "prefill_seconds": sp and sp["prefill_seconds"], "decode_seconds": sp and sp["decode_seconds"]}
    t1 = table(["method", "width", "tokens", "seconds", "tok/s", "vs generate b8", f"ceiling tok/s ({context} tokens)",
                "of ceiling",
                "prefill s / decode s", f"decode-phase tok/s (of ceiling at {context} / {longest} tokens)",
                "KV cache MiB",
                "identical to batch-1 plain"], rows)
    print(t1)
    mem = f"Process resident memory at the end: {resident_mib():.0f} MiB."
    print(mem)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        auto_line = (f"auto width: {auto.width} (plain decode tok/s by width: "
                     f"{({w: round(v, 1) for w, v in auto.tokens_per_s.items()})})")
        (out / "table.md").write_text(f"# Continuous batching\n\n{header}\n\n`{command}`\n\n{auto_line}\n\n{t1}\n\n{mem}\n")
        (out / "results.json").write_text(json.dumps({"header": header, "auto": auto.as_dict(), "methods": results,
                                                      "ceiling": ceiling, "ceiling_longest": ceiling_long}, indent=1, default=str))
        plot(results, ceiling, auto_width, out / "throughput_vs_width.png")
        print(f"wrote {out}/table.md, results.json, throughput_vs_width.png")


def plot(results, ceiling, auto_width, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ws = sorted(ceiling)
    ax.plot(ws, [ceiling[w] for w in ws], "k--", marker="x", label="ceiling: bare decode forwards")
    cont = sorted((r["width"], r["tokens_per_s"]) for m, r in results.items() if m.startswith("continuous"))
    ax.plot([w for w, _ in cont], [t for _, t in cont], marker="o", label="continuous engine")
    for m, marker in (("generate b8", "s"), ("static b8", "^")):
        ax.scatter([8], [results[m]["tokens_per_s"]], marker=marker, s=60, zorder=3,
                   label={"generate b8": "transformers generate, batch 8", "static b8": "engine, fixed batches of 8"}[m])
    ax.axvline(auto_width, color="grey", lw=0.8, ls=":")
    ax.text(auto_width, ax.get_ylim()[1] * 0.95, f" auto = {auto_width}", color="grey", va="top")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ws, [str(w) for w in ws])
    ax.set_xlabel("rows in flight (width)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("SmolLM2-135M fp32, 2-core CPU: throughput against width")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
