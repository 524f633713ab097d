"""Run metrics from the generations table: one row per dataset plus ``__all__``, and a printed table.

Three throughputs, each named for what it divides (docs/generate.md, "Output columns"):

- ``job_tokens_per_s`` = ``generated_tokens / wall_seconds``: the job's wall, start-up included;
- ``engine_tokens_per_s`` = ``generated_tokens / compute_seconds``: the engines' own time (each row's
  share of its stream's wall time, summed over rows, so over actors too);
- ``spec_gain`` = ``baseline_spec_tokens_per_s / baseline_plain_tokens_per_s``: on the baseline rows
  only, each decoded twice by the same actor at the same width (``spec_gain_width``), once with the
  job's drafter and once plainly. It is the speculation's gain; it is not a ratio of the two above.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

METRIC_FIELDS = (
    "dataset", "rows_ok", "rows_error", "prompt_tokens", "generated_tokens", "wall_seconds", "compute_seconds",
    "job_tokens_per_s", "engine_tokens_per_s", "baseline_rows", "baseline_generated_tokens",
    "baseline_spec_seconds", "baseline_plain_seconds", "baseline_spec_tokens_per_s", "baseline_plain_tokens_per_s",
    "spec_gain", "spec_gain_width", "tau",
    "acceptance_rate", "skip_set", "skip_ratio", "search_iterations", "exact_match_rate", "rouge2",
    "accelerator_type", "accelerator_count", "num_actors", "plain_step_share", "ngram_step_share",
    "corpus_step_share", "layerskip_step_share", "startup_seconds",
)
STEP_KINDS = ("plain", "ngram", "corpus", "layerskip")  # a row's steps by the drafter whose draft was verified


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


class _Group:
    """Running sums of one dataset's (or the whole run's) rows: memory does not grow with the rows."""

    def __init__(self):
        self.rows = self.ok = self.gen = self.prompt = 0
        self.compute = 0.0
        self.base = self.base_tok = self.paired_tok = 0
        self.base_sec = self.paired_sec = 0.0
        self.base_widths: Counter = Counter()
        self.steps = self.drafted = self.accepted = 0
        self.sets: Counter = Counter()
        self.iters = 0
        self.exact = [0, 0]  # matches, rows checked
        self.rouge = [0.0, 0]  # sum of F1, rows with a reference
        self.actors: set = set()
        self.kinds: Counter = Counter(dict.fromkeys(STEP_KINDS, 0))

    def add(self, r: dict, scorer) -> None:
        self.rows += 1
        if r["error_type"]:
            return
        self.ok += 1
        self.gen += r["num_generated_tokens"] or 0
        self.prompt += r["num_input_tokens"] or 0
        self.compute += r["compute_seconds"] or 0
        if r["baseline"]:
            self.base += 1
            self.base_tok += r["baseline_num_generated_tokens"] or 0
            self.base_sec += r["baseline_compute_seconds"] or 0
            self.paired_tok += r["num_generated_tokens"] or 0
            self.paired_sec += r["compute_seconds"] or 0
            if r.get("baseline_width"):
                self.base_widths[r["baseline_width"]] += 1
            if r["baseline_exact_match"] is not None:
                self.exact[0] += bool(r["baseline_exact_match"])
                self.exact[1] += 1
        self.steps += r["steps"] or 0
        self.drafted += r["drafted"] or 0
        self.accepted += r["accepted"] or 0
        self.sets[tuple(r["skip_set"] or ())] += 1
        self.iters = max(self.iters, r["search_iterations"] or 0)
        if r["reference"]:
            self.rouge[0] += scorer().score(r["reference"], r["generated_text"] or "")["rouge2"].fmeasure
            self.rouge[1] += 1
        self.actors.add(r["actor_id"])
        for k in STEP_KINDS:
            self.kinds[k] += r.get(f"{k}_steps") or 0

    def result(self, name: str, wall: float, n_layers: int | None, chosen: dict | None, accel_type: str,
               accel_count: int, startup: float | None) -> dict:
        paired_tps = _div(self.paired_tok, self.paired_sec)
        base_tps = _div(self.base_tok, self.base_sec)
        if chosen is not None:
            skip, iters = list(chosen.get("skip_set") or []), chosen.get("search_iterations")
        else:
            skip, iters = (list(self.sets.most_common(1)[0][0]) if self.sets else []), self.iters
        if not self.kinds["layerskip"]:
            skip = []  # a set that never drafted is not the run's set, whatever the search held
        return {
            "dataset": name,
            "rows_ok": self.ok,
            "rows_error": self.rows - self.ok,
            "prompt_tokens": self.prompt,
            "generated_tokens": self.gen,
            "wall_seconds": wall,
            "compute_seconds": self.compute,
            "job_tokens_per_s": _div(self.gen, wall),
            "engine_tokens_per_s": _div(self.gen, self.compute),
            "baseline_rows": self.base,
            "baseline_generated_tokens": self.paired_tok,
            "baseline_spec_seconds": self.paired_sec,
            "baseline_plain_seconds": self.base_sec,
            "baseline_spec_tokens_per_s": paired_tps,
            "baseline_plain_tokens_per_s": base_tps,
            "spec_gain": _div(paired_tps, base_tps) if paired_tps is not None else None,
            # the width most baseline rows were decoded at (both ways); None: no baseline rows
            "spec_gain_width": self.base_widths.most_common(1)[0][0] if self.base_widths else None,
            "tau": _div(self.accepted + self.steps, self.steps),
            "acceptance_rate": _div(self.accepted, self.drafted),
            "skip_set": skip,
            "skip_ratio": _div(len(skip), n_layers) if n_layers else None,
            "search_iterations": int(iters or 0),
            "exact_match_rate": _div(self.exact[0], self.exact[1]),
            "rouge2": _div(self.rouge[0], self.rouge[1]),
            "accelerator_type": accel_type,
            "accelerator_count": accel_count,
            "num_actors": len(self.actors),
            **{f"{k}_step_share": _div(n, self.steps) for k, n in self.kinds.items()},
            "startup_seconds": startup,
        }


class MetricsAccumulator:
    """The run's metrics from its generation rows fed in any number of pieces (``add``), one row per
    dataset plus ``__all__`` (``result``): the driver streams the outputs through it instead of
    holding them. Rows must be unique by id (``dedupe`` them first if they may not be)."""

    def __init__(self):
        self.groups: dict[str, _Group] = {}
        self.all = _Group()
        self.accel: Counter = Counter()
        self._scorer = None

    def scorer(self):
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rouge2"])
        return self._scorer

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            if r["accelerator"]:
                self.accel[r["accelerator"]] += 1
            self.groups.setdefault(r["dataset"], _Group()).add(r, self.scorer)
            self.all.add(r, self.scorer)

    def result(self, wall_seconds: float, n_layers: int | None = None, chosen_sets: dict | None = None,
               accelerator_count: int = 0, startup_seconds: float | None = None) -> list[dict]:
        """``startup_seconds``: from the job's start until its actors were ready (model loaded, width
        chosen, cost surface in hand): part of ``wall_seconds`` that no token was generated in."""
        accel_type = self.accel.most_common(1)[0][0] if self.accel else "cpu"
        chosen_sets = chosen_sets or {}
        args = (wall_seconds, n_layers)
        out = [g.result(k, *args, chosen_sets.get(k), accel_type, accelerator_count, startup_seconds)
               for k, g in sorted(self.groups.items())]
        out.append(self.all.result("__all__", *args, None, accel_type, accelerator_count, startup_seconds))
        if len(self.groups) > 1:  # no single set for the whole run
            out[-1]["skip_set"], out[-1]["skip_ratio"] = [], None
        return out


def compute_metrics(generations: pa.Table, wall_seconds: float, n_layers: int | None = None,
                    chosen_sets: dict | None = None, accelerator_count: int = 0,
                    startup_seconds: float | None = None) -> list[dict]:
    """``MetricsAccumulator`` over a whole table (deduplicated by id)."""
    acc = MetricsAccumulator()
    acc.add(dedupe(generations).to_pylist())
    return acc.result(wall_seconds, n_layers, chosen_sets, accelerator_count, startup_seconds)


METRICS_SCHEMA = pa.schema(
    [(k, pa.string()) if k in ("dataset", "accelerator_type")
     else (k, pa.list_(pa.int64())) if k == "skip_set"
     else (k, pa.int64()) if k in ("rows_ok", "rows_error", "prompt_tokens", "generated_tokens", "baseline_rows",
                                   "baseline_generated_tokens", "spec_gain_width", "search_iterations",
                                   "accelerator_count", "num_actors")
     else (k, pa.float64())
     for k in METRIC_FIELDS]
)


def metrics_table(metrics: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(metrics, schema=METRICS_SCHEMA)


SUMMARY_COLUMNS = (  # (header, metrics field or None for a composed cell)
    ("dataset", "dataset"), ("rows", "rows_ok"), ("errors", "rows_error"), ("gen tok", "generated_tokens"),
    ("job tok/s", "job_tokens_per_s"), ("engine tok/s", "engine_tokens_per_s"),
    ("gain", "spec_gain"), ("spec/plain tok/s @width", None), ("tau", "tau"), ("accept", "acceptance_rate"),
    ("exact", "exact_match_rate"), ("rouge2", "rouge2"), ("ngram/corpus/lskip steps", None), ("skip set", "skip_set"),
)


def _cells(m: dict) -> list[str]:
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    pair = "-"
    if m["baseline_spec_tokens_per_s"] is not None:
        pair = (f"{f(m['baseline_spec_tokens_per_s'], '.1f')}/{f(m['baseline_plain_tokens_per_s'], '.1f')}"
                f" @{f(m['spec_gain_width'], 'd')}")
    return [m["dataset"], str(m["rows_ok"]), str(m["rows_error"]), str(m["generated_tokens"]),
            f(m["job_tokens_per_s"], ".1f"), f(m["engine_tokens_per_s"], ".1f"), f(m["spec_gain"]), pair,
            f(m["tau"]), f(m["acceptance_rate"]), f(m["exact_match_rate"]), f(m["rouge2"], ".3f"),
            f"{f(m['ngram_step_share'], '.0%')}/{f(m['corpus_step_share'], '.0%')}/{f(m['layerskip_step_share'], '.0%')}",
            ",".join(map(str, m["skip_set"])) or "-"]


def summary_table(metrics: list[dict]) -> str:
    """The run's table: a row per dataset and ``__all__``, then a legend saying how each number is made."""
    head = [h for h, _ in SUMMARY_COLUMNS]
    lines = [_cells(m) for m in metrics]
    left = (0, len(head) - 1)
    widths = [max(len(h), *(len(r[c]) for r in lines)) for c, h in enumerate(head)]
    out = ["  ".join(v.ljust(w) if c in left else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()
           for r in [head, *lines]]
    a = metrics[-1]
    startup = a.get("startup_seconds")
    out += [
        f"job tok/s = gen tok / the job's wall time ({a['wall_seconds']:.1f} s"
        + (f", {startup:.1f} s of it start-up" if startup is not None else "") + "); "
        f"engine tok/s = gen tok / engine seconds ({a['compute_seconds']:.1f} s, summed over actors)",
        f"gain = spec/plain tok/s on the {a['baseline_rows']} baseline rows, each decoded both ways at the width "
        "after @; steps: shares of n-gram / corpus / layer-skip drafts; skip set: where layer-skip drafts ran",
        "every column: docs/generate.md#output-columns",
    ]
    return "\n".join(out)
