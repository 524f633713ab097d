"""``python -m conflayers``: generate for prompts with (self-speculative) decoding and print stats."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from .costs.calibrate import load_or_calibrate
from .compiled import COMPILE
from .costs.compile import choose_compile
from .costs.width import choose_width
from .drafts.auto import DRAFTERS, build_drafter, surface_grid
from .drafts.corpus import MAX_TOKENS_INDEXED, CorpusDrafter, SuffixIndex, index_key, index_name, load_saved, merge_saved
from .drafts.layerskip import FixedSkip, LayerSkipDrafter
from .engine import Engine, GenerationConfig, Request
from .kernels import KERNELS
from .layers import validate_skip_set
from .models import BUNDLED, encode_prompts, load_model
from .sampling import SamplingParams
from .search.conflayers import OBJECTIVES
from .search.policy import SEARCHERS, make_policy
from .search.registry import entry_from_policy, model_identity, save_entry

DEMO_PROMPTS = [
    "Summarize in two sentences why the sky looks blue.",
    "What is 17 times 23? Show your working.",
    "Write a haiku about autumn rain.",
    "Give three tips for writing clear code.",
]


def parse_layers(text: str) -> list[int]:
    text = text.strip()
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--skip-layers takes comma-separated layer indices, got {text!r}") from None


def parse_width(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch-size takes auto or an integer >= 1, got {text!r}")
    return n


def read_prompt_records(path: str) -> list[tuple]:
    """(prompt, dataset or None) per record: the record's ``dataset`` (Spec-Bench: its ``category``),
    as the job reads it."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and "prompt" in row:
                prompt, dataset = row["prompt"], row.get("dataset")
            elif isinstance(row, dict) and "messages" in row:
                prompt, dataset = row["messages"], row.get("dataset")
            elif isinstance(row, dict) and "turns" in row:  # Spec-Bench format: first turn
                prompt, dataset = row["turns"][0], row.get("category")
            else:
                raise SystemExit(f"{path}:{n}: expected an object with a 'prompt' (or 'messages') field")
            records.append((prompt, None if dataset is None or dataset == "" else str(dataset)))
    if not records:
        raise SystemExit(f"{path}: no prompts")
    return records


def read_prompts_file(path: str) -> list:
    return [p for p, _ in read_prompt_records(path)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conflayers", description=__doc__)
    p.add_argument("prompts", nargs="*", help="prompts (default: a few built-in demo prompts)")
    p.add_argument("--prompts-file", help='JSONL file, one {"prompt": ...} per line')
    p.add_argument("--model", default=BUNDLED, help=f"local HF dir, .gguf file, hub id, or {BUNDLED!r} (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="linear-layer kernels: auto (prepacked oneDNN on CPU float32/bfloat16, else default), "
                        "native (PyTorch's default), onednn")
    p.add_argument("--compile", choices=COMPILE, default="auto",
                   help="compiled decode/verify steps: auto (default: measured at the run's width, used where faster and "
                        "the run pays back compiling), on, off")
    p.add_argument("--cache-dir", help="where converted GGUF models are cached")
    p.add_argument("--revision", help="a hub model's commit hash, tag or branch")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt (pickle) weights: trusted checkpoints only")
    p.add_argument("--trust-remote-code", action="store_true", help="run code from the model's repository: trusted code only")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=parse_width, default="auto",
                   help="rows in flight (continuous batching): an integer, or auto (default): the width with the best "
                        "measured decode throughput that fits --kv-cache-gb")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache budget in GiB (default: half of the free memory)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--drafter", choices=DRAFTERS, default="auto",
                   help="auto (default): per step, n-gram or corpus drafts, layer skip or nothing, whichever the "
                        "measured cost surface predicts commits the most tokens/s; ngram: prompt lookup; corpus: per "
                        "row the longer of its n-gram draft and a copy from its dataset's earlier outputs; layerskip: "
                        "the model with layers skipped (--skip-layers or --searcher, default the conflayers search); "
                        "none: plain decoding")
    p.add_argument(
        "--skip-layers", type=parse_layers, default=None, help="a fixed skip set for layer-skip drafts, e.g. 3,5,7"
    )
    p.add_argument("--stop-threshold", type=float, default=0.8, help="layer-skip draft stops below this top-1 probability")
    p.add_argument("--max-draft", type=int, default=8, help="most tokens drafted per step")
    p.add_argument("--ngram", type=int, default=3, help="n-gram drafter: longest suffix looked up (default 3)")
    p.add_argument("--costs", help="cost-surface cache JSON for --drafter auto (default: ~/.cache/conflayers/costs.json)")
    p.add_argument("--dataset", help="the dataset of records without their own 'dataset' field: rows draft from their "
                                     "dataset's earlier outputs (auto, corpus), and the skip-set registry key "
                                     "(default: the prompts file's stem, or 'demo')")
    p.add_argument("--corpus-index", metavar="DIR",
                   help="auto, corpus: start each dataset's corpus index from its file in DIR and add this run's "
                        "outputs to it at the end (the job's corpus_index.path: the same files)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text and a table")
    s = p.add_argument_group("skip-set search (all prompts run as one stream through one searcher)")
    s.add_argument("--searcher", choices=SEARCHERS, default=None,
                   help="how the layer-skip set is chosen (default: --skip-layers if given, else conflayers)")
    s.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="conflayers: score sets by measured tokens/s (default) or by acceptance (the paper's)")
    s.add_argument("--rho", type=float, default=None, help="conflayers: minimum skip ratio (0.4)")
    s.add_argument("--interval", type=int, default=None, help="conflayers: records per evaluation (30)")
    s.add_argument("--max-iter", type=int, default=None, help="conflayers / swift: proposals before settling (100 / 50)")
    s.add_argument("--window", type=int, default=None, help="conflayers: confidence window W (100; scaled down for short outputs)")
    s.add_argument("--explore-budget", type=float, default=None,
                   help="conflayers, throughput objective: share of the stream's time the search may lose to plain decoding (0.1)")
    s.add_argument("--registry", help="skip-set registry JSON: read by --searcher cached, written by conflayers when it settles")
    return p


