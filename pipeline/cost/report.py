"""Predicting the cells not run, pricing every cell, and the report (table, Parquet, Pareto plot).

Definitions, per cell:

- on the sample: steady seconds = wall - start-up; *sample tok/s* = output tokens / steady seconds
  (measured, or predicted for a predicted cell; a measured cell's leave-one-out prediction is
  checked against it);
- for the corpus: its rows in calls of ``ray.batch_size`` rows (the sample's lengths, cycled) over
  the cell's actors, replayed on the cost surface times the cell's measured/predicted ratio
  (steady seconds; + start-up = *corpus hours*); *corpus tok/s* = corpus output tokens / steady
  seconds (a cell without a surface: its sample tok/s);
- $/hour = the instance row's $/instance-hour / its GPUs (or vCPUs) x the GPUs (vCPUs) the cell's
  actors hold; $/1M output tokens = $/hour / 3600 / corpus tok/s x 1e6, $/1M input tokens the
  same over corpus input tokens/s (the whole cost each time: compare it with per-input-token
  prices, don't add the two); corpus $ = $/hour x corpus hours, at on-demand and at spot prices;
- start-up/idle share: of the actor-hours paid, those no engine was busy (start-up, the tails of
  calls, actors without a call);
- speedup = sample tok/s over the plain cell of the same setting; exact match = the share of rows
  whose text equals that plain cell's (greedy runs only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

from conflayers.costs.forecast import job_seconds, stream_seconds
from conflayers.costs.surface import CostSurface

from .prices import PriceTable

SETTING = ("accelerator", "concurrency", "width", "dtype", "kernels")  # a cell's setting, drafter aside


# ---- predictions ---------------------------------------------------------------------------------
def forecast(surface: CostSurface, cell: dict, lengths: Sequence[tuple[int, int]], actors: int, width: int) -> float:
    """Predicted plain-decoding seconds of the sample run's shape: its rows in ``actors`` calls."""
    bs = math.ceil(len(lengths) / actors)
    return job_seconds(surface, lengths, width, actors, bs, cell.get("prefill_tokens", 512))[0]


def _near(cands: list[dict], width: int, actors: int) -> list[dict]:
    """The candidates closest in (log2 width, actors)."""
    if not cands:
        return []
    d = [(abs(math.log2(c["width"]) - math.log2(width)) + abs(c["concurrency"] - actors), c) for c in cands]
    best = min(x for x, _ in d)
    return [c for x, c in d if x == best]


def add_ratios(cells: list[dict], surfaces: dict) -> None:
    """Each measured cell's ratio of measured steady seconds to the surface's plain prediction, and the
    prediction the other cells of its device and drafter would have made for it (leave one out)."""
    for c in cells:
        s = surfaces.get(c.get("surface"))
        if s is None or not c["lengths"]:
            c["ratio"] = None
            continue
        c["forecast_seconds"] = forecast(s, c, c["lengths"], c["concurrency"], c["width"])
        c["ratio"] = steady(c) / c["forecast_seconds"]
    for c in cells:
        others = [o for o in cells if o is not c and o.get("ratio") and o["surface"] == c.get("surface")
                  and o["drafter"] == c["drafter"]]
        near = _near(others, c["width"], c["concurrency"])
        c["loo_tokens_per_s"] = None
        if near and c.get("ratio"):
            ratio = sum(o["ratio"] for o in near) / len(near)
            c["loo_tokens_per_s"] = c["output_tokens"] / (c["forecast_seconds"] * ratio)
            c["loo_from"] = ", ".join(o["cell"] for o in near)


def steady(c: dict) -> float:
    return max(1e-9, c["wall_seconds"] - c["startup_seconds"])


