"""The coordinator is advice: its loss or slowness costs speed, never rows or the job.

On a local Ray with a tiny model: the coordinator's process SIGKILLed mid-job (two generation
actors, corpus drafts on, so the pool is in play), SIGKILLed during the driver's final merge
(``debug.kill_coordinator_at=merge``), and a coordinator whose first read hangs for ten minutes
(``debug.coordinator_hang_s``) under a batch timeout shorter than that. Each run must succeed with
every input id exactly once and metrics equal to the generations, the saved corpus index must hold
the run's outputs, and the driver must warn, naming what was lost. Without Ray: a retried batch whose
file is committed is read back, not generated again. Ray internals used: ``tests/ray_internals.py``."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import ray_internals as ri
from tests.pipeline_helpers import job_overrides, save_tiny_model, write_corpus


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tied=False)  # writes words: outputs differ


def _cfg(tiny_dir, tmp_path, n: int, **extra):
    from jobs.generate import load_config

    ids = write_corpus(tmp_path / "c.jsonl", n=n)
    o = job_overrides(tiny_dir, str(tmp_path / "c.jsonl"), str(tmp_path / "out"), **{
        "search.drafter": "corpus", "corpus_index.path": str(tmp_path / "corpus"), "progress.interval_s": 0, **extra})
    return load_config(None, o), ids


def _generations(out: Path) -> list[dict]:
    return [r for f in sorted((out / "generations").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def _check_outputs(metrics: list[dict], out: Path, ids: list[str], tiny_key_outputs: int | None = None) -> list[dict]:
    """Every id exactly once, no error rows, the metrics equal to the generations, the saved corpus
    index holding every generated output (the pool lives in storage: the coordinator's loss loses none)."""
    rows = _generations(out)
    assert Counter(r["id"] for r in rows) == Counter(ids)
    assert all(r["error_type"] is None for r in rows), [r["error_message"] for r in rows if r["error_type"]]
    m = {x["dataset"]: x for x in metrics}["__all__"]
    assert m["rows_ok"] == len(ids) and m["rows_error"] == 0
    assert m["generated_tokens"] == sum(r["num_generated_tokens"] for r in rows)
    saved = {m["dataset"]: m for m in pq.read_table(out / "metrics.parquet").to_pylist()}
    assert saved["__all__"]["generated_tokens"] == m["generated_tokens"]
    return rows


def _saved_outputs(corpus: Path) -> int:
    from conflayers.drafts.corpus import unpack

    return sum(len(unpack(f.read_bytes())[2]) for f in corpus.glob("*.clsx"))


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.slow
def test_the_coordinator_sigkilled_mid_job_costs_no_row(ray_local, tiny_dir, tmp_path, caplog):
    """Two actors; once a batch is committed the coordinator's process is SIGKILLed. Ray restarts it,
    the actors re-send their state to the new one, and the job finishes with every row once."""
    import os
    import signal

    from pipeline.run import run

    cfg, ids = _cfg(tiny_dir, tmp_path, 24, **{"ray.concurrency": 2, "ray.num_cpus_per_actor": 1,
                                               "generation.max_tokens": 48})
    gen = tmp_path / "out" / "generations"
    result: dict = {}
    caplog.set_level(logging.WARNING, logger="pipeline")

    def job():
        try:
            result["metrics"] = run(cfg)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    deadline = time.monotonic() + 300  # a bound on a broken run, not a timing check
    while not (gen.exists() and any(gen.glob("*.parquet"))):
        assert t.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.1)
    killed = ri.actor_pids("Coordinator")
    memory = ri.memory_in_use()  # both actors are up: what they declared to Ray
    assert len(killed) == 1, killed
    os.kill(next(iter(killed.values())), signal.SIGKILL)  # the fault: as the OOM killer would
    committed_at_kill = len(list(gen.glob("*.parquet")))
    t.join(300)
    assert not t.is_alive() and "error" not in result, result.get("error")
    assert committed_at_kill < len(ids) // 2  # the kill came mid-job
    _check_outputs(result["metrics"], tmp_path / "out", ids)
    assert _saved_outputs(tmp_path / "corpus") == len(ids)  # pooled before and after the kill: all saved
    assert "coordinator restarted during the run" in _warnings(caplog)
    # the actors told Ray their memory (model + KV budget + runtime each), so Ray Data has no 0 B request to warn about
    assert memory > 2 * 2**30, memory


