"""``python -m conflayers.calibrate``: measure the cost surface on this device, print it, draw it.

Times a forward of ``q`` new tokens at each batch width ``w`` (and a half-layer draft pass) on a
synthetic cache, prints the table (ms, cost relative to a plain step, tokens/s), writes a heatmap
PNG of the verify cost ``S(w, q) / S(w, 1)`` with the acceptance a chain draft of ``q - 1`` tokens
needs to break even, and caches the surface where ``drafter: auto`` finds it
(``conflayers.costs.load_or_calibrate``).

    python -m conflayers.calibrate --out docs/benchmarks/costs/heatmap.png
"""

from __future__ import annotations

import argparse
import sys

from .costs import DEFAULT_QS, DEFAULT_WIDTHS, CostSurface, expected_tokens, load_or_calibrate
from .kernels import KERNELS
from .models import BUNDLED, load_model


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
    p = argparse.ArgumentParser(prog="python -m conflayers.calibrate", description=__doc__,
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

        from .engine import Engine

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