def predicted_cells(measured: list[dict], surfaces: dict, widths: list[int], actor_counts: list[int],
                    lengths: list[tuple[int, int]]) -> list[dict]:
    """Cells for every surface x width x actor count x drafter not measured: the surface's plain
    prediction of the sample times the nearest measured ratio of that device and drafter."""
    out = []
    rows = len(lengths)
    tokens_in, tokens_out = sum(p for p, _ in lengths), sum(n for _, n in lengths)
    for key, s in surfaces.items():
        mine = [c for c in measured if c.get("surface") == key and c.get("ratio")]
        drafters = sorted({c["drafter"] for c in mine}) or ["none"]
        startups = [c["startup_seconds"] for c in mine if c["startup_known"]]
        startup = sum(startups) / len(startups) if startups else 0.0
        dtype, kernels = (mine[0]["dtype"], mine[0]["kernels"]) if mine else (s.dtype, "auto")
        for w in widths:
            for a in actor_counts:
                for d in drafters:
                    if any(c["width"] == w and c["concurrency"] == a and c["drafter"] == d for c in mine):
                        continue
                    near = _near([c for c in mine if c["drafter"] == d], w, a)
                    checked = getattr(s, "stream_ratio", None) or {}
                    if near:
                        ratio = sum(c["ratio"] for c in near) / len(near)
                        note = f"ratio of {', '.join(c['cell'] for c in near)}"
                    elif checked:  # the engine's own streams measured on this device (no Ray overhead)
                        at = min(checked, key=lambda x: abs(math.log2(x) - math.log2(w)))
                        ratio = checked[at]
                        note = f"ratio {ratio:.2f} of the device check's engine stream at width {at} (no Ray measured)"
                    else:
                        ratio = 1.0
                        note = "engine time on the surface only: no cell or engine stream measured on this device"
                    base = {"prefill_tokens": mine[0]["prefill_tokens"] if mine else 512}
                    secs, calls = job_seconds(s, lengths, w, a, math.ceil(rows / a), base["prefill_tokens"])
                    secs *= ratio
                    if not startups:
                        note += "; start-up unknown (0)"
                    out.append({
                        "cell": f"a{a}-w{w}-{d}-{dtype}-{kernels}" + ("" if mine else f"@{s.accelerator}"),
                        "mode": "predicted", "source": s.key, "surface": key, "accelerator": s.accelerator,
                        "gpus": a if s.accelerator != "cpu" else 0,
                        "vcpus": a * max(1, s.threads) if s.accelerator == "cpu" else 0,
                        "concurrency": a, "width": w, "drafter": d, "dtype": dtype, "kernels": kernels,
                        "threads": s.threads, "rows": rows, "input_tokens": tokens_in, "output_tokens": tokens_out,
                        "wall_seconds": startup + secs, "startup_seconds": startup, "startup_known": bool(startups),
                        "busy_seconds": sum(calls) * ratio, "lengths": lengths, "texts": {}, "ratio": ratio,
                        "greedy": True, "prefill_tokens": base["prefill_tokens"], "note": note,
                        "loo_tokens_per_s": None,
                    })
    return out


def add_comparisons(cells: list[dict]) -> None:
    """Speedup over, and exact match with, the plain cell of the same setting."""
    plain = {tuple(c[k] for k in SETTING) + (c["mode"],): c for c in cells if c["drafter"] == "none"}
    for c in cells:
        p = plain.get(tuple(c[k] for k in SETTING) + (c["mode"],))
        if p is None and c["mode"] == "predicted":
            p = plain.get(tuple(c[k] for k in SETTING) + ("measured",))
        c["speedup"] = (tps(c) / tps(p)) if p is not None else None
        c["exact_match"] = None
        if p is not None and p is not c and c["texts"] and p["texts"] and c["greedy"]:
            ids = set(c["texts"]) & set(p["texts"])
            c["exact_match"] = sum(c["texts"][i] == p["texts"][i] for i in ids) / len(ids) if ids else None


def tps(c: dict) -> float:
    return c["output_tokens"] / steady(c)


def corpus_seconds(c: dict, surfaces: dict, corpus_rows: int, batch_size: int) -> tuple[float, float]:
    """Projected (steady seconds, busy actor-seconds) for the whole corpus: its calls of ``batch_size``
    rows (the cell's lengths, cycled) over the cell's actors, on the surface times the cell's ratio;
    without a surface, at the cell's measured rate with every actor busy."""
    mean_out = c["output_tokens"] / max(1, c["rows"])
    s = surfaces.get(c.get("surface"))
    if s is None or not c.get("ratio") or not c["lengths"]:
        secs = corpus_rows * mean_out / tps(c)
        return secs, secs * c["concurrency"]
    bs = min(batch_size, corpus_rows)
    call = [c["lengths"][i % len(c["lengths"])] for i in range(bs)]
    t_call = stream_seconds(s, call, c["width"], c["prefill_tokens"]).seconds * c["ratio"]
    calls = math.ceil(corpus_rows / bs)
    return math.ceil(calls / c["concurrency"]) * t_call, calls * t_call


# ---- pricing -------------------------------------------------------------------------------------
def usd_per_1m(usd_per_hour: float | None, tokens_per_s: float) -> float | None:
    """$ per million tokens at ``tokens_per_s`` while paying ``usd_per_hour``."""
    if usd_per_hour is None or not tokens_per_s:
        return None
    return usd_per_hour / 3600 / tokens_per_s * 1e6


