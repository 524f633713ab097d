"""Fault injection on the generation job (loopback only, bounded): S3 requests failing transiently
(``tests/flaky_s3.py``: a proxy in front of a moto server fails every 6th request), with an actor
exiting mid-batch in one run and the driver SIGKILLed mid-run then rerun in the other. In every case
the union of the outputs holds every input id exactly once, and the rerun generates only the rows
whose batch was not committed.

Each test records its figures (faults injected, rows checked, lost, duplicated); ``pytest -s`` prints
them as the table in docs/reliability.md ("Fault injection")."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.flaky_s3 import FlakyS3Proxy
from tests.pipeline_helpers import MotoS3, env_with_venv, job_overrides, save_tiny_model, write_corpus

pytestmark = pytest.mark.slow

FIGURES: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def figures_table():
    yield
    if FIGURES:
        print("\n| fault | faults injected | rows checked | rows lost | rows duplicated | rows redone by the rerun |")
        print("|---|---|---|---|---|---|")
        for f in FIGURES:
            print(f"| {f['fault']} | {f['injected']} | {f['checked']} | {f['lost']} | {f['duplicated']} | "
                  f"{f.get('redone', '-')} |")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def account(fault: str, injected, input_ids: list[str], output_ids: list[str], **extra) -> dict:
    """The exactly-once figures of one run: every input id in the outputs once, nothing else; recorded."""
    counts = Counter(output_ids)
    fig = {"fault": fault, "injected": injected, "checked": len(input_ids),
           "lost": sum(1 for i in input_ids if i not in counts),
           "duplicated": sum(n - 1 for n in counts.values()), **extra}
    FIGURES.append(fig)
    assert set(counts) <= set(input_ids), sorted(set(counts) - set(input_ids))
    assert fig["lost"] == 0 and fig["duplicated"] == 0, fig
    return fig


def _main(argv: list[str]) -> None:
    from jobs.generate import main

    assert main(argv) == 0


# -- S3 through a flaky proxy, with an actor exiting mid-batch ---------------------------------------------

def _s3_count(client, bucket: str, prefix: str) -> int:
    objects = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sum(o["Key"].endswith(".parquet") for o in objects)


def _s3_batches(client, bucket: str, prefix: str) -> dict[str, dict]:
    """The committed batch objects, read straight from moto (not through the proxy): key -> ids, etag, mtime."""
    out = {}
    for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        if o["Key"].endswith(".parquet"):
            body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            out[o["Key"]] = {"ids": pq.read_table(io.BytesIO(body), columns=["id"]).column("id").to_pylist(),
                             "etag": o["ETag"], "mtime": o["LastModified"]}
    return out


@contextmanager
def flaky_s3(tmp_path, bucket: str, n: int):
    """A moto server holding an ``n``-row corpus under ``in/``, a flaky proxy in front of it failing every 6th
    request, and the job's storage overrides pointing at the proxy: (server, proxy, ids, storage)."""
    ids = write_corpus(tmp_path / "c.jsonl", n=n)
    with MotoS3() as s3, FlakyS3Proxy(s3.endpoint, fail_every=6) as proxy:
        s3.client.create_bucket(Bucket=bucket)
        s3.client.upload_file(str(tmp_path / "c.jsonl"), bucket, "in/c.jsonl")
        yield s3, proxy, ids, {**s3.storage, "storage.endpoint_url": proxy.endpoint}


S3_FAULTS = "every 6th S3 request fails (503 SlowDown / 500 InternalError / connection dropped before or after S3 acts)"


