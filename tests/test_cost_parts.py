"""The cost comparison's parts without Ray: the price table, the $/1M arithmetic on a hand-made run,
the forecast against the real engine loop, the recommendation, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conflayers import Engine, GenerationConfig, Request
from conflayers.costs.forecast import job_seconds, stream_seconds
from conflayers.costs.surface import CostSurface
from jobs.generate import load_config
from pipeline.cost.prices import load_prices, parse_prices
from pipeline.cost.report import recommend
from pipeline.cost.run import CostConfig, read_inputs, run_cost, validate_cost
from pipeline.metrics import metrics_table
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
CPU_ROW = {"name": "box", "accelerator": "cpu", "vcpus": 4, "on_demand": 0.36, "spot": 0.09, "source": "test",
           "as_of": "2026-11"}


def write_prices(path: Path, rows: list[dict]) -> str:
    path.write_text(yaml.safe_dump({"currency": "USD", "instances": rows}))
    return str(path)


# ---- the price table ------------------------------------------------------------------------------
def test_bundled_price_table_prices_cpu_and_common_gpus():
    t = load_prices(str(REPO / "configs" / "prices.yaml"))
    assert {p.name for p in t.for_accelerator("cpu")} >= {"aws-c6a.large"}
    assert [p.name for p in t.for_accelerator("NVIDIA H100 80GB HBM3")] == ["aws-p5.48xlarge"]
    assert [p.name for p in t.for_accelerator("NVIDIA L4")] == ["aws-g6.xlarge"]
    assert all(p.on_demand > 0 and p.source and p.as_of for p in t.instances)
    h100 = t.for_accelerator("NVIDIA H100 80GB HBM3")[0]
    assert h100.unit_hour("on_demand") == pytest.approx(55.04 / 8)


def test_accelerator_names_match_as_whole_words():
    t = parse_prices({"instances": [{**CPU_ROW, "name": "l4", "accelerator": "L4", "accelerators": 1, "vcpus": None}]},
                     "p.yaml")
    assert t.for_accelerator("NVIDIA L4")
    with pytest.raises(ValueError, match=r"accelerator 'NVIDIA L40S' has no price in p.yaml \(priced: L4\)"):
        t.for_accelerator("NVIDIA L40S")


@pytest.mark.parametrize("change, message", [
    ({"on_demand": -1.0}, r"instance 'box'.on_demand: must be a positive number"),
    ({"on_demand": None}, r"instance 'box'.on_demand: missing"),
    ({"spot": -0.5}, r"instance 'box'.spot: must be a non-negative number"),
    ({"on_demand": "cheap"}, r"instance 'box'.on_demand: must be a positive number"),
    ({"vcpus": 0}, r"instance 'box'.vcpus: must be an integer >= 1"),
    ({"accelerator": ""}, r"instance 'box'.accelerator: missing"),
    ({"price": 1}, r"instance 'box': unknown key\(s\) \['price'\]"),
])
def test_bad_price_rows_are_errors_naming_the_row_and_field(change, message):
    with pytest.raises(ValueError, match=message):
        parse_prices({"instances": [{**CPU_ROW, **change}]}, "p.yaml")


def test_a_price_table_without_rows_or_listing_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="non-empty `instances:` list"):
        parse_prices({"instances": []}, "p.yaml")
    with pytest.raises(ValueError, match="instance 'box': listed twice"):
        parse_prices({"instances": [CPU_ROW, CPU_ROW]}, "p.yaml")


# ---- $/1M tokens on a hand-made run -------------------------------------------------------------------
def hand_made_run(d: Path, *, wall=50.0, startup=10.0, out_tokens=2000, in_tokens=5000, rows=20, concurrency=2,
                  threads=2) -> str:
    """A finished run's files as jobs.generate writes them, with chosen numbers."""
    d.mkdir(parents=True)
    m = {"dataset": "__all__", "rows_ok": rows, "rows_error": 0, "prompt_tokens": in_tokens,
         "generated_tokens": out_tokens, "wall_seconds": wall, "compute_seconds": 60.0, "accelerator_type": "cpu",
         "accelerator_count": 0, "num_actors": concurrency, "startup_seconds": startup, "skip_set": []}
    pq.write_table(metrics_table([m]), d / "metrics.parquet")
    (d / "run_config.yaml").write_text(yaml.safe_dump({
        "model": {"dtype": "float32", "kernels": "auto"}, "search": {"drafter": "auto"},
        "engine": {"max_batch": 8, "threads": threads, "prefill_tokens": 512},
        "ray": {"concurrency": concurrency, "num_cpus_per_actor": 1.0, "batch_size": 256},
        "generation": {"temperature": 0.0}}))
    return str(d)


