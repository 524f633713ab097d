"""The scheduled summarization job end to end on a local Ray with a tiny random model: ticks over a
growing folder (and an S3 prefix on a moto server), exactly once across runs, edited documents,
bad documents, and a driver killed before and after its commit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conflayers.drafts.corpus import unpack
from tests.pipeline_helpers import MotoS3, env_with_venv, job_overrides, save_tiny_model

pytestmark = pytest.mark.slow

LONG = " ".join(f"Sentence {i} of a long article about the harbour." for i in range(80))  # > the tiny context


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # writes (random) words
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tied=False)


@pytest.fixture(scope="module")
def echo_dir(tmp_path_factory):  # echoes the chat prompt's last token: its summaries are newlines
    return save_tiny_model(tmp_path_factory.mktemp("echo") / "model", tied=True)


def overrides(tiny_dir, docs, out, **extra) -> list[str]:
    o = job_overrides(tiny_dir, str(docs), str(out), **{"search.drafter": "auto", "search.searcher": "none",
                                                          "schedule.lock_ttl_s": 2, **extra})
    return [x for x in o if not x.startswith(("search.skip_layers", "search.stop_threshold"))]


def tick(argv: list[str], when: str) -> None:
    from jobs.summarize import main

    assert main(["--tick", when, *argv]) == 0


def summaries(out) -> list[dict]:
    from pipeline.summarize.run import SummarizeConfig, read_summaries

    cfg = SummarizeConfig()
    cfg.output.path = str(out)
    return read_summaries(cfg).to_pylist()


def runs(out) -> list[dict]:
    return pq.read_table(Path(out) / "runs.parquet").to_pylist()


def test_ticks_summarize_each_document_once_and_redo_edits(ray_local, tiny_dir, tmp_path, capsys):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    (docs / "a.txt").write_text("The council closed the bridge to cars.")
    (docs / "b.md").write_text("# Library\n\nThe library opens late on weekdays.")
    (docs / "long.txt").write_text(LONG)
    (docs / "empty.txt").write_text("")
    (docs / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    argv = overrides(tiny_dir, docs, out)
    tick(argv, "2026-11-26T01:00:00Z")
    first = summaries(out)
    by = {r["id"].rsplit("/", 1)[-1]: r for r in first}
    assert sorted(by) == ["a.txt", "b.md", "bin.txt", "empty.txt", "long.txt"]
    assert by["long.txt"]["truncated"] and not by["a.txt"]["truncated"]
    assert by["empty.txt"]["error_type"] == "empty_document" and by["bin.txt"]["error_type"] == "not_text"
    for k in ("a.txt", "b.md", "long.txt"):
        r = by[k]
        assert r["error_type"] is None and r["summary"].strip() and r["num_generated_tokens"] > 0 and r["version"] == 1
        assert r["compression_ratio"] == pytest.approx(r["num_document_tokens"] / r["num_generated_tokens"])
        assert r["hit_budget"] == (r["num_generated_tokens"] == 8)
    assert "20261126T010000Z" in capsys.readouterr().out  # the run table is printed
    # the tick's summaries are the next tick's corpus index (drafter auto): the outputs of the 3 summaries
    (index,) = (out / "state" / "corpus").glob("summarize-*.clsx")
    assert sorted(map(len, unpack(index.read_bytes())[2])) == sorted(by[k]["num_generated_tokens"]
                                                                     for k in ("a.txt", "b.md", "long.txt"))

    # documents land between ticks: only they are summarized
    (docs / "c.jsonl").write_text(json.dumps({"id": "c1", "text": "Trains run late on Fridays.",
                                              "reference": "Late trains on Fridays."}) + "\n")
    tick(argv, "2026-11-26T02:00:00Z")
    second = [r for r in summaries(out) if r["run_id"] == "20261126T020000Z"]
    assert [r["id"].rsplit("/", 1)[-1] for r in second] == ["c.jsonl#c1"] and second[0]["rouge2"] is not None
    assert len(unpack(index.read_bytes())[2]) == 4  # ... and grows tick by tick

    # nothing changed: the tick does nothing
    tick(argv, "2026-11-26T03:00:00Z")
    assert len(summaries(out)) == 6
    assert runs(out)[-1]["status"] == "no_new_documents" and runs(out)[-1]["docs_new"] == 0

    # an edited document is a new version under resummarize, left alone under ignore
    (docs / "a.txt").write_text("The council reopened the bridge to cars.")
    tick(argv + ["input.on_change=ignore"], "2026-11-26T04:00:00Z")
    assert len(summaries(out)) == 6 and runs(out)[-1]["docs_skipped"] == 1
    tick(argv, "2026-11-26T05:00:00Z")
    redone = [r for r in summaries(out) if r["run_id"] == "20261126T050000Z"]
    assert [(r["id"].rsplit("/", 1)[-1], r["version"]) for r in redone] == [("a.txt", 2)]
    versions = {(r["id"], r["version"]) for r in summaries(out)}
    assert len(versions) == len(summaries(out)) == 7  # every document version exactly once
    # the same tick again: already committed, not redone
    tick(argv, "2026-11-26T05:00:00Z")
    assert len(summaries(out)) == 7
    assert [r["status"] for r in runs(out)] == ["ok_with_errors", "ok", "no_new_documents", "no_new_documents", "ok"]


def test_too_long_documents_can_be_error_rows_max_docs_defers_and_a_dead_actor_is_retried(ray_local, tiny_dir, tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    (docs / "long.txt").write_text(LONG)
    for i in range(3):
        (docs / f"s{i}.txt").write_text(f"Short note number {i}.")
    argv = overrides(tiny_dir, docs, out, **{"input.on_too_long": "error", "input.max_docs_per_run": 3})
    marker = tmp_path / "crashed"  # and a generation actor dies on its first batch: Ray restarts it, retries the batch
    tick(argv + [f"debug.crash_once_marker={marker}"], "2026-11-26T01:00:00Z")
    assert marker.is_file()
    assert runs(out)[-1]["docs_new"] == 4 and runs(out)[-1]["docs_skipped"] == 1
    tick(argv, "2026-11-26T02:00:00Z")
    rows = {r["id"].rsplit("/", 1)[-1]: r for r in summaries(out)}
    assert sorted(rows) == ["long.txt", "s0.txt", "s1.txt", "s2.txt"]
    assert rows["long.txt"]["error_type"] == "too_long" and "on_too_long" in rows["long.txt"]["error_message"]


def test_whitespace_summaries_are_empty_summary_rows(ray_local, echo_dir, tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    (docs / "a.txt").write_text("The council closed the bridge to cars.")
    tick(overrides(echo_dir, docs, out), "2026-11-26T01:00:00Z")
    [row] = summaries(out)
    assert row["error_type"] == "empty_summary" and row["summary"] == "" and row["num_generated_tokens"] == 8
    assert row["hit_budget"] and runs(out)[-1]["status"] == "ok_with_errors"


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_a_driver_killed_around_its_commit_loses_and_duplicates_nothing(ray_local, tiny_dir, tmp_path, point):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"Document {i} says something about the river.")
    argv = overrides(tiny_dir, docs, out)
    killed = subprocess.run([sys.executable, "-m", "jobs.summarize", "--tick", "2026-11-26T01:00:00Z", *argv,
                             f"debug.driver_exit_at={point}", "ray.address=local"],
                            env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    run = out / "runs" / "20261126T010000Z"
    assert (run / "summaries" / "part-0.parquet").exists() == (point == "after_commit")
    batches = {f: f.stat().st_mtime_ns for f in (run / "work" / "generations").glob("*.parquet")}
    assert batches  # the killed run had generated (and committed) its batches
    assert (out / "state" / "lock.json").exists()  # the dead driver's lock is left behind ...
    time.sleep(2.5)  # ... and is stale after its TTL
    tick(argv, "2026-11-26T02:00:00Z")
    rows = summaries(out)
    assert sorted(r["id"].rsplit("/", 1)[-1] for r in rows) == [f"d{i}.txt" for i in range(4)]
    assert {r["run_id"] for r in rows} == {"20261126T010000Z"}  # committed once, under the killed run's id
    assert {f: f.stat().st_mtime_ns for f in batches} == batches  # no batch was generated again
    statuses = {r["run_id"]: r["status"] for r in runs(out)}
    first = "recovered" if point == "after_commit" else "resumed"
    assert statuses == {"20261126T010000Z": first, "20261126T020000Z": "no_new_documents"}


def test_s3_prefix_two_ticks(ray_local, tiny_dir, tmp_path):
    with MotoS3() as server:
        s3 = server.client
        s3.create_bucket(Bucket="news")
        s3.put_object(Bucket="news", Key="in/one.txt", Body=b"The first story.")
        argv = overrides(tiny_dir, "s3://news/in/", "s3://news/out", **server.storage)
        tick(argv, "2026-11-26T01:00:00Z")
        s3.put_object(Bucket="news", Key="in/two.md", Body=b"The second story.")
        tick(argv, "2026-11-26T02:00:00Z")
        tick(argv, "2026-11-26T03:00:00Z")
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="news", Prefix="out/")["Contents"])
        parts = [k for k in keys if k.endswith("summaries/part-0.parquet")]
        assert parts == ["out/runs/20261126T010000Z/summaries/part-0.parquet",
                         "out/runs/20261126T020000Z/summaries/part-0.parquet"]
        assert "out/state/manifest.parquet" in keys and "out/runs.parquet" in keys
        assert "out/state/lock.json" not in keys  # released
        got = []
        for k in parts:
            local = tmp_path / k.replace("/", "_")
            s3.download_file("news", k, str(local))
            got += [r["id"] for r in pq.read_table(local).to_pylist()]
        assert sorted(got) == ["s3://news/in/one.txt", "s3://news/in/two.md"]
        assert b"not-a-real-secret" not in s3.get_object(Bucket="news", Key="out/run_config.yaml")["Body"].read()
