"""Corpus drafts on the bundled SmolLM2: plain / ngram / corpus / auto side by side, cold and warm.

Workloads, each a held-out test set and a disjoint warm-up set of the same kind:

- ``json_extraction``: synthetic person records -> one JSON object with fixed keys;
- ``classification``: synthetic customer messages -> one of five fixed labels and a reason;
- ``templated_summary``: synthetic product details -> a summary in a fixed five-line template;
- ``specbench``: Spec-Bench prompts (``../shared/data/spec_bench/question.jsonl``), the same
  number per category in both sets (skipped when the file is absent).

Methods (the engine's continuous stream, greedy): ``plain``; ``ngram`` (each row's own prompt +
output); ``corpus`` (the longer of the row's n-gram draft and its dataset's corpus draft);
``auto`` (the pipeline's controller: plain / n-gram / corpus / layer skip per step on the measured
cost surface, a ConfLayers searcher for layer skip). ``cold``: the index starts empty and learns
each test row as it finishes; ``warm``: it starts from the warm-up set's outputs (plain decoding).
Each width runs every method over the same rows; the method order rotates per round of rows, and
a drafter keeps its index across rounds. Output must equal plain decoding at the same width.

    python benchmarks/corpus_bench.py [--rows 16] [--warm-rows 24] [--widths 1,auto] [--threads 1]
        [--out docs/benchmarks/corpus]
    python benchmarks/corpus_bench.py --replot docs/benchmarks/corpus   # the plot again, from results.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from engine_bench import SPEC_BENCH, table  # noqa: E402  (run as a script from benchmarks/)
from kernel_bench import cpu_name  # noqa: E402

from conflayers import Engine, GenerationConfig, LayerSkipDrafter, Request
from conflayers.costs.calibrate import load_or_calibrate
from conflayers.costs.width import choose_width
from conflayers.drafts.auto import build_drafter, surface_grid
from conflayers.drafts.corpus import CorpusDrafter, SuffixIndex
from conflayers.models import encode_prompts, load_model

FIRST = ["Maria", "James", "Aiko", "Lukas", "Fatima", "Chen", "Olga", "Diego", "Amara", "Noah", "Priya", "Tomás"]
LAST = ["Lopez", "Smith", "Tanaka", "Becker", "Haddad", "Wei", "Ivanova", "Ruiz", "Okafor", "Brown", "Patel", "Silva"]
CITIES = ["Lisbon", "Chicago", "Osaka", "Hamburg", "Casablanca", "Chengdu", "Kazan", "Bogotá", "Lagos", "Leeds"]
JOBS = ["nurse", "carpenter", "data analyst", "teacher", "pilot", "chef", "architect", "librarian", "electrician"]
LABELS = ["billing", "shipping", "returns", "technical", "account"]
ISSUES = {
    "billing": ["I was charged twice for order {n}", "my invoice {n} shows the wrong amount",
                "the refund for order {n} never reached my card"],
    "shipping": ["package {n} has not arrived after two weeks", "the tracking for order {n} stopped updating",
                 "my parcel {n} was delivered to the wrong address"],
    "returns": ["I want to send back order {n} because it is too small", "how do I return the jacket from order {n}",
                "the return label for order {n} does not print"],
    "technical": ["the app crashes when I open order {n}", "I cannot log in since the update, error {n}",
                  "the checkout page freezes at step {n}"],
    "account": ["please change the email on account {n}", "I want to close my account {n}",
                "my account {n} was locked after a password reset"],
}
PRODUCTS = [("TrailMax 40", "hiking backpack"), ("AquaPure Mini", "water filter"), ("LumaDesk", "desk lamp"),
            ("SwiftCharge 3", "phone charger"), ("CozyNest", "dog bed"), ("BrewMate", "coffee grinder"),
            ("ZenBuds", "wireless earbuds"), ("FrostGuard", "winter gloves"), ("PixelFrame", "digital photo frame")]
FEATURES = ["waterproof", "lightweight", "two-year warranty", "USB-C", "machine washable", "recycled materials",
            "adjustable", "quiet operation", "fits in a pocket", "ten-hour battery", "non-slip base"]


def json_extraction(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    rec = (f"Name: {first} {last}\nAge: {rng.randint(21, 70)}\nCity: {rng.choice(CITIES)}\n"
           f"Occupation: {rng.choice(JOBS)}\nEmail: {first.lower()}.{last.lower()}@example.com")
    return ("Extract the person's name, age, city, occupation and email from this record as a JSON object "
            "with the keys name, age, city, occupation and email. Reply with the JSON object only.\n\n" + rec)


def classification(rng: random.Random) -> str:
    label = rng.choice(LABELS)
    msg = rng.choice(ISSUES[label]).format(n=rng.randint(1000, 9999))
    return ("Classify the customer message into exactly one of these labels: billing, shipping, returns, "
            "technical, account. Reply in the form 'Label: <label>. Reason: <one short sentence>.'\n\n"
            f"Message: Hello, {msg}. Thanks.")


def templated_summary(rng: random.Random) -> str:
    name, kind = rng.choice(PRODUCTS)
    feats = rng.sample(FEATURES, 3)
    return ("Write a product listing in exactly this format:\nProduct: <name>\nCategory: <category>\n"
            "Price: <price>\nFeatures: <three features, comma-separated>\nVerdict: <one sentence>\n\n"
            f"Details: the {name} is a {kind} priced at ${rng.randint(9, 199)}.99; it is {feats[0]}, "
            f"{feats[1]} and {feats[2]}.")


SYNTHETIC = {"json_extraction": json_extraction, "classification": classification,
             "templated_summary": templated_summary}


def specbench(n_test: int, n_warm: int) -> tuple[list[str], list[str], list[str]] | None:
    """(test prompts, their categories, warm-up prompts): per category, the first prompts go to the
    test set and the next ones to the warm-up set."""
    if not SPEC_BENCH.is_file():
        return None
    by_cat: dict[str, list[str]] = {}
    for line in SPEC_BENCH.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_cat.setdefault(r["category"], []).append(r["turns"][0])
    cats = sorted(by_cat)
    per_test, per_warm = max(1, n_test // len(cats)), max(1, n_warm // len(cats))
    test, test_cats, warm = [], [], []
    for c in cats:
        test += by_cat[c][:per_test]
        test_cats += [c] * len(by_cat[c][:per_test])
        warm += by_cat[c][per_test : per_test + per_warm]
    return test, test_cats, warm


def plot(results: dict, path: Path) -> None:
    """Bars of tokens/s over plain decoding: a panel per width, a group per workload, a bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(results["cells"].values())
    widths = sorted({c["width"] for c in cells})
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    methods = [m for m in dict.fromkeys(c["method"] for c in cells) if m != "plain"]
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.2), sharey=True, squeeze=False)
    for ax, width in zip(axes[0], widths):
        for j, m in enumerate(methods):
            ys = [next((c["vs_plain"] for c in cells if c["workload"] == w and c["method"] == m
                        and c["width"] == width), 0.0) for w in workloads]
            xs = [i + (j - (len(methods) - 1) / 2) * 0.8 / len(methods) for i in range(len(workloads))]
            ax.bar(xs, ys, width=0.8 / len(methods), label=m)
        ax.axhline(1.0, color="black", lw=0.8)
        flight = {c["workload"]: c.get("in_flight", width) for c in cells if c["width"] == width}
        ax.set_xticks(range(len(workloads)), [f"{w.replace('_', chr(10))}\n({flight.get(w, '-')} in flight)"
                                              for w in workloads], fontsize=8)
        ax.set_title("width 1" if width == 1 else f"width {width} (rows in flight: all of a round's)")
    axes[0][0].set_ylabel("tokens/s over plain decoding")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Corpus drafts, SmolLM2-135M on CPU (greedy; output identical to plain)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def index_memory(workloads: dict, tokens: int) -> tuple[dict, str]:
    """An index of ``tokens`` tokens of the workloads' warm-up prompts, each with 3 random tokens
    changed; its memory as tracemalloc counts it (all the index's allocations) and as it estimates it."""
    import tracemalloc

    rng = random.Random(0)
    base = [o for w in workloads.values() for o in w["warm"]] or [[1, 2, 3]]
    outs, added = [], 0
    while added < tokens:
        o = list(rng.choice(base))
        for _ in range(3):
            o[rng.randrange(len(o))] = rng.randrange(49152)
        o = o[: tokens - added - 1] or [0]
        outs.append(o)
        added += len(o) + 1
    tracemalloc.start()
    ix = SuffixIndex(max_tokens_indexed=tokens + 1)
    for o in outs:
        ix.add(o)
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_m = traced / ix.tokens_indexed * 1e6
    out = {"tokens": ix.tokens_indexed, "states": ix.states, "traced_bytes": traced,
           "estimated_bytes": ix.memory_bytes(), "mb_per_million": per_m / 1e6}
    return out, (f"Index memory: {ix.tokens_indexed} tokens (the workloads' warm-up prompts with 3 random tokens "
                 f"changed each), {ix.states} states, {traced / 2**20:.1f} MiB traced (tracemalloc) = "
                 f"{per_m / 1e6:.1f} MB per million tokens (the index's own estimate: "
                 f"{ix.memory_bytes() / ix.tokens_indexed:.1f} bytes a token).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16, help="test rows per synthetic workload")
    ap.add_argument("--warm-rows", type=int, default=24, help="warm-up rows per synthetic workload")
    ap.add_argument("--specbench-rows", type=int, default=26, help="Spec-Bench test rows (same number per category)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--widths", default="1,auto")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of rows per width (the method order rotates)")
    ap.add_argument("--workloads", default="json_extraction,classification,templated_summary,specbench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index-memory-tokens", type=int, default=1_000_000,
                    help="tokens for the index-memory measurement (0: skip)")
    ap.add_argument("--out")
    ap.add_argument("--replot", help="draw speedup.png again from DIR/results.json and stop")
    ap.add_argument("--memory-only", metavar="DIR",
                    help="measure the index memory only and update DIR/results.json and DIR/table.md")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((Path(args.replot) / "results.json").read_text()), Path(args.replot) / "speedup.png")
        return
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/corpus_bench.py", *sys.argv[1:]])
    model, tok = load_model()
    engine = Engine(model)
    N = args.max_new_tokens
    gc = GenerationConfig(max_new_tokens=N)
    key = "smollm2-135m-instruct"

    workloads: dict[str, dict] = {}
    for name in args.workloads.split(","):
        if name == "specbench":
            sb = specbench(args.specbench_rows, args.specbench_rows)
            if sb is None:
                print("Spec-Bench file not found: skipping that workload", file=sys.stderr)
                continue
            test, cats, warm = sb
        else:
            rng = random.Random(name)
            test = [SYNTHETIC[name](rng) for _ in range(args.rows)]
            warm = [SYNTHETIC[name](rng) for _ in range(args.warm_rows)]
            cats = [name] * len(test)
        workloads[name] = {"test": encode_prompts(tok, test), "warm": encode_prompts(tok, warm), "categories": cats}

    if args.memory_only:
        out = Path(args.memory_only)
        res = json.loads((out / "results.json").read_text())
        res["index_memory"], line = index_memory(workloads, args.index_memory_tokens)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        text = (out / "table.md").read_text()
        keep = text[: text.index("Index memory:")] if "Index memory:" in text else text + "\n"
        (out / "table.md").write_text(keep + line + f" `{command}`\n")
        print(line)
        return
    auto = choose_width(engine, row_tokens=max(len(p) for w in workloads.values() for p in w["test"]) + N)
    widths = [auto.width if w == "auto" else int(w) for w in args.widths.split(",")]
    surface, _ = load_or_calibrate(engine, *surface_grid(max(widths), 8))
    header = (f"SmolLM2-135M-Instruct float32, {cpu_name()}, {torch.get_num_threads()} torch thread(s), "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; greedy, up to {N} new tokens; "
              f"widths {widths} (auto width {auto.width})")
    print(f"# Corpus drafts: {header}\n\n`{command}`\n", flush=True)

    def new_index(group: str) -> SuffixIndex:
        return SuffixIndex(key=key)

    def drafter(method: str, warm_outputs: list[list[int]]):
        kind, _, start = method.partition("-")
        corpus = CorpusDrafter(new_index=new_index)
        if start == "warm":
            for o in warm_outputs:
                corpus.learn(o)
        if kind == "corpus":
            return build_drafter("corpus", model, corpus=corpus)
        if kind == "auto":
            from pipeline.policies import make_policy

            ls = LayerSkipDrafter(model, make_policy("conflayers", model), 0.8, 8)
            return build_drafter("auto", model, ls, surface, corpus=corpus)
        return build_drafter(kind, model)

    methods = ["plain", "ngram", "corpus-cold", "corpus-warm", "auto-cold", "auto-warm"]
    results: dict = {"header": header, "command": command, "auto_width": auto.width, "cells": {}}
    rows_out = []
    for wname, w in workloads.items():
        t0 = time.perf_counter()
        warm_out = [r.token_ids for r in engine.generate(w["warm"], gc, max_batch=min(8, max(widths)))]
        print(f"{wname}: warm-up outputs {sum(map(len, warm_out))} tokens in {time.perf_counter() - t0:.0f} s",
              flush=True)
        for width in widths:
            drafters = {m: (None if m == "plain" else drafter(m, warm_out)) for m in methods}
            acc = {m: {"seconds": 0.0, "tokens": 0, "outputs": [], "steps": Counter(), "rows": []} for m in methods}
            test = w["test"]
            per = -(-len(test) // args.rounds)
            in_flight = min(width, per)  # a round's rows are all there is to run at once
            for rnd in range(args.rounds):
                part = test[rnd * per : (rnd + 1) * per]
                order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]
                for m in order:
                    t = time.perf_counter()
                    res = engine.generate([Request(p, N, group="") for p in part], gc, drafters[m], max_batch=in_flight)
                    acc[m]["seconds"] += time.perf_counter() - t
                    acc[m]["tokens"] += sum(len(r.token_ids) for r in res)
                    acc[m]["outputs"] += [r.token_ids for r in res]
                    for r in res:
                        acc[m]["steps"].update(r.stats.drafter_steps)
                        acc[m]["rows"].append((len(r.token_ids), r.stats.prefill_seconds + r.stats.decode_seconds))
            base = acc["plain"]["tokens"] / acc["plain"]["seconds"]
            for m in methods:
                a = acc[m]
                tps = a["tokens"] / a["seconds"]
                same = sum(x == y for x, y in zip(a["outputs"], acc["plain"]["outputs"]))
                st = a["steps"]
                total = sum(st.values()) or 1
                d = drafters[m]
                corpus = getattr(d, "corpus", d) if m != "plain" else None
                mem = None
                if isinstance(corpus, CorpusDrafter):
                    ix = corpus.index_for("")
                    mem = (ix.tokens_indexed, ix.memory_bytes())
                per_cat = {}  # tok/s over each row's own seconds (prefill + steps in flight), per category
                for c in sorted(set(w["categories"])):
                    idx = [i for i, x in enumerate(w["categories"]) if x == c]

                    def rate(rows):
                        return sum(rows[i][0] for i in idx) / max(1e-9, sum(rows[i][1] for i in idx))
                    per_cat[c] = rate(a["rows"]) / rate(acc["plain"]["rows"])
                cell = {"workload": wname, "width": width, "in_flight": in_flight, "method": m, "tokens": a["tokens"],
                        "seconds": a["seconds"], "tokens_per_s": tps, "vs_plain": tps / base,
                        "identical_to_plain": f"{same}/{len(test)}",
                        "steps": dict(st), "index_tokens": mem and mem[0], "index_bytes": mem and mem[1],
                        "vs_plain_by_category": per_cat}
                results["cells"][f"{wname}|{width}|{m}"] = cell
                rows_out.append([wname, f"{width} ({in_flight} in flight)" if in_flight < width else width, m, a["tokens"], f"{a['seconds']:.1f}", f"{tps:.1f}", f"{tps / base:.2f}x",
                                 f"{same}/{len(test)}", f"{st['corpus'] / total:.0%}", f"{st['ngram'] / total:.0%}",
                                 "-" if mem is None else f"{mem[0]}"])
                print(f"  {wname} w{in_flight} {m}: {tps:.1f} tok/s ({tps / base:.2f}x plain), identical {same}/{len(test)}",
                      flush=True)
    t1 = table(["workload", "width", "method", "tokens", "seconds", "tok/s", "vs plain", "identical to plain",
                "corpus steps", "n-gram steps", "tokens indexed"], rows_out)
    print(t1)
    cat_rows = []
    for width in widths:
        for m in methods[1:]:
            c = results["cells"].get(f"specbench|{width}|{m}")
            if c:
                r = c["vs_plain_by_category"]
                cat_rows.append([width, m, f"{min(r.values()):.2f}x ({min(r, key=r.get)})",
                                 " ".join(f"{k[:8]} {v:.2f}" for k, v in r.items())])
    t2 = table(["width", "method", "lowest category", "per category (tok/s over each row's own seconds, vs plain)"],
               cat_rows) if cat_rows else ""
    print(t2)

    mem_line = ""
    if args.index_memory_tokens:
        results["index_memory"], mem_line = index_memory(workloads, args.index_memory_tokens)
        print(mem_line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(f"# Corpus drafts\n\n{header}\n\n`{command}`\n\n{t1}\n\n"
                                      f"Spec-Bench by category:\n\n{t2}\n\n{mem_line}\n")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        plot(results, out / "speedup.png")
        print(f"wrote {out}/table.md, results.json, speedup.png")


if __name__ == "__main__":
    main()
