"""Compiled steps against eager ones on the bundled SmolLM2 (float32): step ms, compile seconds, tokens/s.

1. **Compile seconds**, cold (an empty inductor cache) and warm (a second process on the same cache),
   each in a fresh subprocess: what an actor's start pays (``Engine.use_compiled``: the four step
   variants, rows 1 / several x q 1 / several, and the check against eager).
2. **Step ms**: one engine forward of q new tokens per row (q = 1 is a plain decode step, q = k + 1 a
   verify of k drafts) at width w after a ~200-token context, on the same cache, three ways: eager on
   the oneDNN plan (the eager CPU default), eager on PyTorch's native linears, compiled (oneDNN plan:
   the compiled layers call the packed kernels).
   The three alternate per repetition, order rotated; the minimum of the repetitions is kept.
3. **Plain decoding end to end** at widths 1 and 8 (greedy, fixed length, the same prompts): this
   engine eager (oneDNN), compiled, and transformers' own ``generate`` with a static cache, eager and
   under ``torch.compile`` (``--hf``; its whole-model compile is minutes on 2 cores, so off by default).

    python benchmarks/compile_bench.py [--out docs/benchmarks/compile] [--widths 1,2,4,8,16,32,64,128] [--hf]
    python benchmarks/compile_bench.py --only-compile-seconds --out docs/benchmarks/compile   # cold, warm, warm

Writes ``table.md``, ``results.json`` and ``steps.png`` under ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from engine_bench import hf_generate, load_prompts, table  # noqa: E402  (run as a script from benchmarks/)

from conflayers import Engine, GenerationConfig
from conflayers.costs.width import device_name
from conflayers.models import encode_prompts, load_model

MODES = ("eager onednn", "eager native", "compiled")


def compile_seconds(cache: str) -> float:
    """Seconds of ``Engine.use_compiled`` in a fresh process on inductor cache ``cache``."""
    code = ("import time, torch; from conflayers import Engine; from conflayers.models import load_model;"
            f"torch.set_num_threads({torch.get_num_threads()});"
            "m, _ = load_model(); e = Engine(m, compile='off'); t = time.perf_counter(); ok = e.use_compiled();"
            "print('SECONDS', time.perf_counter() - t if ok else -1)")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    for line in out.stdout.splitlines():
        if line.startswith("SECONDS"):
            return float(line.split()[1])
    raise RuntimeError(out.stderr[-2000:])


def set_mode(engine: Engine, mode: str) -> None:
    if mode == "compiled":  # on the oneDNN plan, compiled once (Engine keeps it across switches)
        engine.use_eager("onednn")
        if not engine.use_compiled():
            raise RuntimeError(f"compiled steps could not run: {engine.compile_error}")
    else:
        engine.use_eager(mode.split()[1])


def step_ms(engine: Engine, grid: list[tuple[int, int]], context: int, reps: int) -> dict:
    """{(w, q): {mode: ms}}, the modes alternating per repetition in a rotating order."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for w in sorted({w for w, _ in grid}):
        qs = [q for ww, q in grid if ww == w]
        prompts = torch.randint(100, 40000, (w, context), generator=g).tolist()
        times = {(q, m): [] for q in qs for m in MODES}
        for rep in range(reps + 1):  # rep 0 warms up
            order = MODES[rep % 3:] + MODES[: rep % 3]
            for mode in order:
                set_mode(engine, mode)
                with torch.inference_mode():
                    kv, _ = engine.prefill(prompts)
                    step = engine.verify_step(kv)
                    for q in qs:
                        tokens = torch.randint(100, 40000, (w, q), generator=g)
                        t0 = time.perf_counter()
                        step(tokens)
                        dt = time.perf_counter() - t0
                        kv.rollback()
                        if rep:
                            times[(q, mode)].append(dt)
        for q in qs:
            out[(w, q)] = {m: min(times[(q, m)]) * 1e3 for m in MODES}
            print(f"w={w:3d} q={q}: " + "  ".join(f"{m} {v:7.1f} ms" for m, v in out[(w, q)].items()), flush=True)
    return out


def decode_tps(engine: Engine, model, tok, prompts: list[str], width: int, n: int, hf: bool) -> dict:
    """Plain decoding tokens/s at ``width`` rows: the engine eager and compiled, transformers' generate."""
    ids = encode_prompts(tok, prompts[:width])
    cfg = GenerationConfig(max_new_tokens=n, stop_token_ids=())
    res, outs = {}, {}
    runs = ["eager onednn", "compiled"] + (["hf static", "hf compiled"] if hf else [])
    for mode in runs:
        if mode.startswith("hf"):
            engine.use_eager("native")
            model.generation_config.cache_implementation = "static"
            if mode == "hf compiled":
                model.forward = torch.compile(model.forward, mode="default", dynamic=False)
                hf_generate(model, ids, n)  # compiles
            t0 = time.perf_counter()
            outs[mode] = hf_generate(model, ids, n)
            res[mode] = width * n / (time.perf_counter() - t0)
            model.__dict__.pop("forward", None)
            model.generation_config.cache_implementation = None
            continue
        set_mode(engine, mode)
        engine.generate(ids, GenerationConfig(max_new_tokens=4, stop_token_ids=()), max_batch=width)  # warm
        t0 = time.perf_counter()
        outs[mode] = [r.token_ids for r in engine.generate(ids, cfg, max_batch=width)]
        res[mode] = width * n / (time.perf_counter() - t0)
    same = {m: outs[m] == outs["eager onednn"] for m in outs}
    print(f"width {width}: " + "  ".join(f"{m} {v:.1f} tok/s" for m, v in res.items()) + f"  same output: {same}",
          flush=True)
    return {"tokens_per_s": res, "same_output": same}