def runs_config(tmp_path: Path, runs: list[str], **extra) -> CostConfig:
    prices = write_prices(tmp_path / "prices.yaml", [CPU_ROW])
    over = [f"runs={json.dumps(runs)}", "grid.concurrency=[]", f"prices.path={prices}",
            f"output.path={tmp_path / 'report'}", *(f"{k}={v}" for k, v in extra.items())]
    return load_config(None, over, CostConfig, validate_cost)


def test_usd_per_million_tokens_from_a_hand_made_metrics_table(tmp_path):
    run = hand_made_run(tmp_path / "run")
    cfg = runs_config(tmp_path, [run], **{"corpus.rows": 1000})
    res = run_cost(cfg)
    (row,) = res["rows"]
    # 2 actors x 2 threads = 4 vCPUs of a 4-vCPU $0.36/h box: $0.36/h; 2000 tokens in 50 - 10 = 40 s
    assert row["units"] == 4 and row["usd_per_hour"] == pytest.approx(0.36, rel=1e-12)
    assert row["tokens_per_s"] == pytest.approx(50.0, rel=1e-12)
    assert row["corpus_tokens_per_s"] == pytest.approx(50.0, rel=1e-12)  # no surface: the measured rate
    assert row["usd_per_1m_output_tokens"] == pytest.approx(0.36 / 3600 / 50.0 * 1e6, rel=1e-12)  # $2.00
    assert row["usd_per_1m_output_tokens"] == pytest.approx(2.0, rel=1e-12)
    assert row["usd_per_1m_input_tokens"] == pytest.approx(0.36 / 3600 / 125.0 * 1e6, rel=1e-12)  # $0.80
    assert row["spot_usd_per_1m_output_tokens"] == pytest.approx(0.5, rel=1e-12)  # $0.09/h
    # the corpus: 1000 rows x 100 tokens at 50 tok/s = 2000 s, + 10 s start-up
    assert row["corpus_output_tokens"] == 100_000 and row["corpus_input_tokens"] == 250_000
    assert row["corpus_hours"] == pytest.approx(2010 / 3600, rel=1e-12)
    assert row["corpus_usd"] == pytest.approx(0.36 * 2010 / 3600, rel=1e-12)
    assert row["startup_idle_share"] == pytest.approx(1 - 60.0 / (2 * 50.0), rel=1e-12)
    assert row["mode"] == "measured" and row["instance"] == "box"
    out = Path(cfg.output.path)
    table = pq.read_table(out / "cost.parquet").to_pylist()
    assert table[0]["usd_per_1m_output_tokens"] == pytest.approx(2.0, rel=1e-12)
    text = (out / "cost.md").read_text()
    assert "**Recommendation**: cheapest (no deadline_hours given): run on box (measured)" in text
    assert (out / "pareto.png").stat().st_size > 1000


def test_the_recommendation_is_the_cheapest_cell_within_the_deadline(tmp_path):
    slow_cheap = hand_made_run(tmp_path / "slow", wall=160.0, out_tokens=2000, concurrency=1, threads=1)
    fast_dear = hand_made_run(tmp_path / "fast", wall=50.0, out_tokens=2000, concurrency=2, threads=2)
    rows = run_cost(runs_config(tmp_path, [slow_cheap, fast_dear], **{"corpus.rows": 1000}))["rows"]
    by = {r["cell"]: r for r in rows}
    assert by["slow"]["corpus_usd"] < by["fast"]["corpus_usd"] and by["slow"]["corpus_hours"] > by["fast"]["corpus_hours"]
    assert recommend(rows, None, "on_demand").startswith("cheapest (no deadline_hours given): slow on box")
    deadline = (by["slow"]["corpus_hours"] + by["fast"]["corpus_hours"]) / 2
    assert recommend(rows, deadline, "on_demand").startswith(f"cheapest finishing within {deadline:g} h: fast on box")
    assert recommend(rows, by["fast"]["corpus_hours"] / 2, "on_demand").startswith("no cell finishes the corpus")


# ---- bad input: clear errors, nothing written ------------------------------------------------------------
def test_a_run_directory_without_metrics_is_an_error_before_anything_is_written(tmp_path):
    (tmp_path / "half").mkdir()
    cfg = runs_config(tmp_path, [str(tmp_path / "half")])
    with pytest.raises(FileNotFoundError, match=r"runs: .*half has no metrics.parquet \(not a finished run"):
        read_inputs(cfg)
    assert not Path(cfg.output.path).exists()


