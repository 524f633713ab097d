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


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_and_writes_its_results(tmp_path):
    """The device check's plumbing, end to end on this CPU (--quick): every part runs and the
    results have the keys the issue names (the numbers come from a GPU run)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["lossless"] is True and len(res["lossless_cases"]) == 24
    steps = res["step_ms"]["smollm2-135m"]
    assert set(steps) == {"dynamic", "static"} and all(set(v) == {"1", "2"} and min(v.values()) > 0
                                                        for v in steps.values())
    assert set(res["stream_vs_forecast"]) == {"2"} and 0.2 < res["stream_vs_forecast"]["2"] < 5
    assert res["job"]["rows"] == 8 and res["job"]["errors"] == 0 and res["job"]["tokens_per_s"] > 0
    surfaces = json.loads((tmp_path / "surfaces.json").read_text())
    assert list(surfaces) == res["surface_keys"] and set(next(iter(surfaces.values()))["stream_ratio"]) == {"2"}
    assert res["profile"]["decode_steps"] > 0 and "by host time" in (tmp_path / "profile.txt").read_text()
    check = res["stream_checks"][0]  # where the stream's decode time went
    parts = sum(check[f"measured_{p}_s"] for p in ("draft", "verify", "sync", "rows", "move"))
    assert 0 < parts <= check["measured_s"] and check["measured_verify_s"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "| width | dynamic q=1 | static q=1 | dynamic q=2 | static q=2 |" in table and "**(d) job**" in table
