"""Engine benchmark on the bundled SmolLM2 (CPU by default). Prints tables; not a test.

1. Plain greedy decoding: the engine vs ``transformers`` ``generate``, batch 1 and 8, same prompts,
   outputs checked identical.
2. Self-speculative greedy decoding with fixed skip sets of 1, 3 and 14 layers at batch 1 (and 8):
   acceptance α, τ, tokens/s, and ALGORITHM.md §9's predicted speedup from measured α, γ, c, v
   next to the measured one.

Methods run interleaved (the order rotates per batch of prompts) so machine noise does not favour
one; a warm-up batch is excluded.

    python benchmarks/engine_bench.py [--prompts N] [--max-new-tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter
from conflayers.layers import skip_layers
from conflayers.models import encode_prompts, load_model

SPEC_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spec_bench" / "question.jsonl"
FALLBACK = [
    "Explain how a bicycle works.",
    "Write a short story about a dog who learns to swim.",
    "What is the capital of Peru, and why is it there?",
    "Describe the water cycle for a ten-year-old.",
    "Summarize the causes of the French Revolution.",
    "Give me three tips for a job interview.",
    "How do vaccines train the immune system?",
    "Write a limerick about a cat.",
]
SKIP_SETS = {1: [15], 3: [13, 15, 17], 14: list(range(1, 29, 2))}


def load_prompts(n: int) -> list[str]:
    if not SPEC_BENCH.is_file():
        return (FALLBACK * (n // len(FALLBACK) + 1))[:n]
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r["turns"][0])
    out, i = [], 0
    cats = sorted(by_cat)
    while len(out) < n:  # round-robin over categories
        c = cats[i % len(cats)]
        if by_cat[c]:
            out.append(by_cat[c].pop(0))
        i += 1
    return out


def hf_generate(model, prompts, n):
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [row[L:].tolist() for row in out]


def measure_costs(engine, prompt, skip, widths, reps=15):
    """Median seconds of: one plain decode step, one draft pass under ``skip``, verify of w tokens."""
    model = engine.model

    def timed(fn):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            kv.rollback()
        return statistics.median(ts)

    with torch.inference_mode():
        kv, _ = engine.prefill([prompt])
        tok = torch.tensor([[prompt[-1]]])
        plain = timed(lambda: kv.forward(tok))

        def draft():
            with skip_layers(model, skip):
                kv.forward(tok, logits_to_keep=1)

        c = timed(draft)
        v = {w: timed(lambda w=w: kv.forward(tok.expand(1, w).contiguous())) for w in widths}
    return plain, c / plain, {w: t / plain for w, t in v.items()}


def timed_forward(kv, q: int, generator) -> float:
    """Seconds of one forward of ``q`` random new tokens per row on ``kv`` (rolled back after)."""
    tokens = torch.randint(100, 40000, (kv.n, q), generator=generator)
    t0 = time.perf_counter()
    kv.forward(tokens)
    dt = time.perf_counter() - t0
    kv.rollback()
    return dt


def table(head, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--stop-threshold", type=float, default=0.8)
    ap.add_argument("--max-draft", type=int, default=8)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model()
    engine = Engine(model)
    prompts = encode_prompts(tok, load_prompts(args.prompts))
    N = args.max_new_tokens
    cfg = GenerationConfig(max_new_tokens=N, stop_token_ids=())  # fixed length: equal work per method
    print(f"# SmolLM2-135M-Instruct float32, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, {len(prompts)} prompts x {N} new tokens, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)

    # 1. plain decoding, engine vs transformers generate -------------------------------------
    methods = {"hf_generate": None, "engine_plain": None}
    for k, layers in SKIP_SETS.items():
        methods[f"skip{k}"] = layers
    results = {}
    for bs in (1, 8):
        batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
        engine.generate(batches[0][:1], GenerationConfig(max_new_tokens=4))  # warm-up
        hf_generate(model, batches[0][:1], 4)
        acc = {m: {"tokens": 0, "seconds": 0.0, "outputs": [], "stats": []} for m in methods}
        for bi, batch in enumerate(batches):
            names = list(methods)
            names = names[bi % len(names):] + names[: bi % len(names)]  # rotate the run order
            for m in names:
                layers = methods[m]
                t0 = time.perf_counter()
                if m == "hf_generate":
                    outs = hf_generate(model, batch, N)
                    stats = []
                else:
                    drafter = None if layers is None else LayerSkipDrafter(model, FixedSkip(layers), args.stop_threshold, args.max_draft)
                    res = engine.generate(batch, cfg, drafter)
                    outs, stats = [r.token_ids for r in res], [r.stats for r in res]
                acc[m]["seconds"] += time.perf_counter() - t0
                acc[m]["tokens"] += sum(map(len, outs))
                acc[m]["outputs"] += outs
                acc[m]["stats"] += stats
            print(f"  batch size {bs}: {bi + 1}/{len(batches)} batches done", file=sys.stderr, flush=True)
        results[bs] = acc

    rows = []
    for bs, acc in results.items():
        ref = acc["hf_generate"]
        base = ref["tokens"] / ref["seconds"]
        for m in ("hf_generate", "engine_plain"):
            a = acc[m]
            same = sum(x == y for x, y in zip(a["outputs"], ref["outputs"]))
            rows.append([bs, m, a["tokens"], f"{a['seconds']:.1f}", f"{a['tokens'] / a['seconds']:.1f}",
                         f"{a['tokens'] / a['seconds'] / base:.3f}", f"{same}/{len(ref['outputs'])}"])
    print("\n## Plain greedy decoding: engine vs transformers generate\n")
    print(table(["batch", "method", "tokens", "seconds", "tok/s", "vs generate", "identical outputs"], rows))

    # 2. self-speculation with fixed skip sets + the §9 cost model ------------------------------
    rows = []
    for bs, acc in results.items():
        plain = acc["engine_plain"]
        plain_tps = plain["tokens"] / plain["seconds"]
        for k, layers in SKIP_SETS.items():
            a = acc[f"skip{k}"]
            st = a["stats"]
            steps = sum(s.steps for s in st)
            drafted = sum(s.drafted for s in st)
            accepted = sum(s.accepted for s in st)
            alpha = accepted / drafted if drafted else 0.0
            tau = (accepted + steps) / steps
            gamma = drafted / steps
            same = sum(x == y for x, y in zip(a["outputs"], plain["outputs"]))
            tps = a["tokens"] / a["seconds"]
            pred = "-"
            if bs == 1:
                passes = sum(s.draft_passes for s in st) / steps
                g = max(1, round(gamma))
                _, c, v = measure_costs(engine, prompts[0], layers, sorted({1, g + 1}))
                e_tokens = (1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha < 1 else gamma + 1
                # steps verify 1 + d tokens for varying d: verify cost taken linear in width around mean γ
                v_eff = v[1] + gamma * (v[g + 1] - v[1]) / g
                pred = f"{e_tokens / (passes * c + v_eff):.3f} (c={c:.2f}, v={v_eff:.2f}, passes/step={passes:.2f})"
            rows.append([bs, f"{k}: {layers if k < 14 else 'every other'}", f"{alpha:.3f}", f"{tau:.3f}",
                         f"{gamma:.2f}", f"{tps:.1f}", f"{tps / plain_tps:.3f}", pred, f"{same}/{len(plain['outputs'])}"])
    print("\n## Self-speculative greedy decoding with fixed skip sets (speedup vs the engine's plain decoding)\n")
    print(table(["batch", "skipped layers", "acceptance α", "τ", "drafted/step γ", "tok/s", "measured speedup",
                 "§9 predicted speedup", "identical to plain"], rows))


if __name__ == "__main__":
    main()