def test_an_accelerator_without_a_price_is_an_error_naming_it(tmp_path):
    run = hand_made_run(tmp_path / "run")
    gpu_only = write_prices(tmp_path / "gpu.yaml", [{**CPU_ROW, "name": "g", "accelerator": "H100", "accelerators": 8,
                                                     "vcpus": None}])
    cfg = runs_config(tmp_path, [run], **{"prices.path": gpu_only})
    with pytest.raises(ValueError, match=r"accelerator 'cpu' has no price in .*gpu.yaml \(priced: H100\)"):
        read_inputs(cfg)
    assert not Path(cfg.output.path).exists()


@pytest.mark.parametrize("over, message", [
    (["grid.max_batch=[]", "runs=[]"], "grid: is empty"),
    (["grid.drafter=[fast]"], "grid.drafter: values must be in"),
    (["grid.max_batch=[0]"], r"grid.max_batch / predict.max_batch: values must be integers >= 1"),
    (["grid.max_batch=[4,4]"], "grid.max_batch: lists a value twice"),
    (["sample.rows=0"], "sample.rows: must be >= 1"),
    (["deadline_hours=-2"], "deadline_hours: must be > 0"),
    (["prices.pricing=reserved"], "prices.pricing: must be on_demand or spot"),
    (["generation.temperature=-1"], "generation.temperature: must be >= 0"),
])
def test_bad_config_values_are_errors_naming_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        load_config(str(REPO / "configs" / "cost.yaml"), over, CostConfig, validate_cost)


def test_missing_price_table_surface_file_and_unknown_instance_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prices.path: no price table at"):
        read_inputs(runs_config(tmp_path, [], **{"prices.path": str(tmp_path / "none.yaml"), "grid.concurrency": "[1]"}))
    with pytest.raises(FileNotFoundError, match=r"predict.surfaces\[0\]: .*nope.json does not exist"):
        read_inputs(runs_config(tmp_path, [], **{"predict.surfaces": f"[{tmp_path / 'nope.json'}]",
                                                 "grid.concurrency": "[1]"}))
    with pytest.raises(ValueError, match=r"prices.instances: \['nowhere'\] not in"):
        read_inputs(runs_config(tmp_path, [], **{"prices.instances": "[nowhere]", "grid.concurrency": "[1]"}))


# ---- the forecast replays the engine's loop ----------------------------------------------------------------
def flat_surface(step=1.0, prefill_fixed=0.5, per_token=0.0) -> CostSurface:
    return CostSurface({1: {1: step}, 64: {1: step}}, n_layers=4, prefill=per_token or 1e-12,
                       prefill_fixed=prefill_fixed)


@pytest.mark.parametrize("width", [1, 3, 8])
def test_forecast_counts_the_engines_own_steps(width):
    torch.manual_seed(0)
    engine = Engine(tiny_model(vocab=97), "native")
    lengths = [(5, 9), (17, 1), (3, 14), (40, 6), (8, 11), (12, 3), (30, 20)]
    g = torch.Generator().manual_seed(1)
    reqs = [Request(torch.randint(3, 97, (p,), generator=g).tolist(), n) for p, n in lengths]
    out = list(engine.stream(sorted(reqs, key=lambda r: len(r.token_ids)), GenerationConfig(max_new_tokens=20,
                                                                                             stop_token_ids=()),
                             max_batch=width, prefill_tokens=16))
    assert sorted(r.stats.new_tokens for _, r in out) == sorted(n for _, n in lengths)
    fc = stream_seconds(flat_surface(), lengths, width, prefill_tokens=16)
    assert fc.steps == engine.last_stream["steps"]
    assert fc.tokens == sum(n for _, n in lengths)
    assert fc.decode_seconds == pytest.approx(fc.steps * 1.0)


def test_job_seconds_gives_each_call_to_the_first_free_actor():
    s = flat_surface(step=1.0, prefill_fixed=0.0)
    rows = [(4, 3)] * 6  # calls of 2 rows: 1 prefill (~0 s) + 2 steps each
    total, calls = job_seconds(s, rows, width=2, actors=2, batch_size=2)
    assert calls == pytest.approx([2.0, 2.0, 2.0], abs=1e-6)
    assert total == pytest.approx(4.0, abs=1e-6)  # 3 calls over 2 actors: one actor runs two
    assert job_seconds(s, rows, width=2, actors=3, batch_size=2)[0] == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="actors and batch_size must be >= 1"):
        job_seconds(s, rows, 2, 0, 2)
    assert math.isclose(stream_seconds(s, [(4, 1)], 4).decode_seconds, 0.0)  # one token comes from the prefill