@pytest.mark.slow
def test_the_coordinator_sigkilled_during_the_final_merge(ray_local, tiny_dir, tmp_path, caplog):
    """The coordinator dies after the last batch, before the driver reads it: the skip sets come from the
    generations (unsettled: the registry is not fed), actors.json from the rows, and a warning says so."""
    from pipeline.run import run

    cfg, ids = _cfg(tiny_dir, tmp_path, 6, **{"debug.kill_coordinator_at": "merge"})
    caplog.set_level(logging.WARNING, logger="pipeline")
    metrics = run(cfg)
    rows = _check_outputs(metrics, tmp_path / "out", ids)
    assert _saved_outputs(tmp_path / "corpus") == len(ids)
    assert not (tmp_path / "out" / "corpus_pool").exists()  # merged, then removed: a rerun cannot merge it twice
    text = _warnings(caplog)
    assert "SIGKILLing the coordinator" in text
    assert "skip-set statistics of dataset(s) alpha, beta" in text and "start-up info of 1 actor(s)" in text
    sets = json.loads((tmp_path / "out" / "skip_sets.json").read_text())["datasets"]
    used = {d: Counter(tuple(r["skip_set"] or ()) for r in rows if r["dataset"] == d).most_common(1)[0][0]
            for d in ("alpha", "beta")}
    assert {d: tuple(s["skip_set"]) for d, s in sets.items()} == used  # each dataset's most used set
    assert all(s["from_generations"] and not s["settled"] for s in sets.values())
    actors = json.loads((tmp_path / "out" / "actors.json").read_text())
    assert set(actors) == {r["actor_id"] for r in rows}


@pytest.mark.slow
def test_a_hung_coordinator_slows_no_batch_past_its_timeout(ray_local, tiny_dir, tmp_path, caplog, capsys):
    """The coordinator's first read sleeps 10 minutes (every call after it waits in its mailbox). Each
    batch must finish within ray.batch_timeout_s=60 (else its actor is ended and, twice over, its
    rows written as timeout error rows): actors wait at most ray.coordinator_timeout_s, then run on
    their own state. The progress display, which the coordinator never answers, counts the batches
    the driver received."""
    from pipeline.run import run

    cfg, ids = _cfg(tiny_dir, tmp_path, 8, **{"debug.coordinator_hang_s": 600, "ray.coordinator_timeout_s": 1,
                                              "ray.batch_timeout_s": 60, "progress.interval_s": 3600})
    caplog.set_level(logging.WARNING, logger="pipeline")
    metrics = run(cfg)
    _check_outputs(metrics, tmp_path / "out", ids)
    attempts = [json.loads(f.read_text())["attempts"] for f in (tmp_path / "out" / "attempts").glob("*.json")]
    assert attempts and set(attempts) == {1}  # no batch timed out, none was retried
    assert _saved_outputs(tmp_path / "corpus") == len(ids)
    assert "did not answer at the end of the run" in _warnings(caplog)
    assert "progress: 8/8 rows (100%), 0 errors" in capsys.readouterr().err  # the last line, drawn at the end