def plot(steps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = sorted({q for _, q in steps})
    fig, axes = plt.subplots(1, len(qs), figsize=(4.2 * len(qs), 3.6), squeeze=False)
    for ax, q in zip(axes[0], qs):
        ws = sorted(w for w, qq in steps if qq == q)
        for m in MODES:
            ax.plot(ws, [steps[(w, q)][m] for w in ws], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"q = {q} ({'plain step' if q == 1 else f'verify of {q - 1} drafts'})")
        ax.set_xlabel("rows in flight (width)")
        ax.set_ylabel("ms per step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("SmolLM2-135M float32, one step after a 200-token context: eager vs compiled")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--qs", default="2,4,5,8", help="verify lengths measured at widths 1, 8, 32")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--hf", action="store_true", help="also transformers' generate, eager and compiled (slow)")
    ap.add_argument("--no-compile-seconds", action="store_true")
    ap.add_argument("--only-compile-seconds", action="store_true",
                    help="measure compile seconds (cold, warm, warm) only; written to compile_seconds.json under --out")
    ap.add_argument("--out", help="directory for table.md, results.json and steps.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    grid = [(w, 1) for w in widths] + [(w, int(q)) for w in (1, 8, 32) if w in widths for q in args.qs.split(",")]

    results = {"command": "python benchmarks/compile_bench.py " + shlex.join(sys.argv[1:]),
               "machine": f"{device_name(torch.device('cpu'))}, {os.cpu_count()} cores, {args.threads} torch threads",
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    if args.only_compile_seconds:
        with tempfile.TemporaryDirectory() as cache:
            results["compile_seconds"] = {"cold": compile_seconds(cache), "warm": [compile_seconds(cache) for _ in range(2)]}
        print("compile seconds:", results["compile_seconds"], flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "compile_seconds.json").write_text(json.dumps(results, indent=1))
        return
    if not args.no_compile_seconds:
        with tempfile.TemporaryDirectory() as cache:
            results["compile_seconds"] = {"cold": compile_seconds(cache), "warm": compile_seconds(cache)}
        print("compile seconds:", results["compile_seconds"], flush=True)
    model, tok = load_model()
    engine = Engine(model, compile="off")
    steps = step_ms(engine, grid, args.context, args.reps)
    results["step_ms"] = {f"{w}x{q}": v for (w, q), v in steps.items()}
    prompts = load_prompts(8)
    results["decode"] = {w: decode_tps(engine, model, tok, prompts, w, args.decode_tokens, args.hf) for w in (1, 8)}

    rows = [[w, q] + [f"{steps[(w, q)][m]:.1f}" for m in MODES]
            + [f"{steps[(w, q)]['eager onednn'] / steps[(w, q)]['compiled']:.2f}x",
               f"{min(steps[(w, q)]['eager onednn'], steps[(w, q)]['eager native']) / steps[(w, q)]['compiled']:.2f}x"]
            for (w, q) in sorted(steps)]
    head = ["width", "q", *(f"{m} ms" for m in MODES), "compiled vs onednn", "compiled vs best eager"]
    out = ["# Compiled steps vs eager (SmolLM2-135M-Instruct, float32)\n",
           f"`{results['command']}` ({results['date']}, {results['machine']}, torch {results['torch']}).\n"]
    if "compile_seconds" in results:
        c = results["compile_seconds"]
        out.append(f"Compile (the four step variants and the check against eager, one actor start): "
                   f"{c['cold']:.1f} s cold, {c['warm']:.1f} s warm (inductor's on-disk cache).\n")
    out += ["One forward of q new tokens per row after a ~200-token context; minimum of "
            f"{args.reps} repetitions, the three alternating in rotated order.\n", table(head, rows), ""]
    dec_head = ["width"] + list(results["decode"][1]["tokens_per_s"]) + ["outputs identical"]
    dec_rows = [[w] + [f"{v:.1f}" for v in d["tokens_per_s"].values()]
                + [", ".join(m for m, s in d["same_output"].items() if s and m != "eager onednn") or "-"]
                for w, d in results["decode"].items()]
    out += [f"\nPlain decoding, {args.decode_tokens} new tokens a row, greedy (tokens/s):\n", table(dec_head, dec_rows)]
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "table.md").write_text(text)
        (d / "results.json").write_text(json.dumps(results, indent=1, default=str))
        plot(steps, d / "steps.png")


if __name__ == "__main__":
    main()
