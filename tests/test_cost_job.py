"""jobs.cost end to end on a local Ray with a tiny random float64 model: a grid of measured cells on
one sample, predicted cells, the report files, reuse of finished cells, and a bad price table
failing before any cell runs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.pipeline_helpers import save_tiny_model, write_corpus

pytestmark = pytest.mark.slow

CPU = {"name": "box", "accelerator": "cpu", "vcpus": 2, "on_demand": 0.08, "spot": 0.03, "source": "test",
       "as_of": "2026-11"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cost")
    model = save_tiny_model(d / "model", tied=False)
    write_corpus(d / "corpus.jsonl", n=10)
    (d / "prices.yaml").write_text(yaml.safe_dump({"instances": [CPU]}))
    return d, model


def argv(d: Path, model: str, out: str, *extra: str) -> list[str]:
    return [f"model.source={model}", f"input.path={d / 'corpus.jsonl'}", f"output.path={out}",
            f"prices.path={d / 'prices.yaml'}", "sample.rows=6", "generation.max_tokens=6",
            "grid.max_batch=[2,3]", "grid.drafter=[none,ngram]", "grid.dtype=[float64]", "grid.concurrency=[1]",
            "predict.max_batch=[4]", "predict.concurrency=[2]", "search.searcher=none", *extra]


def test_grid_cells_run_the_same_rows_and_the_report_prices_them(setup, ray_local, capsys):
    from jobs.cost import main

    d, model = setup
    out = d / "report"
    assert main(argv(d, model, str(out))) == 0
    rows = pq.read_table(out / "cost.parquet").to_pylist()
    measured = {r["cell"]: r for r in rows if r["mode"] == "measured"}
    assert set(measured) == {f"a1-w{w}-{dr}-float64-auto" for w in (2, 3) for dr in ("none", "ngram")}
    sample_ids = [json.loads(line)["id"] for line in (out / "sample.jsonl").read_text().splitlines()]
    assert len(sample_ids) == 6
    for name in measured:  # every cell ran exactly the sample's rows
        gens = pq.read_table(out / "cells" / name / "generations").to_pylist()
        assert sorted(g["id"] for g in gens) == sorted(sample_ids)
    for w in (2, 3):  # greedy in float64: the n-gram cells' text equals the plain cell's, row for row
        r = measured[f"a1-w{w}-ngram-float64-auto"]
        assert r["exact_match"] == 1.0 and r["speedup"] > 0
        assert measured[f"a1-w{w}-none-float64-auto"]["speedup"] == pytest.approx(1.0)
    for r in measured.values():
        # one actor of ray.num_cpus_per_actor=1 thread (the test's Ray is not one the job started): 1 of 2 vCPUs
        assert r["units"] == 1 and r["unit"] == "vCPU" and r["usd_per_hour"] == pytest.approx(0.04)
        assert r["startup_seconds"] > 0 and r["wall_seconds"] > r["startup_seconds"]
        assert r["output_tokens"] > 0 and r["input_tokens"] > 0
        assert r["usd_per_1m_output_tokens"] == pytest.approx(0.04 / 3600 / r["corpus_tokens_per_s"] * 1e6)
        assert r["predicted_tokens_per_s"] is not None  # the other width of its drafter predicted it
    predicted = {r["cell"] for r in rows if r["mode"] == "predicted"}
    assert {"a1-w4-none-float64-auto", "a2-w2-ngram-float64-auto", "a2-w4-none-float64-auto"} <= predicted
    assert all(r["corpus_rows"] == 10 for r in rows)
    md = (out / "cost.md").read_text()
    assert "**Recommendation**: cheapest" in md and "leave one out" in md
    assert (out / "pareto.png").stat().st_size > 1000
    assert "recommendation: cheapest" in capsys.readouterr().out

    # a rerun reuses the finished cells (their files are not rewritten) and writes the same table
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.parquet")}
    assert main(argv(d, model, str(out))) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.parquet")} == stamps
    again = pq.read_table(out / "cost.parquet").to_pylist()
    assert [r["tokens_per_s"] for r in again if r["mode"] == "measured"] == \
        [r["tokens_per_s"] for r in rows if r["mode"] == "measured"]
    # ... with the cost surfaces measured for them (out/surfaces.json): the same predictions
    assert [r["predicted_tokens_per_s"] for r in again] == [r["predicted_tokens_per_s"] for r in rows]
    assert [r["corpus_hours"] for r in again] == [r["corpus_hours"] for r in rows]


def test_a_cluster_accelerator_without_a_price_fails_before_any_cell_runs(setup, ray_local, capsys):
    from jobs.cost import main

    d, model = setup
    gpu_only = d / "gpu_prices.yaml"
    gpu_only.write_text(yaml.safe_dump({"instances": [{**CPU, "name": "g", "accelerator": "H100", "accelerators": 8,
                                                       "vcpus": None}]}))
    out = d / "nothing"
    assert main(argv(d, model, str(out), f"prices.path={gpu_only}")) == 2
    assert "accelerator 'cpu' has no price" in capsys.readouterr().err
    assert not out.exists()
