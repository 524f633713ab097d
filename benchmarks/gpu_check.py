"""The GPU device check: one command, no downloads, results in ``OUT/results.json`` and ``OUT/table.md``.

    python benchmarks/gpu_check.py --out OUT                                    # on one GPU (target: <= 8 min)
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check    # the same script on a CPU, small

Models are random-weight, built from configs this script writes (a step's cost depends on shapes, not
weights): SmolLM2-135M's shape and, on a GPU, a Llama-3-8B shape; bfloat16 on CUDA, float32 on a CPU.

(a) ``lossless``: tiny float32 models, greedy: dynamic steps == static steps == layer-skip and n-gram
    speculation, token for token, at widths 1 and 4.
(b) ``step_ms``: a verify/decode step's milliseconds per shape, step mode (``dynamic``: each step in its
    exact shape; ``static``: bucketed shapes, ``conflayers.steps``, run eagerly), width and q (tokens a
    row), min over rounds in rotated order, on a cache of ``--context`` tokens a row.
(c) ``stream_vs_forecast``: ``Engine.stream`` seconds over the forecast of the cost surface just
    calibrated (``conflayers.costs.forecast``), at widths 64 and 256 (SmolLM2 shape).
(d) ``job``: the generation job end to end on one actor (local Ray; the SmolLM2-shape model saved with a
    byte-level tokenizer trained on the prompts), its rows, error rows and tokens/s; skipped, with the
    reason, where Ray or the pipeline's dependencies are not installed.
(e) ``surfaces``: the cost surfaces ``jobs.cost`` reads (``predict.surfaces``), in ``OUT/surfaces.json``,
    with the stream check's measured/forecast ratio per width.
(f) ``profile``: one short stream under ``torch.profiler`` (``OUT/profile.txt``: ops by host and device
    time; kernel launches per decode step).

On a lent machine (PyTorch and transformers installed, no network, an older transformers than the
engine's ``cache=`` needs): download the wheel here, carry it, install it there first::

    pip download --no-deps transformers==5.24.0 -d .wheels      # here; .wheels/ in .git/info/exclude
    pip install -q --no-deps .wheels/transformers-5.24.0-py3-none-any.whl && \
        PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT/gpu    # there (carry: .wheels)

(d) needs Ray, whose wheel (79 MB) is over what travels to such a machine (64 MiB): it is skipped there.

``roofline_ratio_8b_w64`` is the 8B-shape decode step (q = 1, width 64, the faster mode) over the time
to read its weights once at the memory bandwidth measured here (a device-to-device copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from device_cost_check import stream_check, sync  # noqa: E402

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter, NgramDrafter, Request  # noqa: E402
from conflayers.costs.calibrate import calibrate  # noqa: E402
from conflayers.costs.surface import DEFAULT_QS  # noqa: E402
from conflayers.costs.width import device_name  # noqa: E402
from conflayers.steps import StaticSteps  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
MODES = ("dynamic", "static")


def build(shape: dict, dtype: torch.dtype, device: str, std: float = 0.02, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, initializer_range=std, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, where it runs: an 8B model never passes through float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: all of them except an untied input embedding (only the
    rows of the step's tokens are read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        total -= emb.numel() * emb.element_size()
    return total


def bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (bytes read + written), best of 5."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


# -- (a) --------------------------------------------------------------------------------------------------
def lossless(device: str) -> dict:
    tiny = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], [1], [9, 8, 7, 6, 5, 4, 3, 2, 1] * 2]
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    cases = {}
    for seed in (0, 1):
        model = build(tiny, torch.float32, device, std=0.2, seed=seed)  # peaked logits: no near-ties to flip
        ref = [r.token_ids for r in Engine(model).generate(prompts, cfg)]
        for mode in MODES:
            engine = Engine(model, steps=mode)
            for width in (1, 4):
                for name, drafter in (("plain", None), ("layerskip", LayerSkipDrafter(
                        model, FixedSkip([1, 3]), stop_threshold=0.0, max_draft_len=4)), ("ngram", NgramDrafter())):
                    out = [r.token_ids for r in engine.generate(prompts, cfg, drafter, max_batch=width)]
                    cases[f"seed {seed}, {mode}, width {width}, {name}"] = out == ref
    bad = [k for k, ok in cases.items() if not ok]
    print(f"(a) lossless: {len(cases) - len(bad)}/{len(cases)} cases equal plain greedy" +
          (f"; differ: {bad}" if bad else ""), flush=True)
    return {"lossless": not bad, "cases": cases}


# -- (b) --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def step_times(model, width: int, qs: list[int], context: int, reps: int, device: str) -> dict:
    """{mode: {q: ms}} of one verify/decode step over ``width`` rows of ``context`` cached tokens."""
    # the engine's kernel and attention plan, as in a stream; one cache both step modes run on
    kv, _ = Engine(model, steps="static").step_cache(width, columns=context + max(qs) + 8, context=context)
    fns = {"dynamic": kv.forward, "static": StaticSteps(kv).forward}
    cells = [(mode, q) for q in qs for mode in MODES]
    times = {c: float("inf") for c in cells}
    for rep in range(reps + 1):  # round 0 warms up (and sizes the static buffers)
        shift = rep % len(cells)
        for mode, q in cells[shift:] + cells[:shift]:
            tokens = torch.ones(width, q, dtype=torch.long, device=device)
            sync(device)
            t0 = time.perf_counter()
            fns[mode](tokens)
            sync(device)
            if rep:
                times[(mode, q)] = min(times[(mode, q)], time.perf_counter() - t0)
            kv.rollback()
    del kv
    return {mode: {q: times[(mode, q)] * 1e3 for q in qs} for mode in MODES}


def profile_stream(engine, lengths: list[tuple[int, int]], width: int, n_rows: int, device: str, path: str) -> dict:
    """One plain stream under ``torch.profiler``: the ops by host time (and by device time on CUDA) to
    ``path``, and the kernel launches a decode step makes (where a launch-bound step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    rows = [lengths[j % len(lengths)] for j in range(n_rows)]
    g = torch.Generator().manual_seed(1)
    reqs = [Request(torch.randint(3, engine.vocab, (p_,), generator=g).tolist(), n) for p_, n in rows]
    gc = GenerationConfig(max_new_tokens=max(n for _, n in rows), stop_token_ids=())
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        list(engine.stream(reqs, gc, max_batch=width))
        sync(device)
    ls = engine.last_stream
    ka = prof.key_averages()
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    with open(path, "w") as f:
        f.write(f"{engine.steps} steps, width {width}, {n_rows} rows, {ls['steps']} decode steps, "
                f"{launches} kernel launches\n\n# by host time\n{ka.table(sort_by='self_cpu_time_total', row_limit=30)}\n")
        if cuda:
            f.write(f"\n# by device time\n{ka.table(sort_by='self_cuda_time_total', row_limit=30)}\n")
    return {"steps": engine.steps, "width": width, "rows": n_rows, "decode_steps": ls["steps"],
            "kernel_launches": launches, "file": os.path.basename(path)}


# -- (d) --------------------------------------------------------------------------------------------------
def job_check(shape: dict, dtype: str, device: str, rows: int, max_tokens: int, width: str, workdir: str) -> dict:
    import importlib.util

    missing = [m for m in ("ray", "omegaconf", "pyarrow", "s3fs") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)} (the job needs them)"}
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jobs.generate import main as generate

    texts = [f"Summarize item {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7 % 50} parts, "
             f"shipped on day {i % 28 + 1}." for i in range(rows)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    model_dir = os.path.join(workdir, "model")
    model = build(shape, torch.float32, "cpu")
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    corpus = os.path.join(workdir, "corpus.jsonl")
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"id": f"r{i}", "prompt": t}) + "\n" for i, t in enumerate(texts))
    out = os.path.join(workdir, "job")
    t0 = time.perf_counter()
    rc = generate([f"model.source={model_dir}", f"model.dtype={dtype}", f"model.device={device}",
                   f"input.path={corpus}", f"output.path={out}", "generation.chat=false",
                   f"generation.max_tokens={max_tokens}", f"engine.max_batch={width}", "ray.concurrency=1",
                   "search.registry=null",
                   f"search.costs={os.path.join(workdir, 'costs.json')}", f"corpus_index.path={workdir}/corpus"])
    wall = time.perf_counter() - t0
    if rc != 0:
        return {"rows": 0, "errors": rows, "tokens_per_s": 0.0, "exit_code": rc, "wall_s": wall}
    m = {r["dataset"]: r for r in pq.read_table(os.path.join(out, "metrics.parquet")).to_pylist()}["__all__"]
    res = {"rows": m["rows_ok"] + m["rows_error"], "errors": m["rows_error"],
           "tokens_per_s": m["engine_tokens_per_s"], "job_tokens_per_s": m["job_tokens_per_s"],
           "generated_tokens": m["generated_tokens"], "wall_s": wall}
    print(f"(d) job: {res}", flush=True)
    return res