def stats_table(rows: list[dict]) -> str:
    head = ["#", "new", "steps", "drafted", "accepted", "acc.rate", "tau", "prefill s", "decode s", "tok/s", "drafters",
            "finish"]
    lines = []
    for i, s in enumerate(rows):
        tps = s["new_tokens"] / s["decode_seconds"] if s["decode_seconds"] else float("nan")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            [str(i), str(s["new_tokens"]), str(s["steps"]), str(s["drafted"]), str(s["accepted"]),
             fmt(s["acceptance_rate"]), fmt(s["tau"]), f"{s['prefill_seconds']:.2f}", f"{s['decode_seconds']:.2f}",
             f"{tps:.1f}", " ".join(f"{k}:{v}" for k, v in sorted(s["drafter_steps"].items())) or "-",
             s["finish_reason"]]
        )
    widths = [max(len(h), *(len(r[c]) for r in lines)) for c, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in lines]
    return "\n".join(out)


STEP_KINDS = ("plain", "ngram", "corpus", "layerskip")  # as the job's summary: steps by whose draft was verified


def step_shares(rows: list[dict]) -> dict[str, float]:
    """Each drafter's share of the verify steps (``plain``: nothing drafted), over all rows."""
    counts = Counter()
    for s in rows:
        counts.update(s["drafter_steps"])
    total = sum(counts.values()) or 1
    return {k: counts["none" if k == "plain" else k] / total for k in STEP_KINDS}


def _read_file(path: str) -> bytes | None:
    return Path(path).read_bytes() if os.path.isfile(path) else None


def _write_atomic(path: str, data: bytes) -> None:
    """Readers see the whole file or none (a temporary name beside it, then a rename; the umask's mode, as the job's)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_corpus(directory: str | None, key: str, max_draft: int) -> CorpusDrafter:
    """Corpus drafts: rows learn from the rows of their dataset that finished before them; each
    dataset's index starts from its file in ``directory`` (``--corpus-index``; a damaged or another
    model's file: a warning, and it starts empty), else empty."""
    def new_index(dataset: str) -> SuffixIndex:
        if directory is None:
            return SuffixIndex(key=key)
        return load_saved(_read_file, os.path.join(directory, index_name(dataset, key)), dataset, key,
                          MAX_TOKENS_INDEXED)

    return CorpusDrafter(new_index=new_index, max_tokens=max_draft)


