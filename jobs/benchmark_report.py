"""Aggregation, Markdown table, Parquet and plots for ``jobs.benchmark``."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

UNSUPPORTED = "n/a"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (method, batch size, category) plus category ``__all__``."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["method"], r["batch_size"], r["category"])].append(r)
        groups[(r["method"], r["batch_size"], "__all__")].append(r)
    plain = {(r["batch_size"], r["id"]): r["token_ids"] for r in records if r["method"] == "plain"}
    tps = {k: sum(r["new_tokens"] for r in g) / max(1e-9, sum(r["seconds"] for r in g)) for k, g in groups.items()}
    out = []
    for (m, bs, cat), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        steps = sum(r["steps"] or 0 for r in g)
        drafted = sum(r["drafted"] or 0 for r in g)
        accepted = sum(r["accepted"] or 0 for r in g)
        ref = tps.get(("hf_generate", bs, cat))
        matches = [r["token_ids"] == plain[(bs, r["id"])] for r in g if (bs, r["id"]) in plain]
        sets = Counter(tuple(r["skip_set"]) for r in g if r["skip_set"])  # [] = the row never drafted
        out.append({
            "method": m, "batch_size": bs, "category": cat, "n": len(g),
            "tokens": sum(r["new_tokens"] for r in g), "tokens_per_s": tps[(m, bs, cat)],
            "speedup": tps[(m, bs, cat)] / ref if ref else None,
            "tau": (accepted + steps) / steps if steps else None,
            "acceptance": accepted / drafted if drafted else None,
            "exact_match": sum(matches) / len(matches) if matches else None,
            "rouge2": _mean([r["rouge2"] for r in g]),
            "math_accuracy": _mean([None if r["math_correct"] is None else float(r["math_correct"]) for r in g]),
            "search_seconds": sum(r["search_seconds"] for r in g),
            "skip_set": list(sets.most_common(1)[0][0]) if sets else None,
        })
    return out


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def machine() -> str:
    import os

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, transformers {transformers.__version__}")


def markdown(agg: list[dict], cfg, methods: list[str], batch_sizes: list[int], command: str = "",
             wall_seconds: float | None = None, searchers: dict | None = None) -> str:
    lines = [
        f"# Spec-Bench benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}; device {cfg.device}",
        f"- Model {cfg.model} ({cfg.dtype}), greedy, max_new_tokens {cfg.max_new_tokens}, {cfg.per_category} prompt(s) "
        f"per category" + (f"; the whole run took {wall_seconds / 60:.1f} min" if wall_seconds else ""),
        "- Speedup = tokens/s over transformers `generate` at the same batch size. Tokens/s include search time; "
        "`search s` is wall time beyond the engine's prefill and decode (the searcher's own time plus per-step "
        "overhead). Methods run in an order rotated per batch; a warm-up of `generate` and the engine is excluded.",
        "- One searcher per method and batch size learns over the whole run, in category order at batch 1. "
        "Larger batches mix categories (rows sorted by prompt length); a row's time there is its token share of "
        "its batch's wall time, so per-category cells above batch 1 are apportioned, the overall row is exact.",
        f"- `{UNSUPPORTED}` = the method does not support that batch size.",
        "",
        "## Overall",
        "",
        "| method | batch | n | tokens/s | speedup | τ | acceptance | exact match vs plain | ROUGE-2 (summ.) | math acc. | search s | skip set |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(a["method"], a["batch_size"], a["category"]): a for a in agg}
    cats = sorted({a["category"] for a in agg if a["category"] != "__all__"})
    for bs in batch_sizes:
        for m in methods:
            a = by.get((m, bs, "__all__"))
            if a is None:
                lines.append(f"| {m} | {bs} | {UNSUPPORTED} |" + " |" * 9)
                continue
            summ, math = by.get((m, bs, "summarization")), by.get((m, bs, "math_reasoning"))
            lines.append(
                f"| {m} | {bs} | {a['n']} | {_fmt(a['tokens_per_s'], 1)} | {_fmt(a['speedup'], 3)} | {_fmt(a['tau'])} | "
                f"{_fmt(a['acceptance'])} | {_fmt(a['exact_match'])} | {_fmt(summ and summ['rouge2'], 3)} | "
                f"{_fmt(math and math['math_accuracy'])} | {_fmt(a['search_seconds'], 1)} | {a['skip_set'] if a['skip_set'] else '-'} |"
            )
    if searchers:
        lines += ["", "## Searchers at the end of the run", "",
                  "| method | batch | phase | skip set | proposals | paused steps | regret s |", "|---|---|---|---|---|---|---|"]
        for (m, bs), st in searchers.items():
            for name, sub in ([(m, st)] if m != "auto" else [(f"auto ({g or 'all'})", x) for g, x in
                                                              st.get("searchers", {}).items()]):
                lines.append(f"| {name} | {bs} | {sub.get('phase', '-')} | {sub.get('skip_set') or '-'} | "
                             f"{_fmt(sub.get('iterations'))} | {_fmt(sub.get('paused_steps'))} | "
                             f"{_fmt(sub.get('regret_seconds'), 1)} |")
        autos = [(bs, st) for (m, bs), st in searchers.items() if m == "auto"]
        if autos:
            lines += ["", "## The auto controller at the end of the run", "",
                      "| batch | steps by decision | n-gram acceptance | layer skip |", "|---|---|---|---|"]
            for bs, st in autos:
                dec = ", ".join(f"{k} {v}" for k, v in sorted(st.get("decisions", {}).items())) or "-"
                acc = ", ".join(f"{v:.2f}" for v in st.get("ngram_acceptance", {}).values()) or "-"
                gate = st.get("layerskip") or "could pay at width " + ", ".join(
                    str(w) for w, g in st.get("layerskip_gate", {}).items() if g["can_pay"])
                lines.append(f"| {bs} | {dec} | {acc} | {gate} |")
    for bs in batch_sizes:
        lines += ["", f"## Speedup per category, batch size {bs} (n per cell in parentheses)", ""]
        lines.append("| method | " + " | ".join(cats) + " |")
        lines.append("|---|" + "---|" * len(cats))
        for m in methods:
            cells = []
            for c in cats:
                a = by.get((m, bs, c))
                cells.append(UNSUPPORTED if a is None else f"{_fmt(a['speedup'], 2)} ({a['n']})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(agg: list[dict], methods: list[str], batch_sizes: list[int], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(a["method"], a["batch_size"], a["category"]): a for a in agg}
    cats = sorted({a["category"] for a in agg if a["category"] != "__all__"}) + ["__all__"]
    fig, axes = plt.subplots(len(batch_sizes), 1, figsize=(max(8, len(cats) * 1.1), 3.6 * len(batch_sizes)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, bs in zip(axes[:, 0], batch_sizes):
        for i, m in enumerate(methods):
            xs = [x + i * width for x in range(len(cats))]
            ys = [(by.get((m, bs, c)) or {}).get("speedup") for c in cats]
            ax.bar(xs, [y or 0.0 for y in ys], width, label=m)
            for x, c, y in zip(xs, cats, ys):
                if y is None:  # a method that does not run at this batch size: say so, not a blank gap
                    ax.text(x, 0.02, UNSUPPORTED if (m, bs, c) not in by else "-", rotation=90,
                            ha="center", va="bottom", fontsize=6, color="dimgray")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(cats))])
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs generate")
        ax.set_title(f"batch size {bs}")
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out_dir / "speedup_by_category.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, label in (("speedup", axes[0], "speedup vs generate (same batch size)"),
                           ("tokens_per_s", axes[1], "tokens/s, all categories")):
        for m in methods:
            pts = [(bs, by[(m, bs, "__all__")][key]) for bs in batch_sizes if (m, bs, "__all__") in by]
            if pts and all(y is not None for _, y in pts):
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].set_title("speedup vs batch size")
    axes[1].set_title("throughput vs batch size")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "speedup_vs_batch.png", dpi=110)
    plt.close(fig)


def write_report(records: list[dict], cfg, out_dir: Path, command: str = "", wall_seconds: float | None = None,
                 searchers: dict | None = None) -> list[dict]:
    """Writes records/summary Parquet, table.md, config.json, searchers.json and the plots.
    ``searchers`` maps (method, batch size) to the searcher's final ``state()``."""
    out_dir = Path(out_dir)
    pq.write_table(pa.Table.from_pylist(records), out_dir / "records.parquet")
    agg = aggregate(records)
    pq.write_table(pa.Table.from_pylist(agg), out_dir / "summary.parquet")
    methods, sizes = list(cfg.methods), list(cfg.batch_sizes)
    md = markdown(agg, cfg, methods, sizes, command, wall_seconds, searchers)
    (out_dir / "table.md").write_text(md)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (out_dir / "searchers.json").write_text(json.dumps(
        [{"method": m, "batch_size": bs, **st} for (m, bs), st in (searchers or {}).items()], indent=2, default=str))
    plots(agg, methods, sizes, out_dir)
    print(md)
    return agg
