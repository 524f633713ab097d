"""The generation job end to end on a local Ray with a tiny random model: outputs, resume, a killed
actor, fail-fast, and S3 (moto in server mode on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.actor import OUTPUT_SCHEMA
from pipeline.metrics import METRIC_FIELDS
from tests.pipeline_helpers import MotoS3, job_overrides, save_tiny_model, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _run(ray_local, overrides):
    from jobs.generate import main

    assert main(overrides) == 0


def _generations(out: Path):
    files = sorted((out / "generations").glob("*.parquet"))
    assert files
    return pq.read_table([str(f) for f in files]).to_pylist() if len(files) == 1 else [
        r for f in files for r in pq.read_table(f).to_pylist()
    ]


def test_end_to_end_outputs_and_metrics(ray_local, tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    ids = write_corpus(corpus, n=5)
    with open(corpus, "a") as f:  # bad rows: malformed JSON, empty prompt, absurd max_tokens, too long
        f.write('{"id": "bad-json", \n{"id": "empty", "prompt": ""}\n{"id": "huge", "prompt": "x", "max_tokens": 99999}\n')
        f.write('{"id": "long", "prompt": "' + "word " * 400 + '"}\n')
    out = tmp_path / "out"
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(out), **{"generation.max_tokens_limit": 100}))

    rows = _generations(out)
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(by_id) == 9
    assert set(ids) <= set(by_id) and set(rows[0]) == set(OUTPUT_SCHEMA.names)
    for i in ids:
        r = by_id[i]
        assert r["error_type"] is None and r["num_generated_tokens"] == 8 and r["generated_text"] is not None
        assert r["skip_set"] == [1] and r["actor_id"] and r["num_input_tokens"] > 0 and r["finish_reason"] == "length"
    errors = {r["id"]: r["error_type"] for r in rows if r["error_type"]}
    assert errors["empty"] == "empty_prompt" and errors["huge"] == "bad_max_tokens"
    assert errors["long"] == "prompt_too_long" and "malformed_json" in errors.values()
    base = [r for r in rows if r["baseline"]]
    assert len(base) >= 2 and all(r["baseline_exact_match"] is not None for r in base)

    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert metrics[0].keys() == set(METRIC_FIELDS) or set(metrics[0]) == set(METRIC_FIELDS)
    m = {r["dataset"]: r for r in metrics}
    assert set(m) == {"alpha", "beta", "corpus", "__all__"}
    assert m["__all__"]["rows_ok"] == 5 and m["__all__"]["rows_error"] == 4
    assert m["__all__"]["generated_tokens"] == 40 and m["alpha"]["baseline_plain_tokens_per_s"] > 0
    assert m["alpha"]["spec_gain"] > 0 and m["alpha"]["rouge2"] is not None and m["alpha"]["accelerator_type"] == "cpu"
    assert (out / "run_config.yaml").read_text().count("max_tokens_limit: 100") == 1
    assert (out / "skip_sets.json").is_file()
    check_summary_recomputes(capsys.readouterr().out, metrics, rows)


def _table(printed: str) -> dict[str, dict[str, str]]:
    """The printed summary table: {dataset: {header: cell}} (headers are split on 2+ spaces)."""
    import re

    lines = printed.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("dataset "))
    head = re.split(r"\s{2,}", lines[start].strip())
    out = {}
    for ln in lines[start + 1:]:
        cells = re.split(r"\s{2,}", ln.strip())
        if len(cells) != len(head):
            break
        out[cells[0]] = dict(zip(head, cells))
    return out


def check_summary_recomputes(printed: str, metrics: list[dict], rows: list[dict]) -> None:
    """Every number of the printed table, recomputed from metrics.parquet and the generations by the
    definitions in docs/generate.md ("Output columns")."""
    from collections import Counter

    table = _table(printed)
    by_ds = {m["dataset"]: m for m in metrics}
    assert set(table) == set(by_ds)

    def ratio(a, b, spec=".2f"):  # the table's "-": nothing to divide by
        return format(a / b, spec) if b else "-"

    for name, cells in table.items():
        m = by_ds[name]
        mine = [r for r in rows if (name == "__all__" or r["dataset"] == name)]
        ok = [r for r in mine if r["error_type"] is None]
        base = [r for r in ok if r["baseline"]]
        gen = sum(r["num_generated_tokens"] for r in ok)
        assert int(cells["rows"]) == m["rows_ok"] == len(ok)
        assert int(cells["errors"]) == m["rows_error"] == len(mine) - len(ok)
        assert int(cells["gen tok"]) == m["generated_tokens"] == gen
        # job tok/s: tokens over the job's wall; engine tok/s: tokens over the engines' seconds
        assert cells["job tok/s"] == ratio(gen, m["wall_seconds"], ".1f")
        assert m["compute_seconds"] == pytest.approx(sum(r["compute_seconds"] for r in ok))
        assert cells["engine tok/s"] == ratio(gen, m["compute_seconds"], ".1f")
        if not base:
            assert cells["gain"] == cells["spec/plain tok/s @width"] == "-" and not ok
            continue
        # the gain: the baseline rows' speculative tok/s over their plain tok/s, at the width they ran at
        spec = sum(r["num_generated_tokens"] for r in base) / sum(r["compute_seconds"] for r in base)
        plain = sum(r["baseline_num_generated_tokens"] for r in base) / sum(r["baseline_compute_seconds"] for r in base)
        width = Counter(r["baseline_width"] for r in base).most_common(1)[0][0]
        assert m["spec_gain"] == pytest.approx(spec / plain) and m["spec_gain_width"] == width
        assert cells["gain"] == f"{spec / plain:.2f}"
        assert cells["spec/plain tok/s @width"] == f"{spec:.1f}/{plain:.1f} @{width}"
        steps = sum(r["steps"] for r in ok)
        assert cells["tau"] == ratio(sum(r["accepted"] for r in ok) + steps, steps)
        assert cells["accept"] == ratio(sum(r["accepted"] for r in ok), sum(r["drafted"] for r in ok))
        checked = [r["baseline_exact_match"] for r in base if r["baseline_exact_match"] is not None]
        assert cells["exact"] == ratio(sum(checked), len(checked))
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge2"])
        f1 = [scorer.score(r["reference"], r["generated_text"] or "")["rouge2"].fmeasure for r in ok if r["reference"]]
        assert cells["rouge2"] == ratio(sum(f1), len(f1), ".3f")
        lskip = sum(r["layerskip_steps"] for r in ok)
        assert cells["ngram/corpus/lskip steps"] == (f"{sum(r['ngram_steps'] for r in ok) / steps:.0%}/"
                                                     f"{sum(r['corpus_steps'] for r in ok) / steps:.0%}/{lskip / steps:.0%}")
        # a skip set only where layer-skip drafts ran
        assert (cells["skip set"] == "-") == (not lskip or name == "__all__" and len(table) > 2)


def test_drafter_auto_job_decides_per_step_and_reports_step_shares(ray_local, tiny_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    ids = write_corpus(corpus, n=6)
    out, costs = tmp_path / "out", tmp_path / "costs.json"
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(out), **{
        "search.drafter": "auto", "search.costs": str(costs), "ray.batch_size": 6, "engine.max_batch": 3,
        "baseline.fraction": 1.0}))
    assert costs.exists()  # the actor measured the cost surface once and cached it for the next run
    rows = _generations(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for r in rows:
        assert r["plain_steps"] + r["ngram_steps"] + r["layerskip_steps"] == r["steps"] > 0
        assert r["baseline"] and r["baseline_num_generated_tokens"] == r["num_generated_tokens"] == 8
    m = {r["dataset"]: r for r in pq.read_table(out / "metrics.parquet").to_pylist()}["__all__"]
    shares = [m[f"{k}_step_share"] for k in ("plain", "ngram", "layerskip")]
    assert all(0.0 <= s <= 1.0 for s in shares) and sum(shares) == pytest.approx(1.0)


def test_resume_after_a_killed_run(ray_local, tiny_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    ids = write_corpus(corpus, n=6)
    out = tmp_path / "out"
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(out)))
    files = sorted((out / "generations").glob("*.parquet"))
    assert len(files) >= 2
    # a killed run: one batch never committed, one half-written temporary file left behind
    kept = {r["id"] for f in files[1:] for r in pq.read_table(f).to_pylist()}
    files[0].unlink()
    (out / "generations" / "batch-x.parquet.tmp-dead").write_bytes(b"PAR1 partial")
    mtimes = {f: f.stat().st_mtime_ns for f in files[1:]}
    # ray.driver_ids=0: the resume filter and the exactly-once check run over hash buckets in Ray tasks (big corpora)
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(out), **{"ray.driver_ids": 0}))
    rows = _generations(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())  # committed batches were not redone
    assert len(kept) < len(ids)
    metrics = {r["dataset"]: r for r in pq.read_table(out / "metrics.parquet").to_pylist()}
    assert metrics["__all__"]["rows_ok"] == 6


def test_a_rerun_with_every_row_committed_says_so(ray_local, tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, n=4)
    out = tmp_path / "out"
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(out)))
    files = {f: f.stat().st_mtime_ns for f in (out / "generations").glob("*.parquet")}
    metrics = (out / "metrics.parquet").read_bytes()
    capsys.readouterr()
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(out)))
    printed = capsys.readouterr().out
    assert printed == "4 of 4 rows already committed; nothing to do; pass output.resume=false to regenerate\n"
    assert {f: f.stat().st_mtime_ns for f in files} == files and (out / "metrics.parquet").read_bytes() == metrics


def test_actor_killed_mid_batch_is_retried(ray_local, tiny_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    ids = write_corpus(corpus, n=6)
    out, marker = tmp_path / "out", tmp_path / "crashed"
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(out), **{"debug.crash_once_marker": str(marker)}))
    assert marker.is_file()  # an actor did die
    rows = _generations(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)


def test_fail_fast_fails_the_job(ray_local, tiny_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "ok", "prompt": "hi"}\n{"id": "bad", "prompt": ""}\n')
    with pytest.raises(Exception, match="fail_fast"):
        _run(ray_local, job_overrides(tiny_dir, str(corpus), str(tmp_path / "out"), fail_fast="true"))


def test_s3_corpus_and_outputs(ray_local, tiny_dir, tmp_path):
    with MotoS3() as server:
        s3 = server.client
        s3.create_bucket(Bucket="corpus")
        ids = write_corpus(tmp_path / "c.jsonl", n=4)
        s3.upload_file(str(tmp_path / "c.jsonl"), "corpus", "in/c.jsonl")
        _run(ray_local, job_overrides(tiny_dir, "s3://corpus/in/", "s3://corpus/out", **server.storage))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="out/")["Contents"]]
        assert "out/metrics.parquet" in keys and "out/run_config.yaml" in keys
        assert "not-a-real-secret" not in s3.get_object(Bucket="corpus", Key="out/run_config.yaml")["Body"].read().decode()
        gen = [k for k in keys if k.startswith("out/generations/") and k.endswith(".parquet")]
        assert gen
        local = tmp_path / "dl"
        local.mkdir()
        got = []
        for k in gen:
            s3.download_file("corpus", k, str(local / os.path.basename(k)))
            got += pq.read_table(local / os.path.basename(k)).column("id").to_pylist()
        assert sorted(got) == sorted(ids)


def test_corpus_index_is_pooled_saved_and_starts_the_next_run_warm(ray_local, tiny_dir, tmp_path):
    """drafter corpus, two actors: the saved index holds every row's output once (pooled from both
    actors); a second run over the same prompts starts from it and drafts from it (a random tiny
    model repeats its greedy outputs exactly); a damaged file is a cold start, then replaced."""
    from conflayers.drafts.corpus import unpack

    corpus = tmp_path / "corpus.jsonl"
    ids = write_corpus(corpus, n=8)
    idx = tmp_path / "indexes"
    common = {"search.drafter": "corpus", "corpus_index.path": str(idx), "ray.concurrency": 2, "ray.num_cpus_per_actor": 0.5,
              "generation.max_tokens": 12, "search.max_draft_len": 4}
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(tmp_path / "run1"), **common))
    first = _generations(tmp_path / "run1")
    files = sorted(idx.glob("*.clsx"))
    assert sorted(f.name.split("-")[0] for f in files) == ["alpha", "beta"]
    saved = {f.name.split("-")[0]: unpack(f.read_bytes())[2] for f in files}
    for d in ("alpha", "beta"):
        want = sorted(r["num_generated_tokens"] for r in first if r["dataset"] == d)
        assert sorted(len(o) for o in saved[d]) == want  # every row once, from both actors
    assert all(r["corpus_steps"] == 0 for r in first if r["id"] == "r0")  # the first row had nothing to copy

    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(tmp_path / "run2"), **common))
    second = {r["id"]: r for r in _generations(tmp_path / "run2")}
    assert sorted(second) == sorted(ids)
    assert {r["id"]: r["generated_text"] for r in first} == {i: r["generated_text"] for i, r in second.items()}
    warm = [r for r in second.values() if r["num_generated_tokens"] > 1]
    assert all(r["corpus_steps"] > 0 for r in warm) and sum(r["accepted"] for r in warm) > 0
    assert all(r["plain_steps"] + r["ngram_steps"] + r["corpus_steps"] + r["layerskip_steps"] == r["steps"]
               for r in second.values())
    assert {f.name: len(unpack(f.read_bytes())[2]) for f in files} == {
        f.name: 2 * len(saved[f.name.split("-")[0]]) for f in files}  # the second run's outputs merged in

    files[0].write_bytes(b"CLSX garbage")
    _run(ray_local, job_overrides(tiny_dir, str(corpus), str(tmp_path / "run3"), **common))
    third = _generations(tmp_path / "run3")
    assert sorted(r["id"] for r in third) == sorted(ids) and not any(r["error_type"] for r in third)
    d = files[0].name.split("-")[0]
    assert len(unpack(files[0].read_bytes())[2]) == sum(r["dataset"] == d for r in third)  # replaced, valid
