"""Spec-Bench benchmark: every decoding method side by side in one process.

    python -m jobs.benchmark --config configs/benchmark.yaml key=value ...

Greedy decoding of the same prompts by: transformers ``generate`` (the reference), the engine's
plain decoding, ConfLayers with ``objective: acceptance`` (the paper) and ``objective:
throughput``, ``static`` every-other-layer, ``swift``, transformers' prompt-lookup decoding, the
engine's batched n-gram drafter (``ngram``) and the per-step controller (``auto``: n-gram, layer
skip under a throughput ConfLayers search, or plain, by the measured cost surface), each at batch
size 1 and a larger batch. Spec-Bench's method: greedy, one machine, speedup =
tokens/s over ``generate`` at the same batch size. The run order of methods rotates per batch,
a warm-up is excluded, search time is included in tokens/s and also reported on its own.
Writes ``records.parquet`` (every prompt x method x batch size), ``summary.parquet``,
``table.md``, ``config.json``, ``searchers.json`` (each searcher's final state) and two PNG plots.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from conflayers import Engine, GenerationConfig, LayerSkipDrafter
from conflayers.costs.calibrate import load_or_calibrate
from conflayers.drafts.auto import build_drafter, surface_grid
from conflayers.models import encode_prompts, load_model
from conflayers.search.policy import make_policy

REPO = Path(__file__).resolve().parents[1]
SPEC_BENCH = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
DEMO = REPO / "pipeline" / "data" / "demo.jsonl"

METHODS = ("hf_generate", "plain", "conflayers_acceptance", "conflayers_throughput", "static", "swift", "prompt_lookup",
           "ngram", "auto")
BATCH1_ONLY = {"prompt_lookup"}  # transformers' assisted decoding runs batch size 1 only


@dataclass
class BenchConfig:
    input: str = ""  # Spec-Bench-format JSONL; "" = ../shared/data/spec_bench/question.jsonl, else the demo corpus
    categories: Optional[list] = None  # None = all categories in the file
    per_category: int = 2  # prompts sampled per category (the first N)
    max_new_tokens: int = 32
    batch_sizes: list = field(default_factory=lambda: [1, 8])
    methods: list = field(default_factory=lambda: list(METHODS))
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    kernels: str = "auto"  # linear kernels for every method, transformers generate included: auto | native | onednn
    compile: str = "off"  # the engine's compiled decode/verify steps (conflayers/compiled.py): off | on
    stop_threshold: float = 0.8
    max_draft: int = 8
    prompt_lookup_num_tokens: int = 10
    ngram_max: int = 3  # ngram / auto: longest suffix looked up
    output: str = "outputs/benchmark"


def load_config(argv: list[str]) -> BenchConfig:
    base = OmegaConf.structured(BenchConfig)
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        base = OmegaConf.merge(base, OmegaConf.load(args[i + 1]))
        del args[i : i + 2]
    cfg = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist(args)))
    cfg.compile = {"True": "on", "False": "off"}.get(str(cfg.compile), cfg.compile)  # YAML's bare on / off
    if cfg.compile not in ("off", "on"):
        raise SystemExit(f"compile: must be off or on, got {cfg.compile!r}")
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if cfg.per_category < 1 or cfg.max_new_tokens < 1 or not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise SystemExit("per_category, max_new_tokens and every batch_sizes entry must be >= 1")
    return cfg


def load_rows(cfg: BenchConfig) -> list[dict]:
    path = Path(cfg.input) if cfg.input else (SPEC_BENCH if SPEC_BENCH.is_file() else DEMO)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if "turns" in r:  # Spec-Bench: first turn, category
            ref = r.get("reference")
            rows.append({"id": str(r.get("question_id", n)), "category": r["category"], "prompt": r["turns"][0],
                         "reference": ref[0] if isinstance(ref, list) and ref else ref})
        elif "prompt" in r:
            rows.append({"id": str(r.get("id", n)), "category": r.get("dataset", path.stem), "prompt": r["prompt"],
                         "reference": r.get("reference")})
        else:
            raise SystemExit(f"{path}:{n}: neither Spec-Bench ('turns') nor a 'prompt' row")
    cats = cfg.categories or sorted({r["category"] for r in rows})
    out = []
    for c in cats:
        picked = [r for r in rows if r["category"] == c][: cfg.per_category]
        if not picked:
            raise SystemExit(f"categories: {c!r} has no prompts in {path}")
        out += picked
    return out


# ---- quality metrics ---------------------------------------------------------------------------
_NUM = re.compile(r"-?\d[\d,]*\.?\d*")


def last_number(text: str) -> Optional[str]:
    nums = _NUM.findall(text or "")
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def math_correct(output: str, reference: Optional[str]) -> Optional[bool]:
    if not reference or "####" not in reference:
        return None
    want = reference.rsplit("####", 1)[1].strip().replace(",", "")
    got = last_number(output)
    try:
        return got is not None and float(got) == float(want)
    except ValueError:
        return got == want


def rouge2(output: str, reference: Optional[str]) -> Optional[float]:
    if not reference:
        return None
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True).score(reference, output)["rouge2"].fmeasure


def batches(rows: list[dict], ids: list[list[int]], bs: int) -> list[list[int]]:
    """Row indices per batch. Batch size 1 keeps the file's category order; larger batches mix
    categories, rows sorted by prompt length so a batch pads little (the pipeline buckets the same
    way), and a row's time is its token share of its batch's wall time."""
    if bs == 1:
        return [[i] for i in range(len(rows))]
    order = sorted(range(len(rows)), key=lambda i: len(ids[i]))
    return [order[s : s + bs] for s in range(0, len(order), bs)]


# ---- the methods ---------------------------------------------------------------------------------
class Runner:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.model, self.tok = load_model(cfg.model, cfg.dtype, cfg.device)
        # the model is shared: generate runs on the same kernels (and eagerly: compiled steps are the engine's)
        self.engine = Engine(self.model, cfg.kernels, compile=cfg.compile)
        if cfg.compile == "on" and self.engine.compiled is None:
            raise SystemExit(f"compile: on, but compiled steps cannot run here: {self.engine.compile_error}")
        self.eos = set(self.engine.model.generation_config.eos_token_id if isinstance(
            self.engine.model.generation_config.eos_token_id, list) else [self.engine.model.generation_config.eos_token_id])
        # one searcher (or controller) per (method, batch size): it learns over the whole run, as a
        # pipeline actor's does over a dataset
        self.policies: dict[tuple[str, int], object] = {}
        self.surface = None
        if "auto" in cfg.methods:  # measured once (cached per model x device x dtype x kernels x threads)
            t0 = time.perf_counter()
            self.surface, cached = load_or_calibrate(self.engine, *surface_grid(max(cfg.batch_sizes), cfg.max_draft))
            print(f"cost surface: {'cached' if cached else f'measured in {time.perf_counter() - t0:.0f} s'}", flush=True)

    def drafter(self, method: str, bs: int):
        if method == "ngram":
            return build_drafter("ngram", self.model, max_draft_len=self.cfg.max_draft, ngram_max=self.cfg.ngram_max)
        if method == "auto":
            if ("auto", bs) not in self.policies:
                ls = LayerSkipDrafter(self.model, make_policy("conflayers", self.model, objective="throughput"),
                                      self.cfg.stop_threshold, self.cfg.max_draft)
                self.policies[("auto", bs)] = build_drafter("auto", self.model, ls, self.surface, self.cfg.max_draft,
                                                            self.cfg.ngram_max)
            return self.policies[("auto", bs)]
        return LayerSkipDrafter(self.model, self.policy(method, bs), self.cfg.stop_threshold, self.cfg.max_draft)

    def policy(self, method: str, bs: int):
        key = (method, bs)
        if key not in self.policies:
            if method.startswith("conflayers_"):
                self.policies[key] = make_policy("conflayers", self.model, objective=method.split("_", 1)[1])
            else:
                self.policies[key] = make_policy(method, self.model)
        return self.policies[key]

    def _hf(self, batch: list[list[int]], **extra) -> list[list[int]]:
        L = max(map(len, batch))
        dev = self.engine.device
        ids = torch.tensor([[0] * (L - len(p)) + p for p in batch], device=dev)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch], device=dev)
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                  pad_token_id=0, **extra)
        rows = []
        for r in out[:, L:].tolist():
            cut = next((i + 1 for i, t in enumerate(r) if t in self.eos), len(r))
            rows.append(r[:cut])
        return rows

    def run(self, method: str, bs: int, batch: list[list[int]]):
        """Returns (token id lists, per-row stats dicts or None, wall seconds, search seconds)."""
        gc = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens)
        t0 = time.perf_counter()
        if method == "hf_generate":
            outs, stats = self._hf(batch), None
        elif method == "prompt_lookup":
            outs, stats = self._hf(batch, prompt_lookup_num_tokens=self.cfg.prompt_lookup_num_tokens), None
        elif method == "plain":
            res = self.engine.generate(batch, gc)
            outs, stats = [r.token_ids for r in res], [r.stats.as_dict() for r in res]
        else:
            res = self.engine.generate(batch, gc, self.drafter(method, bs))
            outs, stats = [r.token_ids for r in res], [r.stats.as_dict() for r in res]
        wall = time.perf_counter() - t0
        search = 0.0
        if stats:  # engine time is prefill + decode; the rest of the wall time went to the searcher
            search = max(0.0, wall - stats[0]["prefill_seconds"] - max(s["decode_seconds"] for s in stats))
        return outs, stats, wall, search


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv)
    rows = load_rows(cfg)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(cfg)
    ids = encode_prompts(runner.tok, [r["prompt"] for r in rows])
    print(f"benchmark: {len(rows)} prompts over {len({r['category'] for r in rows})} categories, methods "
          f"{', '.join(cfg.methods)}, batch sizes {cfg.batch_sizes}, max_new_tokens {cfg.max_new_tokens}", flush=True)
    runner.engine.generate(ids[:1], GenerationConfig(max_new_tokens=4))  # warm-up, excluded
    runner._hf(ids[:1])

    records = []
    t_run = time.perf_counter()
    step = 0
    for bs in cfg.batch_sizes:
        finished = 0
        for chunk in batches(rows, ids, bs):
            methods = list(cfg.methods)
            methods = methods[step % len(methods):] + methods[: step % len(methods)]  # rotate run order
            step += 1
            for m in methods:
                if bs > 1 and m in BATCH1_ONLY:
                    continue
                outs, stats, wall, search = runner.run(m, bs, [ids[i] for i in chunk])
                total = max(1, sum(map(len, outs)))
                for j, i in enumerate(chunk):
                    st = stats[j] if stats else {}
                    text = runner.tok.decode(outs[j], skip_special_tokens=True)
                    cat = rows[i]["category"]
                    records.append({
                        "method": m, "batch_size": bs, "category": cat, "id": rows[i]["id"],
                        "prompt_tokens": len(ids[i]), "new_tokens": len(outs[j]), "token_ids": outs[j], "output": text,
                        # a batch's wall time is shared by its rows, in proportion to their tokens
                        "seconds": wall * len(outs[j]) / total,
                        "search_seconds": search * len(outs[j]) / total,
                        "steps": st.get("steps"), "drafted": st.get("drafted"), "accepted": st.get("accepted"),
                        "skip_set": st.get("skip_set"),
                        "drafter_steps": json.dumps(st.get("drafter_steps") or {}),
                        "rouge2": rouge2(text, rows[i]["reference"]) if cat == "summarization" else None,
                        "math_correct": math_correct(text, rows[i]["reference"]) if cat == "math_reasoning" else None,
                    })
            done = sorted({rows[i]["category"] for i in chunk})
            finished += len(chunk)
            print(f"  batch size {bs}: {finished}/{len(rows)} prompts done (last: {', '.join(done)}) x {len(methods)} methods, "
                  f"{time.perf_counter() - t_run:.0f} s so far", flush=True)
    from jobs.benchmark_report import write_report

    write_report(records, cfg, out_dir, command="python -m jobs.benchmark " + shlex.join(argv),
                 wall_seconds=time.perf_counter() - t_run,
                 searchers={key: policy.state() for key, policy in runner.policies.items()})
    print(f"wrote {out_dir}/: records.parquet, summary.parquet, table.md, config.json, searchers.json, "
          "speedup_by_category.png, speedup_vs_batch.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
