"""The corpus reader, the config and the coordinator: no Ray, no model."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.coordinator import Coordinator
from pipeline.metrics import METRIC_FIELDS, compute_metrics, dedupe
from pipeline.reader import read_rows


def _jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def test_records_ids_and_datasets(tmp_path):
    p = _jsonl(tmp_path / "mycorpus.jsonl", [
        {"prompt": "hello"},
        {"id": 7, "dataset": "qa", "prompt": "what?", "reference": "that", "max_tokens": 12},
        {"messages": [{"role": "user", "content": "hi there"}]},
    ])
    rows = read_rows(p)
    assert [r["error_type"] for r in rows] == [None, None, None]
    assert rows[0]["dataset"] == "mycorpus" and len(rows[0]["id"]) == 16
    assert rows[1]["id"] == "7" and rows[1]["dataset"] == "qa" and rows[1]["reference"] == "that"
    assert rows[1]["max_tokens"] == 12
    assert json.loads(rows[2]["messages"]) == [{"role": "user", "content": "hi there"}]
    assert rows[2]["prompt"] == "hi there"
    # stable: same content and position -> same id; another position -> another id
    assert read_rows(p)[0]["id"] == rows[0]["id"]
    assert len({r["id"] for r in rows}) == 3


def test_bad_rows_become_error_rows(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "fine"},
        "{not json",
        {"prompt": "   "},
        {"prompt": 42},
        {"prompt": "x", "max_tokens": -3},
        {"prompt": "x", "max_tokens": 10**9},
        {"prompt": "x", "max_tokens": "many"},
        {"nothing": 1},
        [1, 2],
    ])
    rows = read_rows(p, max_tokens_limit=1000)
    assert [r["error_type"] for r in rows] == [
        None, "malformed_json", "empty_prompt", "bad_prompt", "bad_max_tokens", "bad_max_tokens", "bad_max_tokens",
        "empty_prompt", "bad_record",
    ]
    assert all(r["error_message"] for r in rows[1:])
    assert len({r["id"] for r in rows}) == len(rows)


def test_specbench_and_gsm8k(tmp_path):
    sb = _jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["first turn", "second turn"], "reference": ["ref a"]},
        {"question_id": 82, "category": "math_reasoning", "turns": []},
    ])
    rows = read_rows(sb, fmt="specbench")
    assert rows[0]["id"] == "81" and rows[0]["dataset"] == "writing" and rows[0]["prompt"] == "first turn"
    assert rows[0]["reference"] == "ref a"
    assert rows[1]["error_type"] == "bad_prompt" and rows[1]["dataset"] == "math_reasoning"
    gs = _jsonl(tmp_path / "test.jsonl", [{"question": "2+2?", "answer": "4"}])
    (row,) = read_rows(gs, fmt="gsm8k")
    assert row["dataset"] == "gsm8k" and row["prompt"] == "2+2?" and row["reference"] == "4"
    # not guessed: the same file read as plain records is an error row
    assert read_rows(gs)[0]["error_type"] == "empty_prompt"


def test_parquet_and_csv(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"], "dataset": ["d1", None], "max_tokens": [5, None]}),
                   tmp_path / "t.parquet")
    rows = read_rows(str(tmp_path / "t.parquet"))
    assert [r["dataset"] for r in rows] == ["d1", "t"] and [r["max_tokens"] for r in rows] == [5, None]
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "prompt", "max_tokens"])
        w.writeheader()
        w.writerows([{"id": "x", "prompt": "p", "max_tokens": "4"}, {"id": "y", "prompt": "", "max_tokens": ""}])
    rows = read_rows(str(tmp_path / "c.csv"))
    assert rows[0]["id"] == "x" and rows[0]["max_tokens"] == 4 and rows[0]["dataset"] == "c"
    assert rows[1]["error_type"] == "empty_prompt"


def test_config_errors_name_the_key(tmp_path):
    from jobs.generate import load_config

    with pytest.raises(ValueError, match="nosuch"):
        load_config(None, ["nosuch.key=1"])
    with pytest.raises(ValueError, match="ray.batch_size"):
        load_config(None, ["ray.batch_size=lots"])
    with pytest.raises(ValueError, match="baseline.fraction"):
        load_config(None, ["baseline.fraction=2"])
    with pytest.raises(ValueError, match="input.format"):
        load_config(None, ["input.format=guess"])
    with pytest.raises(ValueError, match="engine.max_batch: must be auto or an integer >= 1, got 'wide'"):
        load_config(None, ["engine.max_batch=wide"])
    with pytest.raises(ValueError, match="engine.max_batch"):
        load_config(None, ["engine.max_batch=0"])
    with pytest.raises(ValueError, match="model.kernels: must be one of"):
        load_config(None, ["model.kernels=fast"])
    with pytest.raises(ValueError, match="engine.kv_cache_gb: must be > 0"):
        load_config(None, ["engine.kv_cache_gb=0"])
    cfg = load_config("configs/generate.yaml", ["input.path=x.jsonl", "search.skip_layers=[3,5]"])
    assert cfg.input.path == "x.jsonl" and cfg.search.skip_layers == [3, 5]
    assert cfg.engine.max_batch == "auto" and cfg.model.kernels == "auto" and cfg.ray.batch_size == 256
    assert load_config(None, ["engine.max_batch=16"]).engine.max_batch == 16


def test_coordinator_best_and_summary():
    c = Coordinator()
    assert c.best("d") is None
    three = {"sets": {(3,): {"tokens": 100, "seconds": 10, "steps": 50, "drafted": 80, "accepted": 50, "rows": 2}},
             "latest": [3], "settled": [[3]]}
    c.report("d", "a1", three)
    c.report("d", "a2", {"sets": {(5,): {"tokens": 100, "seconds": 5, "steps": 40, "drafted": 80, "accepted": 60,
                                         "rows": 2}}, "latest": [5], "settled": [[5]], "search_iterations": 4})
    c.report("d", "a3", {"sets": {(7,): {"tokens": 100, "seconds": 1, "rows": 1}}, "latest": [7], "settled": []})
    assert c.best("d") == [5]  # [7] is fastest but a candidate under test, not a set an actor stood by
    s = c.summary()["d"]
    assert s["skip_set"] == [5] and s["tokens_per_s"] == 20 and s["search_iterations"] == 4 and s["rows"] == 5
    # a report is an actor's whole state: sent again (a retried call, a restarted coordinator) it counts once
    c.report("d", "a1", three)
    assert c.summary()["d"]["rows"] == 5
    three["sets"][(3,)] = {"tokens": 300, "seconds": 10, "steps": 50, "drafted": 80, "accepted": 50, "rows": 4}
    c.report("d", "a1", three)
    assert c.best("d") == [3] and c.summary()["d"]["rows"] == 7
    fresh = Coordinator()  # restarted: rebuilt from what the live actors re-send
    for actor, state in c.reports["d"].items():
        fresh.report("d", actor, state)
    assert fresh.summary() == c.summary() and fresh.epoch != c.epoch


def test_metrics_dedupe_and_fields():
    from pipeline.actor import OUTPUT_SCHEMA

    base = dict.fromkeys(OUTPUT_SCHEMA.names)
    rows = [
        {**base, "id": "a", "dataset": "d", "num_generated_tokens": 10, "num_input_tokens": 5, "compute_seconds": 1.0,
         "steps": 5, "drafted": 8, "accepted": 5, "skip_set": [2], "baseline": True, "baseline_num_generated_tokens": 10,
         "baseline_compute_seconds": 2.0, "baseline_exact_match": True, "baseline_width": 3, "layerskip_steps": 4,
         "actor_id": "x", "accelerator": "cpu",
         "reference": "the cat sat", "generated_text": "the cat sat down"},
        {**base, "id": "b", "dataset": "d", "baseline": False, "error_type": "empty_prompt", "actor_id": "x"},
    ]
    t = pa.Table.from_pylist(rows + rows[:1], schema=OUTPUT_SCHEMA)
    assert dedupe(t).num_rows == 2
    m = compute_metrics(t, wall_seconds=4.0, n_layers=4)
    assert [r["dataset"] for r in m] == ["d", "__all__"]
    d = m[0]
    assert set(d) == set(METRIC_FIELDS)
    assert d["rows_ok"] == 1 and d["rows_error"] == 1 and d["spec_gain"] == 2.0 and d["tau"] == 2.0
    assert d["spec_gain_width"] == 3 and d["baseline_spec_tokens_per_s"] == 10.0 and d["baseline_plain_tokens_per_s"] == 5.0
    assert d["job_tokens_per_s"] == 2.5 and d["engine_tokens_per_s"] == 10.0 and d["skip_set"] == [2]
    # a skip set that never drafted is not shown
    never = [{**rows[0], "layerskip_steps": 0}]
    assert compute_metrics(pa.Table.from_pylist(never, schema=OUTPUT_SCHEMA), 4.0, 4)[0]["skip_set"] == []
    assert d["exact_match_rate"] == 1.0 and d["skip_ratio"] == 0.25 and 0 < d["rouge2"] <= 1
