"""``python -m conflayers.search.plot``: a PNG of one ConfLayers proposal for a model and prompts.

Each prompt is decoded plainly (greedy, ``--max-new-tokens``), the confidence pass (§3) runs
over prompt + output with the last ``--window`` tokens scored, and the per-layer confidences are
averaged over prompts. The plot shows the standardised confidence curve ``z``, the local
thresholds ``t_k``, the window sizes ``w_k`` and the skip set the rule (§4) chooses at ``--lam``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .confidence import SkipRule, layer_confidences, skip_rule


def confidence_curve(model, prompt_ids: list[list[int]], max_new_tokens: int, window: int) -> np.ndarray:
    """Mean layer confidences (layers 1 … L-2) over the prompts' plain greedy continuations."""
    from ..engine import Engine, GenerationConfig

    engine = Engine(model)
    results = engine.generate(prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens))
    curves = [
        layer_confidences(model, ids + r.token_ids, min(window, max(1, len(r.token_ids))))
        for ids, r in zip(prompt_ids, results)
    ]
    return np.mean(curves, axis=0)


def render(c: np.ndarray, rule: SkipRule, out: str, title: str = "") -> None:
    """Save the plot of one proposal to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, len(c) + 1)
    fig, (ax, axw) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(layers, rule.z, "o-", label="confidence z (standardised)")
    ax.plot(layers, rule.thresholds, "s--", label="local threshold t_k")
    skip = sorted(rule.layers)
    if skip:
        ax.scatter(skip, rule.z[np.array(skip) - 1], s=160, facecolors="none", edgecolors="red", linewidths=2,
                   label=f"skipped ({len(skip)}): {skip}")
    ax2 = ax.twinx()
    ax2.plot(layers, c, ":", color="grey", label="raw confidence c")
    ax2.set_ylabel("c = conf(attn) + conf(mlp)")
    ax.set_ylabel("z")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "ConfLayers: layer confidence and skip set")
    axw.bar(layers, rule.windows, color="tab:green")
    axw.set_ylabel("window w_k")
    axw.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from ..cli import DEMO_PROMPTS, read_prompts_file
    from ..models import BUNDLED, encode_prompts, load_model

    p = argparse.ArgumentParser(prog="python -m conflayers.search.plot", description=__doc__)
    p.add_argument("--prompts-file", help='JSONL, one {"prompt": ...} a line (default: the demo prompts)')
    p.add_argument("--model", default=BUNDLED)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--window", type=int, default=100, help="generated tokens scored per prompt (W)")
    p.add_argument("--lam", type=float, default=0.0, help="λ of the skip rule")
    p.add_argument("--limit", type=int, default=8, help="use at most this many prompts")
    p.add_argument("--out", default="conf.png")
    args = p.parse_args(argv)
    prompts = (read_prompts_file(args.prompts_file) if args.prompts_file else DEMO_PROMPTS)[: args.limit]
    try:
        model, tok = load_model(args.model, args.dtype, args.device)
        ids = encode_prompts(tok, prompts)
        c = confidence_curve(model, ids, args.max_new_tokens, args.window)
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rule = skip_rule(c, args.lam, len(c) + 2)
    render(c, rule, args.out, f"{args.model}: {len(prompts)} prompts, λ={args.lam}")
    print(json.dumps({"out": args.out, "skip_set": sorted(rule.layers), "confidence": [round(float(x), 6) for x in c],
                      "windows": rule.windows.tolist(), "thresholds": [round(float(x), 6) for x in rule.thresholds]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
