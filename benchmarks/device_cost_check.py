"""Cost surface of a device, and the plain-decoding forecast checked against the engine on it.

    python benchmarks/device_cost_check.py --config-dir DIR --lengths lengths.json --out OUTDIR

For a device where the project's full stack (Ray) is not installed, e.g. a lent GPU box: builds the
model of ``DIR/config.json`` with random weights (a step's cost depends on shapes, not weights:
the bundled SmolLM2's 98 MB GGUF need not travel), calibrates the cost surface in each dtype
(``OUTDIR/surfaces.json``, the file ``jobs.cost``'s ``predict.surfaces`` reads), then streams rows
of the given (prompt tokens, generated tokens) lengths through ``Engine.stream`` at several widths
with stop tokens off (each row generates exactly its length) and compares the measured seconds
with ``conflayers.costs.forecast.stream_seconds`` on the surface just measured (``OUTDIR/check.json``;
the ratio measured/forecast per width is stored with the surface as ``stream_ratio``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conflayers import Engine, GenerationConfig, Request  # noqa: E402
from conflayers.costs.calibrate import calibrate  # noqa: E402
from conflayers.costs.forecast import stream_seconds  # noqa: E402
from conflayers.costs.surface import DEFAULT_QS  # noqa: E402
from conflayers.costs.width import device_name  # noqa: E402


def build(config_dir: str, dtype: str, device: str, name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.name_or_path = name
    return model.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stream_check(engine, surface, lengths: list[tuple[int, int]], width: int, n_rows: int, device: str) -> dict:
    """Stream ``n_rows`` random-token rows of the given (prompt, generated) lengths through ``engine`` at
    ``width`` (stop tokens off: each row generates exactly its length, after a width-8 warm-up) and
    compare the seconds with ``conflayers.costs.forecast.stream_seconds`` on ``surface``; prints a line."""
    rows = [lengths[j % len(lengths)] for j in range(n_rows)]
    g = torch.Generator().manual_seed(0)
    reqs = [Request(torch.randint(3, engine.vocab, (p_,), generator=g).tolist(), n) for p_, n in rows]
    gc = GenerationConfig(max_new_tokens=max(n for _, n in rows), stop_token_ids=())
    list(engine.stream(reqs[:8], gc, max_batch=8))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = list(engine.stream(sorted(reqs, key=lambda r: len(r.token_ids)), gc, max_batch=width))
    sync(device)
    secs = time.perf_counter() - t0
    toks = sum(r.stats.new_tokens for _, r in out)
    want = sum(n for _, n in rows)
    fc = stream_seconds(surface, rows, width)
    pred = fc.seconds
    ls = engine.last_stream
    print(f"check {engine.steps} steps, width {width}: {toks} tokens (expected {want}) in {secs:.2f} s = "
          f"{toks / secs:.0f} tok/s; forecast {pred:.2f} s = {want / pred:.0f} tok/s ({pred / secs - 1:+.1%}); prefill "
          f"{ls['prefill_seconds']:.2f} s (forecast {fc.prefill_seconds:.2f}), decode {ls['decode_seconds']:.2f} s over "
          f"{ls['steps']} steps (forecast {fc.decode_seconds:.2f} over {fc.steps}); decode time in draft "
          f"{ls['draft_seconds']:.2f}, verify {ls['verify_seconds']:.2f}, sync {ls['sync_seconds']:.2f}, rows "
          f"{ls['rows_seconds']:.2f}, move {ls['move_seconds']:.2f}", flush=True)
    return {"width": width, "rows": len(rows), "tokens": toks, "expected_tokens": want,
            "measured_s": secs, "predicted_s": pred, "measured_tok_s": toks / secs,
            "predicted_tok_s": want / pred, "error": pred / secs - 1,
            "measured_prefill_s": ls["prefill_seconds"], "measured_decode_s": ls["decode_seconds"],
            "measured_steps": ls["steps"], "predicted_prefill_s": fc.prefill_seconds,
            "predicted_decode_s": fc.decode_seconds, "predicted_steps": fc.steps,
            **{f"measured_{part}_s": ls[f"{part}_seconds"] for part in ("draft", "verify", "sync", "rows", "move")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", required=True)
    p.add_argument("--name", default="smollm2-135m-instruct (random weights)")
    p.add_argument("--lengths", required=True, help="JSON list of [prompt tokens, generated tokens]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--widths", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--check-widths", default="64,256")
    p.add_argument("--check-rows", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lengths = [tuple(x) for x in json.load(open(args.lengths))]
    ctx = sorted(a for a, _ in lengths)[len(lengths) // 2] + sorted(b for _, b in lengths)[len(lengths) // 2] // 2
    widths = [int(w) for w in args.widths.split(",")]
    surfaces, checks = {}, []
    print(f"device {device_name(torch.device(args.device))}, torch {torch.__version__}, context {ctx}", flush=True)
    for i, dtype in enumerate(args.dtypes.split(",")):
        model = build(args.config_dir, dtype, args.device, args.name)
        engine = Engine(model)
        t0 = time.perf_counter()
        s = calibrate(engine, widths, DEFAULT_QS, context=ctx)
        surfaces[s.key] = s.as_dict()
        print(f"\n# {dtype}: calibrated in {time.perf_counter() - t0:.1f} s, prefill {s.prefill_fixed * 1e3:.2f} ms + "
              f"{s.prefill * 1e6:.2f} us/token, loop {s.step_overhead * 1e3:.2f} ms/step + {s.row_overhead * 1e6:.1f} us/row\n"
              f"{s.text_table()}", flush=True)
        if i:  # the engine check runs in the first dtype only
            continue
        for w in [int(x) for x in args.check_widths.split(",")]:
            checks.append({"dtype": dtype, **stream_check(engine, s, lengths, w, args.check_rows, args.device)})
        # what the engine's streams measured against the forecast, per width: jobs.cost uses it as the
        # ratio of predicted cells on this device when no pipeline cell was measured on it
        surfaces[s.key]["stream_ratio"] = {str(c["width"]): c["measured_s"] / c["predicted_s"]
                                           for c in checks if c["dtype"] == dtype}
        del engine, model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "surfaces.json"), "w") as f:
        json.dump(surfaces, f, indent=1)
    with open(os.path.join(args.out, "check.json"), "w") as f:
        json.dump({"device": device_name(torch.device(args.device)), "torch": torch.__version__, "context": ctx,
                   "checks": checks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
