"""``python -m conflayers.costs.calibrate``: measure the cost surface on this device, print it, draw it.

Times a forward of ``q`` new tokens at each batch width ``w`` (and a half-layer draft pass) on a
synthetic cache, prints the table (ms, cost relative to a plain step, tokens/s), writes a heatmap
PNG of the verify cost ``S(w, q) / S(w, 1)`` with the acceptance a chain draft of ``q - 1`` tokens
needs to break even, and caches the surface where ``drafter: auto`` finds it
(``load_or_calibrate``).

    python -m conflayers.costs.calibrate --out docs/benchmarks/costs/heatmap.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ..kernels import KERNELS
from ..kv import KVState
from ..layers import skip_layers
from ..models import BUNDLED, load_model
from .forecast import stream_seconds
from .surface import DEFAULT_QS, DEFAULT_WIDTHS, WIDE, CostSurface, expected_tokens, surface_key, timed_qs
from .width import _read_cache, _write_cache, default_cache_file


def _time_cells(kv: KVState, step, cells: list[tuple[str, int]], model, half, reps: int, cuda: bool) -> dict:
    """Min seconds per cell (``("full"|"half", q)``) over ``reps`` rounds after a warm-up round; the cells
    are interleaved in a rotated order, so a slow spell of a shared machine hits them all alike."""
    times: dict = {c: [] for c in cells}
    for rep in range(reps + 1):
        shift = rep % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            kind, q = cell
            tokens = torch.ones(kv.n, q, dtype=torch.long, device=kv.device)
            with skip_layers(model, half if kind == "half" else ()):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                (kv.forward if kind == "half" else step)(tokens)  # a draft pass always runs dynamically
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            kv.rollback()
            if rep:
                times[cell].append(dt)
    return {c: min(t) for c, t in times.items()}  # other load on a shared machine only adds time


@torch.inference_mode()
def calibrate(engine, widths=DEFAULT_WIDTHS, qs=DEFAULT_QS, context: int = 256, reps: int = 3) -> CostSurface:
    """Measure the surface on ``engine``'s device (a synthetic cache: the cost does not depend on what it holds)."""
    widths, qs = sorted({int(w) for w in widths}), sorted({int(q) for q in qs} | {1})
    if not widths or widths[0] < 1 or qs[0] < 1:
        raise ValueError(f"widths and qs must be integers >= 1, got {widths} and {qs}")
    cuda = engine.device.type == "cuda"
    L = engine.n_layers
    half = frozenset(range(1, L, 2))  # every other layer: a typical ConfLayers skip ratio
    table, fixed = {}, {}
    for w in widths:
        kv, step = engine.step_cache(w, columns=context + max(qs) + 8, context=context)  # the engine's verify steps
        cells = [("full", q) for q in timed_qs(w, qs)] + ([("half", 1)] if half else [])
        t = _time_cells(kv, step, cells, engine.model, half, reps if w < WIDE else min(reps, 2), cuda)
        table[w] = {q: t[("full", q)] for q in timed_qs(w, qs)}
        if half:
            run = (L - len(half)) / L  # share of the layers the half pass runs
            # t_half = t_full * (f + (1 - f) * run)  =>  f = (t_half / t_full - run) / (1 - run)
            fixed[w] = min(1.0, max(0.0, (t[("half", 1)] / table[w][1] - run) / (1 - run)))
    # prefill forward = fixed + per token x tokens, from a small and a large one
    small, large = _time_prefill(engine, reps, cuda, 1, 16), _time_prefill(engine, reps, cuda, 4, 128)
    per_token = max(1e-12, (large - small) / (4 * 128 - 16))
    s = CostSurface(table, L, fixed, context=context, key=surface_key(engine), prefill=per_token,
                    prefill_fixed=max(0.0, small - 16 * per_token), device=engine.device.type,
                    bucketed=getattr(engine, "steps", "dynamic") != "dynamic")
    # the loop's own cost per step: a + b x rows, from short plain streams at two widths
    w1, w2 = min(2, widths[-1]), min(16, widths[-1])
    o1 = _time_stream_overhead(engine, s, w1, cuda)
    o2 = _time_stream_overhead(engine, s, w2, cuda) if w2 > w1 else o1
    s.row_overhead = max(0.0, (o2 - o1) / (w2 - w1)) if w2 > w1 else 0.0
    s.step_overhead = max(0.0, o1 - s.row_overhead * w1)
    return s


def _time_prefill(engine, reps: int, cuda: bool, rows: int, tokens: int) -> float:
    """Seconds of a prefill forward (``rows`` x ``tokens`` new tokens on an empty cache, logits at the
    last column only, as the engine prefills), min over ``reps`` after a warm-up."""
    kv = KVState(engine.model, slots=rows, columns=tokens + 8)
    ids = torch.ones(rows, tokens, dtype=torch.long, device=engine.device)
    zeros = torch.zeros(rows, dtype=torch.long, device=engine.device)
    best = math.inf
    for rep in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        kv.forward(ids, logits_to_keep=1, rows=(0, rows), offsets=zeros)
        if cuda:
            torch.cuda.synchronize()
        if rep:
            best = min(best, time.perf_counter() - t0)
    return best