def save_corpus(directory: str, key: str, outputs: dict[str, list]) -> dict[str, str]:
    """Add each dataset's outputs of this run (oldest first) to its file in ``directory``, written
    atomically, as the job saves its pooled outputs; {dataset: the file}."""
    saved = {}
    for dataset, outs in sorted(outputs.items()):
        if outs:
            path = os.path.join(directory, index_name(dataset, key))
            _write_atomic(path, merge_saved(_read_file, path, key, outs, MAX_TOKENS_INDEXED))
            saved[dataset] = path
    return saved


def check_corpus_dir(path: str) -> str:
    """``--corpus-index``: a directory (made if missing), or ``ValueError`` saying why it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--corpus-index takes a directory, and {path} is a file")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--corpus-index: cannot make the directory {path} ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--corpus-index: the directory {path} is not writable")
    return path


def build_policy(args, model, dataset: str):
    """The skip-set policy for ``--searcher`` (``ValueError`` for knobs that do not fit it)."""
    name = args.searcher
    if args.skip_layers is not None and name != "static":
        raise ValueError("--skip-layers names a fixed set: use it alone or with --searcher static")
    if name == "static":
        return make_policy(name, model, layers=args.skip_layers)
    if name == "conflayers":
        return make_policy(name, model, objective=args.objective, rho=args.rho, interval=args.interval,
                           max_iter=args.max_iter, window=args.window, explore_budget=args.explore_budget)
    if name == "swift":
        return make_policy(name, model, max_iter=args.max_iter)
    if name == "cached":
        if not args.registry:
            raise ValueError("--searcher cached needs --registry")
        return make_policy(name, model, registry=args.registry, dataset=dataset)
    return make_policy(name, model)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        print(f"error: --kv-cache-gb must be > 0, got {args.kv_cache_gb}", file=sys.stderr)
        return 2
    records = (read_prompt_records(args.prompts_file) if args.prompts_file
               else [(p, None) for p in (args.prompts or DEMO_PROMPTS)])
    prompts = [p for p, _ in records]
    dataset = args.dataset or (Path(args.prompts_file).stem if args.prompts_file else "demo")
    groups = [d or dataset for _, d in records]  # each row's dataset: its corpus index
    uses_corpus = args.drafter in ("auto", "corpus")
    try:
        if args.corpus_index is not None:
            if not uses_corpus:
                raise ValueError(f"--corpus-index keeps corpus drafts; --drafter {args.drafter} makes none")
            check_corpus_dir(args.corpus_index)
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            sampling=SamplingParams(args.temperature, args.top_p, args.top_k),
            seed=args.seed,
        )
        model, tokenizer = load_model(args.model, args.dtype, args.device, args.cache_dir, args.allow_pickle,
                                      args.trust_remote_code, args.revision)
        engine = Engine(model, args.kernels, compile=args.compile)
        policy = None
        layer_skip = args.drafter in ("auto", "layerskip")
        if not layer_skip and (args.searcher is not None or args.skip_layers is not None):
            raise ValueError(f"--searcher / --skip-layers choose layer-skip drafts; --drafter {args.drafter} makes none")
        if layer_skip:
            if args.searcher is None and args.skip_layers is None:
                args.searcher = "conflayers"
            if args.searcher is not None:
                policy = build_policy(args, model, dataset)
            else:
                policy = FixedSkip(validate_skip_set(args.skip_layers, engine.n_layers))
        ids = encode_prompts(tokenizer, prompts)
        budget = None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30)
        width, eager_tps = args.batch_size, None
        if width == "auto":
            row_tokens = max(map(len, ids)) + args.max_new_tokens
            chosen = choose_width(engine, budget, row_tokens=row_tokens, max_width=len(ids))
            width, eager_tps = chosen.width, chosen.tokens_per_s[chosen.width]
        width = min(width, len(ids))
        engine._check_prompts(ids)
        steps = choose_compile(engine, width, len(ids) * args.max_new_tokens, eager_tokens_per_s=eager_tps)
        surface = None
        if args.drafter == "auto":
            surface, _ = load_or_calibrate(engine, *surface_grid(width, args.max_draft), cache_file=args.costs)
        skip_drafter = LayerSkipDrafter(model, policy, args.stop_threshold, args.max_draft) if policy else None
        if skip_drafter is not None and args.drafter == "auto":
            # auto runs layer-skip drafts for one dataset's rows at a time: one searcher for the whole stream
            skip_drafter = {g: skip_drafter for g in sorted(set(groups))}
        corpus, corpus_key, loaded = None, None, {}
        if uses_corpus:
            corpus_key = index_key(model_identity(model), tokenizer)
            corpus = open_corpus(args.corpus_index, corpus_key, args.max_draft)
            loaded = {g: len(corpus.index_for(g).outputs) for g in sorted(set(groups))}  # saved indexes first
        drafter = build_drafter(args.drafter, model, skip_drafter, surface, args.max_draft, args.ngram, corpus=corpus)
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stats_by_index = {}
    finished: dict[str, list] = defaultdict(list)  # each dataset's outputs, in the order they finished
    requests = [Request(p, group=g) for p, g in zip(ids, groups)]
    t0 = time.perf_counter()
    try:
        for i, r in engine.stream(requests, config, drafter, max_batch=width, kv_budget_bytes=budget):
            if r.error:
                raise ValueError(f"prompt {i} {r.error.removeprefix('prompt ')}")
            finished[groups[i]].append(r.token_ids)
            text = tokenizer.decode(r.token_ids, skip_special_tokens=True)
            stats = stats_by_index[i] = r.stats.as_dict()
            if args.json:
                print(json.dumps({"index": i, "prompt": prompts[i], "output": text, "width": width, **stats}), flush=True)
            else:
                print(f"--- [{i}] {prompts[i] if isinstance(prompts[i], str) else prompts[i][-1]['content']}")
                print(text.strip(), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    all_stats = [stats_by_index[i] for i in sorted(stats_by_index)]
    state = policy.state() if hasattr(policy, "state") else None
    if state is not None and args.registry and args.searcher == "conflayers":
        if state["phase"] == "search":
            state["registry"] = "not saved: the search had not settled"
        else:
            try:
                save_entry(args.registry, entry_from_policy(policy, model, dataset))
                state["registry"] = f"saved to {args.registry} as dataset {dataset!r}"
            except (ValueError, OSError) as e:
                print(f"error: could not save the skip set: {e}", file=sys.stderr)
                return 2
    corpus_state = {}
    if corpus is not None:
        saved = {}
        if args.corpus_index:
            try:
                saved = save_corpus(args.corpus_index, corpus_key, finished)
            except OSError as e:
                print(f"error: could not save the corpus index: {e}", file=sys.stderr)
                return 2
        corpus_state = {g: {"outputs_loaded": n, "outputs_indexed": len(corpus.index_for(g).outputs),
                            "saved": saved.get(g)} for g, n in loaded.items()}
    total = sum(s["new_tokens"] for s in all_stats)
    shares = step_shares(all_stats)
    if state is not None and args.json:
        print(json.dumps({"searcher_state": state}), flush=True)
    if args.json and args.drafter == "auto":
        print(json.dumps({"drafter_state": drafter.state()}), flush=True)
    if args.json:
        summary = {"prompts": len(all_stats), "new_tokens": total, "seconds": round(wall, 3), "width": width,
                   "step_shares": {k: round(v, 4) for k, v in shares.items()}}
        if corpus_state:
            summary["corpus_index"] = corpus_state
        print(json.dumps({"summary": summary}), flush=True)
    else:
        print()
        print(stats_table(all_stats))
        print("steps: " + " / ".join(f"{k} {v:.0%}" for k, v in shares.items())
              + f" (of {sum(s['steps'] for s in all_stats)} verify steps)")
        for g, c in corpus_state.items():
            start = f"{c['outputs_loaded']} outputs from {args.corpus_index}" if c["outputs_loaded"] else "empty"
            end = f", saved to {c['saved']}" if c["saved"] else ""
            print(f"corpus index {g!r}: {start} at the start, {c['outputs_indexed']} outputs after the run{end}")
        mode = f"drafter {args.drafter}"
        if args.skip_layers is not None:
            mode += f", skip {sorted(set(args.skip_layers))}"
        if state is not None:
            mode += f", searcher {args.searcher}"
            print("searcher: " + json.dumps(state))
        if args.drafter == "auto":
            print("drafter auto: " + json.dumps(drafter.state()))
        print(f"\n{len(all_stats)} prompts, {total} tokens in {wall:.1f} s ({total / wall:.1f} tok/s), "
              f"width {width}{' (auto)' if args.batch_size == 'auto' else ''}, {mode}, {args.model} on {args.device}, kernels {engine.kernel_plan.name}, "
              f"{'compiled' if engine.compiled is not None else 'eager'} steps ({steps.reason})")
    return 0