def report_rows(cells: list[dict], prices: PriceTable, only: list[str], surfaces: dict, corpus_rows: int,
                batch_size: int) -> list[dict]:
    rows = []
    for c in cells:
        units = c["gpus"] if c["accelerator"] != "cpu" else c["vcpus"]
        steady_s, busy_s = corpus_seconds(c, surfaces, corpus_rows, batch_size)
        corpus_in = corpus_rows * c["input_tokens"] / max(1, c["rows"])
        corpus_out = corpus_rows * c["output_tokens"] / max(1, c["rows"])
        out_tps, in_tps = corpus_out / steady_s, corpus_in / steady_s
        hours = (c["startup_seconds"] + steady_s) / 3600
        for p in prices.for_accelerator(c["accelerator"], only):
            od, sp = p.unit_hour("on_demand"), p.unit_hour("spot")
            od_h, sp_h = od * units, (sp * units if sp is not None else None)
            loo = c.get("loo_tokens_per_s")
            rows.append({
                "cell": c["cell"], "mode": c["mode"], "instance": p.name, "accelerator": c["accelerator"],
                "unit": "vCPU" if p.is_cpu else "GPU", "units": units, "concurrency": c["concurrency"],
                "width": c["width"], "drafter": c["drafter"], "dtype": c["dtype"], "kernels": c["kernels"],
                "rows": c["rows"], "input_tokens": c["input_tokens"], "output_tokens": c["output_tokens"],
                "wall_seconds": c["wall_seconds"], "startup_seconds": c["startup_seconds"],
                "steady_seconds": steady(c), "tokens_per_s": tps(c),
                "startup_idle_share": max(0.0, 1 - c["busy_seconds"] / (c["concurrency"] * c["wall_seconds"])),
                "corpus_rows": corpus_rows, "corpus_input_tokens": int(round(corpus_in)),
                "corpus_output_tokens": int(round(corpus_out)), "corpus_tokens_per_s": out_tps,
                "corpus_tokens_per_s_per_unit": out_tps / max(1, units), "corpus_hours": hours,
                "corpus_startup_idle_share": max(0.0, 1 - busy_s / (c["concurrency"] * hours * 3600)),
                "usd_per_hour": od_h, "spot_usd_per_hour": sp_h,
                "usd_per_1m_output_tokens": usd_per_1m(od_h, out_tps),
                "usd_per_1m_input_tokens": usd_per_1m(od_h, in_tps),
                "spot_usd_per_1m_output_tokens": usd_per_1m(sp_h, out_tps),
                "corpus_usd": od_h * hours, "corpus_spot_usd": sp_h * hours if sp_h is not None else None,
                "speedup": c.get("speedup"), "exact_match": c.get("exact_match"),
                "predicted_tokens_per_s": loo, "prediction_error": (loo / tps(c) - 1) if loo else None,
                "price_source": p.source, "price_as_of": p.as_of, "note": c.get("note", ""),
            })
    return rows


COLUMNS = [("cell", pa.string()), ("mode", pa.string()), ("instance", pa.string()), ("accelerator", pa.string()),
           ("unit", pa.string()), ("units", pa.int64()), ("concurrency", pa.int64()), ("width", pa.int64()),
           ("drafter", pa.string()), ("dtype", pa.string()), ("kernels", pa.string()), ("rows", pa.int64()),
           ("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("wall_seconds", pa.float64()),
           ("startup_seconds", pa.float64()), ("steady_seconds", pa.float64()), ("tokens_per_s", pa.float64()),
           ("startup_idle_share", pa.float64()), ("corpus_rows", pa.int64()), ("corpus_input_tokens", pa.int64()),
           ("corpus_output_tokens", pa.int64()), ("corpus_tokens_per_s", pa.float64()),
           ("corpus_tokens_per_s_per_unit", pa.float64()), ("corpus_hours", pa.float64()),
           ("corpus_startup_idle_share", pa.float64()), ("usd_per_hour", pa.float64()),
           ("spot_usd_per_hour", pa.float64()), ("usd_per_1m_output_tokens", pa.float64()),
           ("usd_per_1m_input_tokens", pa.float64()), ("spot_usd_per_1m_output_tokens", pa.float64()),
           ("corpus_usd", pa.float64()), ("corpus_spot_usd", pa.float64()), ("speedup", pa.float64()),
           ("exact_match", pa.float64()), ("predicted_tokens_per_s", pa.float64()),
           ("prediction_error", pa.float64()), ("price_source", pa.string()), ("price_as_of", pa.string()),
           ("note", pa.string())]
COST_SCHEMA = pa.schema(COLUMNS)


def cost_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=COST_SCHEMA)


# ---- the recommendation, the table, the plot ---------------------------------------------------------
def _usd(r: dict, pricing: str) -> float | None:
    return r["corpus_usd"] if pricing == "on_demand" else r["corpus_spot_usd"]