def _time_stream_overhead(engine, surface: CostSurface, rows: int, cuda: bool, new: int = 16, prompt: int = 32) -> float:
    """Seconds per decode step that ``Engine.stream`` spends beyond its forwards (drafting, acceptance,
    per-row bookkeeping) at ``rows`` rows: a short plain stream against the surface's forecast of
    its forwards (min of 2 after a warm-up)."""
    from ..engine import GenerationConfig, Request

    reqs = [Request([1] * prompt, new) for _ in range(rows)]
    gc = GenerationConfig(max_new_tokens=new, stop_token_ids=())
    best = math.inf
    for rep in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in engine.stream(reqs, gc, max_batch=rows):
            pass
        if cuda:
            torch.cuda.synchronize()
        if rep:
            best = min(best, time.perf_counter() - t0)
    bare = CostSurface(surface.table, surface.n_layers, surface.fixed, prefill=surface.prefill,
                       prefill_fixed=surface.prefill_fixed, bucketed=surface.bucketed)
    return max(0.0, (best - stream_seconds(bare, [(prompt, new)] * rows, rows).seconds) / (new - 1))


def load_or_calibrate(engine, widths=DEFAULT_WIDTHS, qs=DEFAULT_QS, context: int = 256,
                      cache_file: str | Path | None = None, fresh: bool = False) -> tuple[CostSurface, bool]:
    """The cached surface for this model x device x dtype x kernels x threads if it covers ``widths``
    and ``qs`` (and not ``fresh``), else a new calibration (cached). Returns (surface, came from the cache)."""
    path = Path(cache_file) if cache_file else default_cache_file().with_name("costs.json")
    key = surface_key(engine)
    raw = None if fresh else _read_cache(path).get(key)
    if raw:
        try:
            s = CostSurface.from_dict(raw)
            if s.covers(widths, qs):
                return s, True
        except ValueError:
            pass
    s = calibrate(engine, widths, qs, context)
    _write_cache(path, key, s.as_dict())
    return s, False


def break_even_alpha(cost_ratio: float, k: int) -> float | None:
    """The per-token acceptance at which a k-token draft that costs nothing to make pays for a verify
    that costs ``cost_ratio`` plain steps (None: not even at acceptance 1)."""
    if expected_tokens(1.0, k) < cost_ratio:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < cost_ratio else (lo, mid)
    return hi


def heatmap(surface: CostSurface, out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ws = surface.widths
    qs = sorted({q for row in surface.table.values() for q in row})
    ratio = np.array([[surface.table[w][q] / surface.table[w][1] if q in surface.table[w] else np.nan for q in qs]
                      for w in ws])
    fig, ax = plt.subplots(figsize=(1.3 * len(qs) + 2, 0.6 * len(ws) + 1.8))
    im = ax.imshow(ratio, cmap="viridis", aspect="auto", origin="lower")
    for i, w in enumerate(ws):
        for j, q in enumerate(qs):
            if np.isnan(ratio[i, j]):
                continue
            be = break_even_alpha(ratio[i, j], q - 1) if q > 1 else None
            label = f"{ratio[i, j]:.2f}x" + ("" if q == 1 else f"\nα≥{be:.2f}" if be is not None else "\nnever")
            ax.text(j, i, label, ha="center", va="center", fontsize=8,
                    color="white" if ratio[i, j] < np.nanmax(ratio) * 0.6 else "black")
    ax.set_xticks(range(len(qs)), [str(q) for q in qs])
    ax.set_yticks(range(len(ws)), [f"{w}  ({w / surface.table[w][1]:.0f} tok/s)" for w in ws])
    ax.set_xlabel("query width q (verify of q-1 drafted tokens)")
    ax.set_ylabel("batch width w (plain decode tok/s)")
    ax.set_title(title or "verify cost S(w,q)/S(w,1); α = acceptance a free draft needs to break even", fontsize=9)
    fig.colorbar(im, ax=ax, label="cost relative to a plain step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conflayers.costs.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernels", choices=KERNELS, default="auto")
    p.add_argument("--widths", type=parse_ints, default=list(DEFAULT_WIDTHS))
    p.add_argument("--qs", type=parse_ints, default=list(DEFAULT_QS))
    p.add_argument("--context", type=int, default=256, help="cached tokens per row while timing")
    p.add_argument("--cache", help="surface cache JSON (default $CONFLAYERS_CACHE/costs.json or ~/.cache/conflayers)")
    p.add_argument("--fresh", action="store_true", help="measure even when the cache holds this surface")
    p.add_argument("--out", help="heatmap PNG path")
    args = p.parse_args(argv)
    try:
        import torch

        from ..engine import Engine

        model, _ = load_model(args.model, args.dtype, args.device)
        engine = Engine(model, args.kernels)
        surface, cached = load_or_calibrate(engine, args.widths, args.qs, args.context, args.cache, args.fresh)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# cost surface: {surface.key} ({'from the cache' if cached else 'measured now'}, "
          f"context {surface.context} tokens, {torch.get_num_threads()} threads)\n")
    print(surface.text_table())
    if args.out:
        heatmap(surface, args.out, f"{args.model} {args.dtype} on {surface.key.split('|')[4]}, kernels {engine.kernel_plan.name}")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
