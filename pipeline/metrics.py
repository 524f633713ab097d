"""Run metrics from the generations table: one row per dataset plus ``__all__``, and a printed table.

Throughput is measured per actor: ``tokens_per_s`` = generated tokens / the engine time spent on
them (``compute_seconds``), ``baseline_tokens_per_s`` the same for the plain-decoding re-runs, and
``speedup`` compares the two on the very same rows (the baseline rows, decoded both ways in the
same batch shape). ``job_tokens_per_s`` is generated tokens / the run's wall time.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

METRIC_FIELDS = (
    "dataset", "rows_ok", "rows_error", "prompt_tokens", "generated_tokens", "wall_seconds", "compute_seconds",
    "tokens_per_s", "job_tokens_per_s", "baseline_rows", "baseline_tokens_per_s", "speedup", "tau",
    "acceptance_rate", "skip_set", "skip_ratio", "search_iterations", "exact_match_rate", "rouge2",
    "accelerator_type", "accelerator_count", "num_actors", "plain_step_share", "ngram_step_share",
    "layerskip_step_share", "startup_seconds",
)
STEP_KINDS = ("plain", "ngram", "layerskip")  # a row's steps by the drafter whose draft was verified


def dedupe(table: pa.Table) -> pa.Table:
    """Keep one row per id (the first committed); a re-written or retried batch may repeat ids."""
    seen, keep = set(), []
    for i, rid in enumerate(table.column("id").to_pylist()):
        if rid not in seen:
            seen.add(rid)
            keep.append(i)
    return table.take(keep) if len(keep) < table.num_rows else table


def _div(a, b):
    return a / b if b else None


def rouge2(pairs: list[tuple[str, str]]) -> float | None:
    if not pairs:
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"])
    return sum(scorer.score(ref, gen)["rouge2"].fmeasure for ref, gen in pairs) / len(pairs)


def _group(rows: list[dict], name: str, wall: float, n_layers: int | None, chosen: dict | None,
           accel_type: str, accel_count: int, startup: float | None = None) -> dict:
    ok = [r for r in rows if not r["error_type"]]
    gen = sum(r["num_generated_tokens"] or 0 for r in ok)
    compute = sum(r["compute_seconds"] or 0 for r in ok)
    base = [r for r in ok if r["baseline"]]
    base_tok = sum(r["baseline_num_generated_tokens"] or 0 for r in base)
    base_sec = sum(r["baseline_compute_seconds"] or 0 for r in base)
    paired_tps = _div(sum(r["num_generated_tokens"] or 0 for r in base), sum(r["compute_seconds"] or 0 for r in base))
    base_tps = _div(base_tok, base_sec)
    steps = sum(r["steps"] or 0 for r in ok)
    drafted = sum(r["drafted"] or 0 for r in ok)
    accepted = sum(r["accepted"] or 0 for r in ok)
    if chosen is not None:
        skip = list(chosen.get("skip_set") or [])
        iters = chosen.get("search_iterations")
    else:
        counts = Counter(tuple(r["skip_set"] or ()) for r in ok)
        skip = list(counts.most_common(1)[0][0]) if counts else []
        iters = max((r["search_iterations"] or 0 for r in ok), default=0)
    exact = [r["baseline_exact_match"] for r in base if r["baseline_exact_match"] is not None]
    kind_steps = {k: sum(r.get(f"{k}_steps") or 0 for r in ok) for k in STEP_KINDS}
    return {
        "dataset": name,
        "rows_ok": len(ok),
        "rows_error": len(rows) - len(ok),
        "prompt_tokens": sum(r["num_input_tokens"] or 0 for r in ok),
        "generated_tokens": gen,
        "wall_seconds": wall,
        "compute_seconds": compute,
        "tokens_per_s": _div(gen, compute),
        "job_tokens_per_s": _div(gen, wall),
        "baseline_rows": len(base),
        "baseline_tokens_per_s": base_tps,
        "speedup": _div(paired_tps, base_tps) if paired_tps is not None else None,
        "tau": _div(accepted + steps, steps),
        "acceptance_rate": _div(accepted, drafted),
        "skip_set": skip,
        "skip_ratio": _div(len(skip), n_layers) if n_layers else None,
        "search_iterations": int(iters or 0),
        "exact_match_rate": _div(sum(exact), len(exact)),
        "rouge2": rouge2([(r["reference"], r["generated_text"] or "") for r in ok if r["reference"]]),
        "accelerator_type": accel_type,
        "accelerator_count": accel_count,
        "num_actors": len({r["actor_id"] for r in ok}),
        **{f"{k}_step_share": _div(n, steps) for k, n in kind_steps.items()},
        "startup_seconds": startup,
    }


def compute_metrics(generations: pa.Table, wall_seconds: float, n_layers: int | None = None,
                    chosen_sets: dict | None = None, accelerator_count: int = 0,
                    startup_seconds: float | None = None) -> list[dict]:
    """``startup_seconds``: from the job's start until its actors were ready (model loaded, width
    chosen, cost surface in hand): part of ``wall_seconds`` that no token was generated in."""
    rows = dedupe(generations).to_pylist()
    accel = Counter(r["accelerator"] for r in rows if r["accelerator"])
    accel_type = accel.most_common(1)[0][0] if accel else "cpu"
    chosen_sets = chosen_sets or {}
    by_ds: dict[str, list[dict]] = {}
    for r in rows:
        by_ds.setdefault(r["dataset"], []).append(r)
    out = [_group(v, k, wall_seconds, n_layers, chosen_sets.get(k), accel_type, accelerator_count, startup_seconds)
           for k, v in sorted(by_ds.items())]
    out.append(_group(rows, "__all__", wall_seconds, n_layers, None, accel_type, accelerator_count, startup_seconds))
    if len(by_ds) > 1:  # no single set for the whole run
        out[-1]["skip_set"], out[-1]["skip_ratio"] = [], None
    return out


METRICS_SCHEMA = pa.schema(
    [(k, pa.string()) if k in ("dataset", "accelerator_type")
     else (k, pa.list_(pa.int64())) if k == "skip_set"
     else (k, pa.int64()) if k in ("rows_ok", "rows_error", "prompt_tokens", "generated_tokens", "baseline_rows",
                                   "search_iterations", "accelerator_count", "num_actors")
     else (k, pa.float64())
     for k in METRIC_FIELDS]
)


def metrics_table(metrics: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(metrics, schema=METRICS_SCHEMA)


def summary_table(metrics: list[dict]) -> str:
    head = ["dataset", "ok", "err", "gen tok", "tok/s", "base tok/s", "speedup", "tau", "accept", "exact",
            "rouge2", "steps ngram/lskip", "skip set"]

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    lines = [
        [m["dataset"], str(m["rows_ok"]), str(m["rows_error"]), str(m["generated_tokens"]), f(m["tokens_per_s"], ".1f"),
         f(m["baseline_tokens_per_s"], ".1f"), f(m["speedup"]), f(m["tau"]), f(m["acceptance_rate"]),
         f(m["exact_match_rate"]), f(m["rouge2"], ".3f"),
         f"{f(m['ngram_step_share'], '.0%')}/{f(m['layerskip_step_share'], '.0%')}",
         ",".join(map(str, m["skip_set"])) or "-"]
        for m in metrics
    ]
    widths = [max(len(h), *(len(r[c]) for r in lines)) for c, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) if c in (0, 12) else h.rjust(w) for c, (h, w) in enumerate(zip(head, widths)))]
    for r in lines:
        out.append("  ".join(v.ljust(w) if c in (0, 12) else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(out)