def _cheapest(rows: list[dict], pricing: str, tie: float = 0.01) -> dict:
    """The cheapest row; among rows within ``tie`` (1%) of its cost, the fastest."""
    low = min(_usd(r, pricing) for r in rows)
    return min((r for r in rows if _usd(r, pricing) <= low * (1 + tie)), key=lambda r: r["corpus_hours"])


def recommend(rows: list[dict], deadline_hours: float | None, pricing: str) -> str:
    ok = [r for r in rows if _usd(r, pricing) is not None and (r["exact_match"] is None or r["exact_match"] >= 1.0)]
    if not ok:
        return f"no cell has a {pricing} price"
    what = f"{pricing.replace('_', '-')} prices"
    corpus = f"{ok[0]['corpus_rows']:,} rows"
    if deadline_hours is not None:
        meet = [r for r in ok if r["corpus_hours"] <= deadline_hours]
        if not meet:
            f = min(ok, key=lambda r: r["corpus_hours"])
            return (f"no cell finishes the corpus ({corpus}) within {deadline_hours:g} h; the fastest is {f['cell']} on "
                    f"{f['instance']} ({f['mode']}): {f['corpus_hours']:.2f} h, ${_usd(f, pricing):,.4g} at {what}")
        best = _cheapest(meet, pricing)
        cond = f"finishing within {deadline_hours:g} h"
    else:
        best = _cheapest(ok, pricing)
        cond = "(no deadline_hours given)"
    return (f"cheapest {cond}: {best['cell']} on {best['instance']} ({best['mode']}): {best['corpus_hours']:.2f} h and "
            f"${_usd(best, pricing):,.4g} for the corpus ({corpus}) at {what}, "
            f"${best['usd_per_1m_output_tokens']:.4g} per 1M output tokens")


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    head = ["cell", "mode", "instance", "units", "sample tok/s", "pred. (err)", "speedup", "exact", "start-up s",
            "corpus tok/s", "per unit", "$/h", "$/1M out", "$/1M in", "corpus h", "corpus $", "spot $", "idle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["mode"] != "measured", r["accelerator"], r["concurrency"], r["width"],
                                         r["drafter"], r["instance"])):
        err = (f"{r['predicted_tokens_per_s']:.1f} ({r['prediction_error']:+.0%})"
               if r["predicted_tokens_per_s"] is not None else "-")
        lines.append("| " + " | ".join([
            r["cell"], r["mode"], r["instance"], f"{r['units']} {r['unit']}", f"{r['tokens_per_s']:.1f}", err,
            _f(r["speedup"], ".2f"), "ref" if r["drafter"] == "none" and r["mode"] == "measured"
            else _f(r["exact_match"], ".2f"), f"{r['startup_seconds']:.1f}", f"{r['corpus_tokens_per_s']:.1f}",
            f"{r['corpus_tokens_per_s_per_unit']:.1f}", _f(r["usd_per_hour"], ".4g"),
            _f(r["usd_per_1m_output_tokens"], ".4g"), _f(r["usd_per_1m_input_tokens"], ".4g"),
            f"{r['corpus_hours']:.3g}", _f(r["corpus_usd"], ",.4g"), _f(r["corpus_spot_usd"], ",.4g"),
            f"{r['corpus_startup_idle_share']:.0%}"]) + " |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: str, pricing: str, deadline_hours: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if _usd(r, pricing) is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    insts = sorted({r["instance"] for r in pts})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(insts)}
    for r in pts:
        measured = r["mode"] == "measured"
        ax.scatter(r["corpus_hours"], _usd(r, pricing), s=46, marker="o" if measured else "D",
                   facecolors=colors[r["instance"]] if measured else "none", edgecolors=colors[r["instance"]])
    front, best = [], math.inf
    for r in sorted(pts, key=lambda r: (r["corpus_hours"], _usd(r, pricing))):
        if _usd(r, pricing) < best:
            best = _usd(r, pricing)
            front.append(r)
    ax.plot([r["corpus_hours"] for r in front], [_usd(r, pricing) for r in front], "k--", lw=0.8, label="Pareto front")
    for i, r in enumerate(front):
        ax.annotate(f"{r['cell']}\n{r['instance']}", (r["corpus_hours"], _usd(r, pricing)), fontsize=6,
                    xytext=(4, 6 + 16 * (i % 3)), textcoords="offset points")
    if deadline_hours is not None:
        ax.axvline(deadline_hours, color="red", lw=0.8, label=f"deadline {deadline_hours:g} h")
    for n in insts:
        ax.scatter([], [], color=colors[n], label=n)
    ax.scatter([], [], facecolors="none", edgecolors="gray", marker="D", label="predicted (hollow)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("projected hours for the corpus")
    ax.set_ylabel(f"projected $ for the corpus ({pricing.replace('_', '-')})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
