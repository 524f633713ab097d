"""The summarization job's parts without Ray: the schedule, the run lock, the manifest, reading
documents (good and bad), and config errors that name their key."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.summarize.documents import list_documents, read_documents
from pipeline.summarize.lock import RunLock
from pipeline.summarize.manifest import Manifest
from pipeline.summarize.schedule import Schedule, parse_run_id, run_id
from pipeline.summarize.run import RUN_SCHEMA, SummarizeConfig, missed_ticks, run_tick, validate_summarize

UTC = timezone.utc


def test_schedule_ticks_in_a_timezone_and_lists_missed_ones():
    s = Schedule("0 9 * * 1-5", "Europe/Berlin")  # 09:00 Berlin on weekdays
    friday_evening = datetime(2026, 11, 27, 18, 0, tzinfo=UTC)
    nxt = s.next_after(friday_evening)
    assert nxt.astimezone(UTC) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)  # Monday, CET = UTC+1
    assert s.latest_at(nxt) == nxt and s.latest_at(friday_evening).astimezone(UTC).hour == 8
    hourly = Schedule("0 * * * *")
    due = hourly.due(datetime(2026, 11, 26, 1, 0, tzinfo=UTC), datetime(2026, 11, 26, 4, 30, tzinfo=UTC))
    assert [t.hour for t in due] == [2, 3, 4]
    assert hourly.due(datetime(2026, 11, 26, 1, 0, tzinfo=UTC), datetime(2026, 11, 27, 1, 0, tzinfo=UTC), limit=5)[-1].hour == 6
    assert run_id(due[0]) == "20261126T020000Z" and parse_run_id(run_id(due[0])) == due[0]


@pytest.mark.parametrize("cron, tz, key", [("0 * * *", "UTC", "schedule.cron"), ("61 * * * *", "UTC", "schedule.cron"),
                                           ("every hour", "UTC", "schedule.cron"),
                                           ("0 * * * *", "Mars/Olympus", "schedule.timezone")])
def test_a_bad_cron_expression_or_timezone_is_an_error_naming_the_key(cron, tz, key):
    cfg = SummarizeConfig()
    cfg.schedule.cron, cfg.schedule.timezone = cron, tz
    with pytest.raises(ValueError, match=key):
        validate_summarize(cfg)


@pytest.mark.parametrize("key, value", [("input.on_change", "sometimes"), ("input.on_too_long", "explode"),
                                        ("input.max_docs_per_run", 0), ("summary.template", "no placeholder"),
                                        ("summary.template", "{document} and {other}"),
                                        ("schedule.concurrency", "allow"), ("generation.max_tokens", 0)])
def test_bad_job_settings_name_their_key(key, value):
    cfg = SummarizeConfig()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_summarize(cfg)


def test_the_lock_is_exclusive_expires_and_can_be_replaced(tmp_path):
    path = str(tmp_path / "state" / "lock.json")
    first = RunLock(None, path, ttl_s=1.0, run_id="A")
    assert first.acquire() == (True, "acquired")
    second = RunLock(None, path, ttl_s=1.0, run_id="B")
    held, why = second.acquire("forbid")
    assert not held and "run A" in why and "forbid" in why
    first._stop.set()  # the holder dies: nobody renews its lease
    time.sleep(1.2)
    held, why = second.acquire("forbid")
    assert held and "expired lock of run A" in why
    assert not first.still_held() and second.still_held()
    third = RunLock(None, path, ttl_s=30.0, run_id="C")
    held, why = third.acquire("replace")  # a live lock, taken over on purpose
    assert held and "live lock of run B" in why and not second.still_held()
    second.release()  # a run that lost its lock does not delete the new holder's
    assert third.still_held()
    third.release()
    assert not (tmp_path / "state" / "lock.json").exists()


def test_a_tick_is_skipped_while_another_run_holds_the_lock(tmp_path):
    cfg = SummarizeConfig()
    cfg.output.path = str(tmp_path / "out")
    other = RunLock(None, str(tmp_path / "out" / "state" / "lock.json"), ttl_s=60, run_id="20261126T000000Z")
    assert other.acquire()[0]
    try:
        row = run_tick(cfg, datetime(2026, 11, 26, 1, tzinfo=UTC))  # returns before it needs Ray or a model
        assert row["status"] == "skipped" and "20261126T000000Z" in row["message"]
        assert not (tmp_path / "out" / "runs.parquet").exists() and not (tmp_path / "out" / "runs").exists()
    finally:
        other.release()


def _docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("The first article.")
    (d / "b.md").write_text("# Second\n\nThe second article.")
    (d / "t.jsonl").write_text(json.dumps({"id": "x", "text": "Row x.", "reference": "x"}) + "\n"
                               + json.dumps({"text": "Row two."}) + "\n")
    (d / "notes.pdf").write_bytes(b"%PDF-1.4")
    return d


def test_documents_are_read_per_file_and_per_record(tmp_path):
    d = _docs(tmp_path)
    files, ignored = list_documents(None, str(d))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.txt", "b.md", "t.jsonl"] and ignored[0].endswith("notes.pdf")
    docs = [doc for f in files for doc in read_documents(None, f, "text", "id", "reference")]
    assert [doc.key.rsplit("/", 1)[-1] for doc in docs] == ["a.txt", "b.md", "t.jsonl#x", "t.jsonl#1"]
    assert docs[2].reference == "x" and docs[3].reference is None and not any(doc.error_type for doc in docs)
    again = read_documents(None, files[0])
    assert again[0].fingerprint == docs[0].fingerprint
    (d / "a.txt").write_text("The first article, edited.")
    assert read_documents(None, files[0])[0].fingerprint != docs[0].fingerprint


def test_bad_documents_become_error_documents(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x01 not text")
    (d / "nul.md").write_text("text\x00with a NUL")
    (d / "empty.txt").write_text("   \n")
    (d / "gone.txt").symlink_to(d / "missing-target.txt")  # listed, but cannot be read
    (d / "broken.parquet").write_bytes(b"PAR1 truncated")
    (d / "rows.jsonl").write_text('{"text": 5}\n{not json\n{"body": "no text field"}\n')
    files, _ = list_documents(None, str(d))
    docs = {doc.key.rsplit("/", 1)[-1]: doc for f in files for doc in read_documents(None, f)}
    kinds = {k: doc.error_type for k, doc in docs.items()}
    assert kinds == {"binary.txt": "not_text", "nul.md": "not_text", "empty.txt": "empty_document",
                     "gone.txt": "unreadable", "broken.parquet": "unreadable", "rows.jsonl#0": "not_text",
                     "rows.jsonl#1": "malformed_json", "rows.jsonl#2": "empty_document"}
    assert all(doc.error_message and doc.fingerprint.startswith("error:") for doc in docs.values())


def test_the_manifest_takes_new_and_changed_documents(tmp_path):
    d = _docs(tmp_path)
    files, _ = list_documents(None, str(d))
    docs = [doc for f in files for doc in read_documents(None, f)]
    m = Manifest()
    todo, unchanged, ignored = m.pending(docs)
    assert [v for _, v in todo] == [1, 1, 1, 1] and unchanged == ignored == 0
    rows = [{"id": doc.key, "source": doc.source, "row_id": doc.row_id, "fingerprint": doc.fingerprint,
             "version": v, "error_type": None} for doc, v in todo]
    assert m.record(rows, "R1") == 4 and m.record(rows, "R1-again") == 0  # a version is recorded once
    path = str(tmp_path / "state" / "manifest.parquet")
    m.save(None, path)
    m = Manifest.load(None, path)
    assert m.run_ids == {"R1"} and pq.read_table(path).num_rows == 4
    (d / "a.txt").write_text("Edited.")
    docs = [doc for f in files for doc in read_documents(None, f)]
    todo, unchanged, ignored = m.pending(docs, "resummarize")
    assert [(doc.key.rsplit("/", 1)[-1], v) for doc, v in todo] == [("a.txt", 2)] and unchanged == 3
    todo, unchanged, ignored = m.pending(docs, "ignore")
    assert todo == [] and ignored == 1
    with pytest.raises(ValueError, match="input.on_change"):
        m.pending(docs, "maybe")


def test_catch_up_lists_the_ticks_missed_since_the_last_run(tmp_path):
    cfg = SummarizeConfig()
    cfg.output.path = str(tmp_path)
    cfg.schedule.max_catch_up = 3
    hourly, now = Schedule("0 * * * *"), datetime(2026, 11, 26, 8, 30, tzinfo=UTC)
    assert missed_ticks(cfg, hourly, now) == []  # no run yet: nothing to catch up
    rows = [dict.fromkeys(RUN_SCHEMA.names, None) | {"run_id": rid, "status": st}
            for rid, st in [("20261126T010000Z", "ok"), ("20261126T020000Z", "skipped")]]
    pq.write_table(pa.Table.from_pylist(rows, schema=RUN_SCHEMA), tmp_path / "runs.parquet")
    # ticks 02:00 .. 08:00 were missed (a skipped tick did not run); the 3 latest are run
    assert [t.hour for t in missed_ticks(cfg, hourly, now)] == [6, 7, 8]