def test_s3_errors_and_an_actor_exit_lose_and_duplicate_nothing(ray_local, tiny_dir, tmp_path):
    with flaky_s3(tmp_path, "faults", n=12) as (s3, proxy, ids, storage):
        # listing and reading the input, writing batches, metrics and reports, all with S3 errors; the first
        # batch's actor exits mid-batch: Ray restarts it and retries the batch
        marker = tmp_path / "actor-exited"
        _main(job_overrides(tiny_dir, "s3://faults/in/", "s3://faults/out", **storage,
                            **{"debug.crash_once_marker": str(marker)}))
        proxy.wait_idle()
        assert marker.is_file()  # the actor did exit
        assert set(proxy.failed) == {"slowdown", "internal", "drop", "drop_reply"}
        batches = _s3_batches(s3.client, "faults", "out/generations/")
        account(f"{S3_FAULTS}; an actor exits mid-batch", f"{proxy.failed_total} S3 + 1 actor exit", ids,
                [i for b in batches.values() for i in b["ids"]])
        keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket="faults", Prefix="out/")["Contents"]}
        assert {"out/metrics.parquet", "out/skip_sets.json", "out/actors.json", "out/run_config.yaml"} <= keys
        metrics = {m["dataset"]: m for m in pq.read_table(io.BytesIO(s3.client.get_object(
            Bucket="faults", Key="out/metrics.parquet")["Body"].read())).to_pylist()}
        assert metrics["__all__"]["rows_ok"] == len(ids)


# -- a driver killed mid-run, then rerun (S3 still failing) ------------------------------------------------

def _processes_with(env_marker: str) -> list[int]:
    """The live processes whose environment holds ``env_marker`` (Linux ``/proc``)."""
    pids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if env_marker.encode() in f.read().split(b"\0"):
                    pids.append(int(d))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


def _kill_when_committed(argv: list[str], committed, at_least: int, log: Path) -> None:
    """Run ``python -m jobs.generate`` (its own local Ray) and SIGKILL its driver once ``committed()`` counts
    ``at_least`` batches; then end the rest of that run (its local cluster and actors, which Ray puts in process
    groups of their own and which could otherwise still commit a batch), found by an environment marker."""
    marker = f"CONFLAYERS_KILLED_RUN={uuid.uuid4().hex}"
    env = {**env_with_venv(), marker.split("=")[0]: marker.split("=")[1]}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.generate", *argv, "ray.address=local"],
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # a bound on a broken run, not a timing check
        while committed() < at_least:
            assert proc.poll() is None, f"the job ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"fewer than {at_least} batches committed:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)  # the fault
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while pids := _processes_with(marker):  # the killed run's cluster, until none is left
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert time.monotonic() < deadline, f"processes of the killed run still alive: {pids}"
            time.sleep(0.2)


def test_a_driver_killed_mid_run_then_rerun_redoes_only_uncommitted_batches(ray_local, tiny_dir, tmp_path, capsys):
    with flaky_s3(tmp_path, "killed", n=16) as (s3, proxy, ids, storage):  # 8 batches of 2
        argv = job_overrides(tiny_dir, "s3://killed/in/", "s3://killed/out", **storage)
        # the batch holding r15 (the last) hangs, so the killed run cannot finish before it is killed
        hang = ["ray.batch_timeout_s=600", "debug.hang_ids=[r15]"]
        _kill_when_committed(argv + hang, lambda: _s3_count(s3.client, "killed", "out/generations/"), 4,
                             tmp_path / "killed.log")
        proxy.wait_idle()  # a write the dead run sent may still be landing
        before = _s3_batches(s3.client, "killed", "out/generations/")
        committed = sorted(i for b in before.values() for i in b["ids"])
        assert 4 <= len(before) < 8 and "r15" not in committed
        faults_killed = proxy.failed_total

        # the rerun lists and reads the committed outputs through the proxy and generates only the rest
        _main(argv)
        proxy.wait_idle()
        assert f"{len(committed)} id(s) already committed" in capsys.readouterr().err  # the job's own count
        after = _s3_batches(s3.client, "killed", "out/generations/")
        assert all(after[k]["etag"] == b["etag"] and after[k]["mtime"] == b["mtime"] for k, b in before.items())
        redone = sorted(i for k, b in after.items() if k not in before for i in b["ids"])
        assert redone == sorted(set(ids) - set(committed))
        assert faults_killed > 0 and proxy.failed_total > faults_killed
        account(f"driver SIGKILLed mid-run, then rerun; {S3_FAULTS}", f"1 driver kill + {proxy.failed_total} S3",
                ids, [i for b in after.values() for i in b["ids"]],
                redone=f"{len(redone)} (= the {len(ids) - len(committed)} uncommitted)")
