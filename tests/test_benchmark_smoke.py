"""The Spec-Bench harness on 2 prompts: every method runs and the outputs have their schema."""

import json

import pyarrow.parquet as pq
import pytest

from jobs.benchmark import main as bench_main


@pytest.mark.slow
def test_benchmark_harness_on_two_prompts(tmp_path):
    corpus = tmp_path / "q.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"question_id": 1, "category": "qa", "turns": ["What is the capital of Italy?"]},
                {"question_id": 2, "category": "math_reasoning", "turns": ["What is 3 + 4?"], "reference": ["3 + 4 = 7\n#### 7"]},
            ]
        )
    )
    out = tmp_path / "bench"
    assert bench_main([f"input={corpus}", "max_new_tokens=6", "batch_sizes=[1,2]", f"output={out}"]) == 0
    rec = pq.read_table(out / "records.parquet").to_pylist()
    methods = {"hf_generate", "plain", "conflayers_acceptance", "conflayers_throughput", "static", "swift", "prompt_lookup",
               "ngram", "auto"}
    assert {r["method"] for r in rec if r["batch_size"] == 1} == methods
    assert {r["method"] for r in rec if r["batch_size"] == 2} == methods - {"prompt_lookup"}  # batch-1-only method
    assert all(1 <= r["new_tokens"] <= 6 and r["seconds"] > 0 for r in rec)
    assert all(r["math_correct"] is not None for r in rec if r["category"] == "math_reasoning")
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    overall = {(s["method"], s["batch_size"]): s for s in summary if s["category"] == "__all__"}
    assert overall[("hf_generate", 1)]["speedup"] == pytest.approx(1.0)
    for m in methods - {"hf_generate", "prompt_lookup"}:  # greedy methods are lossless
        assert overall[(m, 1)]["exact_match"] == 1.0
    searchers = {(s["method"], s["batch_size"]): s for s in json.loads((out / "searchers.json").read_text())}
    assert set(searchers) == {(m, bs) for m in ("conflayers_acceptance", "conflayers_throughput", "static", "swift", "auto")
                              for bs in (1, 2)}
    assert sum(searchers[("auto", 1)]["decisions"].values()) > 0  # the controller's decisions, per run
    assert all(sum(json.loads(r["drafter_steps"]).values()) == r["steps"] for r in rec if r["method"] in ("ngram", "auto"))
    assert searchers[("conflayers_throughput", 1)]["objective"] == "throughput"
    table = (out / "table.md").read_text()
    assert "| prompt_lookup | 2 | n/a |" in table and "Speedup per category, batch size 2" in table
    assert "## Searchers at the end of the run" in table
    assert (out / "speedup_by_category.png").stat().st_size > 1000 and (out / "speedup_vs_batch.png").stat().st_size > 1000