def test_advice_waits_at_most_its_timeout_then_leaves_the_coordinator_alone(ray_local):
    """A real coordinator whose first read hangs: the bounded read gives up after its timeout, the next
    calls are skipped at once while it is marked down, and after ``retry_s`` it is asked again."""
    import ray

    from pipeline.advice import Advice
    from pipeline.coordinator import Coordinator

    clock = [0.0]
    handle = ray.remote(num_cpus=0)(Coordinator).remote(hang_s=3.0)
    try:
        a = Advice(handle, timeout_s=0.5, retry_s=30.0, clock=lambda: clock[0])
        t0 = time.monotonic()
        assert a.ask("surface", "cpu") is None and not a.up  # timed out: down
        a.send("put_surface", "cpu", {"w": 1})  # skipped, not queued behind the hung handler
        assert a.ask("surface", "cpu") is None
        a.prefetch("actor", ["d"], {}, 100)
        assert a.pending is None
        assert time.monotonic() - t0 < 2.5  # one timeout's wait, then nothing (the handler sleeps 3 s)
        clock[0] += 31  # retry_s later it is asked again; by then the handler has woken up
        time.sleep(3.0)
        assert a.up and a.ask("surface", "cpu") is None  # answered: no surface stored (the put was skipped)
        a.send("put_surface", "cpu", {"w": 1})
        assert a.ask("surface", "cpu") == {"w": 1}
        restarted = []
        a.on_restart = lambda: restarted.append(True)
        a.prefetch("actor", ["d"], {}, 100)
        got = a.arrived(wait_s=5)
        assert got["best"] == {"d": None} and not restarted  # the first epoch seen is no restart
        a.epoch = "an-earlier-epoch"
        a.prefetch("actor", ["d"], {}, 100)
        assert a.arrived(wait_s=5) is not None and restarted == [True]
    finally:
        ray.kill(handle)


def test_a_retried_batch_whose_file_is_committed_is_read_back_not_generated(tiny_dir, tmp_path):
    """The first attempt commits the batch; the retry (its result lost with a node) finds the file and
    returns it: same rows, the file untouched, no engine needed (it is gone)."""
    from jobs.generate import load_config
    from pipeline.actor import GenerationActor, batch_file_name
    from pipeline.run import INPUT_SCHEMA

    cfg = load_config(None, job_overrides(tiny_dir, "unused", str(tmp_path / "out"),
                                          **{"model.device": "cpu", "engine.threads": 1}))
    rows = [{"id": f"r{i}", "dataset": "alpha", "prompt": f"Tell me fact {i}.", "messages": None, "reference": None,
             "max_tokens": None, "error_type": None, "error_message": None} for i in range(3)]
    batch = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    actor = GenerationActor(cfg)
    first = actor(batch)
    path = tmp_path / "out" / "generations" / batch_file_name([r["id"] for r in rows])
    stamp = path.stat().st_mtime_ns
    actor.engine = None  # a retry that generated again would fail here
    again = actor(batch)
    assert again.to_pylist() == first.to_pylist() and path.stat().st_mtime_ns == stamp
    assert actor.committed[path.name] == (3, sum(r["num_generated_tokens"] for r in first.to_pylist()), 0)


def test_the_pool_in_storage_works_on_s3_too():
    """Pooled files written, read back by address and read newest first by the driver, on S3 (moto)."""
    from jobs.generate import load_config
    from pipeline.corpus_pool import read_batch, read_pool, write_batch
    from tests.pipeline_helpers import MotoS3

    with MotoS3() as s3:
        s3.client.create_bucket(Bucket="pool")
        cfg = load_config(None, [f"{k}={v}" for k, v in {**s3.storage, "output.path": "s3://pool/out"}.items()])
        a = write_batch(cfg, "batch-a.parquet", "k", {"d": [[1, 2, 3]]})
        time.sleep(1.1)  # S3's LastModified has one-second resolution
        b = write_batch(cfg, "batch-b.parquet", "k", {"d": [[4, 5]], "e": [[6]]})
        assert a == "s3://pool/out/corpus_pool/batch-a.parquet"
        assert [list(o) for o in read_batch(cfg, b, "d", "k")] == [[4, 5]]
        assert read_pool(cfg, cap=100) == {"d": ("k", [[1, 2, 3], [4, 5]]), "e": ("k", [[6]])}
        assert read_pool(cfg, cap=4) == {"d": ("k", [[4, 5]]), "e": ("k", [[6]])}  # the newest that fit