# -- the report -----------------------------------------------------------------------------------------
def table(res: dict) -> str:
    lines = [f"# GPU device check\n\n`{res['command']}`  \n{res['device']}, torch {res['torch']}, {res['date']}; "
             f"{res['dtype']}; cache {res['context']} tokens a row; memory bandwidth measured "
             f"{res['bandwidth_gb_s']:.0f} GB/s (copy); {res['seconds']:.0f} s in all."
             + (" --quick: the SmolLM2 shape cut to 4 layers, small widths (plumbing, not numbers).\n" if res["quick"] else "\n"),
             f"**(a) lossless**: {res['lossless']} ({sum(res['lossless_cases'].values())}/{len(res['lossless_cases'])}"
             " cases equal plain greedy: dynamic and static steps, plain / layer-skip / n-gram, widths 1 and 4).\n",
             "**(b) step ms** (min over rounds, rotated order; q = tokens a row):"]
    for shape, modes in res["step_ms_all"].items():
        qs = sorted({int(q) for m in modes.values() for w in m.values() for q in w})
        lines += [f"\n{shape}:\n", "| width | " + " | ".join(f"{m} q={q}" for q in qs for m in modes) + " |",
                  "|---:|" + "---:|" * (len(qs) * len(modes))]
        for w in next(iter(modes.values())):
            lines.append(f"| {w} | " + " | ".join(f"{modes[m][w][q]:.2f}" for q in qs for m in modes) + " |")
    lines.append("\n**(c) engine stream vs forecast** (measured / forecast seconds, SmolLM2 shape):\n")
    lines += [f"- width {c['width']}: {c['measured_s']:.2f} s / {c['predicted_s']:.2f} s = "
              f"{c['measured_s'] / c['predicted_s']:.2f} ({c['measured_tok_s']:.0f} tok/s)" for c in res["stream_checks"]]
    if res.get("roofline_ratio_8b_w64") is not None:
        lines.append(f"\n**8B roofline** at width 64: decode step / weight-read time = {res['roofline_ratio_8b_w64']:.2f} "
                     f"(/ weight + KV read time: {res['roofline_ratio_8b_w64_with_kv']:.2f})")
    lines.append(f"\n**(f) profile** (`profile.txt`): {json.dumps(res['profile'])}")
    lines.append(f"\n**(d) job**: {json.dumps(res['job'])}")
    lines.append(f"\n**(e) surfaces**: {', '.join(res['surface_keys'])} in `surfaces.json`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small widths, rows and shapes (a smoke run on a CPU)")
    p.add_argument("--context", type=int, default=512, help="cached tokens a row in the step timings")
    p.add_argument("--skip-job", action="store_true")
    args = p.parse_args(argv)
    import transformers

    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24):
        print(f"transformers {transformers.__version__} is too old for the engine (>=5.24,<5.25): install the "
              "carried wheel first (see this script's docstring)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    cuda = args.device.startswith("cuda")
    dtype_name = "bfloat16" if cuda else "float32"
    dtype = getattr(torch, dtype_name)
    quick = args.quick
    widths = [1, 2] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    qs = [1, 2] if quick else [1, 2, 4, 8]
    context = min(args.context, 64) if quick else args.context
    check_widths, check_rows = ([2], 8) if quick else ([64, 256], 256)
    shapes = ["smollm2-135m"] + ([] if quick or not cuda else ["llama-8b"])
    # --quick: the SmolLM2 shape cut to 4 layers (the script's plumbing, not its numbers)
    config = {name: {**SHAPES[name], **({"num_hidden_layers": 4} if quick else {})} for name in shapes}
    print(f"device {device_name(torch.device(args.device))}, torch {torch.__version__}, {dtype_name}", flush=True)

    res = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": device_name(torch.device(args.device)), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "dtype": dtype_name, "context": context, "quick": quick}
    res["bandwidth_gb_s"] = bandwidth(args.device, (1 << 28) if quick else (1 << 31)) / 1e9
    a = lossless(args.device)
    res["lossless"], res["lossless_cases"] = a["lossless"], a["cases"]

    res["step_ms_all"], surfaces, stream_checks = {}, {}, []
    for shape in shapes:
        model = build(config[shape], dtype, args.device)
        per_mode: dict = {m: {} for m in MODES}
        for w in widths:
            t = step_times(model, w, qs, context, 2 if quick else 3, args.device)
            for m in MODES:
                per_mode[m][w] = t[m]
            print(f"(b) {shape} width {w}: " + ", ".join(f"{m} q={q} {t[m][q]:.2f} ms" for q in qs for m in MODES),
                  flush=True)
        res["step_ms_all"][shape] = per_mode
        if shape == "llama-8b":
            best = min(per_mode[m][64][1] for m in MODES) / 1e3
            bw = res["bandwidth_gb_s"] * 1e9
            res["roofline_ratio_8b_w64"] = best / (weight_bytes_per_step(model) / bw)  # weights only (the issue's)
            kv_read = 64 * (context + 1) * Engine(model).bytes_per_token  # ... and the step's cache reads too
            res["roofline_ratio_8b_w64_with_kv"] = best / ((weight_bytes_per_step(model) + kv_read) / bw)
        if shape == "smollm2-135m":  # (e) the surface, (c) streams against its forecast
            engine = Engine(model)
            s = calibrate(engine, widths, DEFAULT_QS, context=context)
            lengths = [(32 + (37 * i) % 96, 16 + (53 * i) % 64) for i in range(64)]
            if quick:
                lengths = [(8 + p_ // 4, 4 + n // 4) for p_, n in lengths]
            for w in check_widths:
                stream_checks.append(stream_check(engine, s, lengths, w, check_rows, args.device))
            # (f) where a stream's time goes, op by op (a short one: profiling slows it)
            res["profile"] = profile_stream(engine, lengths, check_widths[0], min(check_rows, 64), args.device,
                                            os.path.join(args.out, "profile.txt"))
            surfaces[s.key] = {**s.as_dict(), "stream_ratio": {str(c["width"]): c["measured_s"] / c["predicted_s"]
                                                               for c in stream_checks}}
            del engine
        del model
        if cuda:
            torch.cuda.empty_cache()
    res["step_ms"] = {shape: {m: {w: v[1] for w, v in per.items()} for m, per in modes.items()}
                      for shape, modes in res["step_ms_all"].items()}
    res["stream_checks"] = stream_checks
    res["stream_vs_forecast"] = {c["width"]: c["measured_s"] / c["predicted_s"] for c in stream_checks}
    res["surface_keys"] = sorted(surfaces)
    if args.skip_job:
        res["job"] = {"skipped": "--skip-job"}
    else:
        with tempfile.TemporaryDirectory() as work:
            res["job"] = job_check(config["smollm2-135m"], dtype_name, "cuda" if cuda else "cpu", check_rows,
                                   8 if quick else 64, "4" if quick else "auto", work)
    res["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "surfaces.json"), "w") as f:
        json.dump(surfaces, f, indent=1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(res))
    print(table(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
