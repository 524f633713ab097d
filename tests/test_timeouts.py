"""``ray.batch_timeout_s``: a hung batch ends its actor, Ray retries it elsewhere, and a batch that hangs
in every attempt becomes ``timeout`` error rows; the job finishes with every id exactly once."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.generate import load_config
from tests.pipeline_helpers import job_overrides, save_tiny_model, write_corpus

pytestmark = pytest.mark.slow


def rows(out: Path) -> dict[str, dict]:
    got = [r for f in sorted((out / "generations").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(got) == len({r["id"] for r in got})  # exactly once
    return {r["id"]: r for r in got}


def test_hung_batches_fail_over_or_become_timeout_rows(ray_local, tmp_path):
    from jobs.generate import main

    model = save_tiny_model(tmp_path / "model")
    ids = write_corpus(tmp_path / "c.jsonl", n=6)
    timing = {"ray.batch_timeout_s": 12, "ray.max_task_retries": 2, "ray.max_restarts": 4,
              "search.drafter": "none", "baseline.min_per_dataset": 0}

    # hangs once: the retry (a restarted actor) finishes it; every row generated
    once = tmp_path / "once"
    assert main(job_overrides(model, str(tmp_path / "c.jsonl"), str(once), **timing,
                              **{"ray.batch_attempts": 2, "debug.hang_once_marker": str(tmp_path / "hung-once")})) == 0
    assert (tmp_path / "hung-once").exists()  # it did hang
    got = rows(once)
    assert sorted(got) == sorted(ids) and not any(r["error_type"] for r in got.values())

    # hangs in every attempt: its two rows become timeout error rows, the rest are generated
    always = tmp_path / "always"
    assert main(job_overrides(model, str(tmp_path / "c.jsonl"), str(always), **timing,
                              **{"ray.batch_attempts": 1, "debug.hang_ids": "[r2]"})) == 0
    got = rows(always)
    assert sorted(got) == sorted(ids)
    timed_out = sorted(i for i, r in got.items() if r["error_type"] == "timeout")
    assert "r2" in timed_out and len(timed_out) == 2  # r2 and its batch mate (ray.batch_size=2)
    assert "ray.batch_timeout_s=12 s in 1 attempt(s)" in got["r2"]["error_message"]
    assert all(r["error_type"] is None and r["num_generated_tokens"] for i, r in got.items() if i not in timed_out)
    metrics = {m["dataset"]: m for m in pq.read_table(always / "metrics.parquet").to_pylist()}
    assert metrics["__all__"]["rows_error"] == 2 and metrics["__all__"]["rows_ok"] == 4


def test_timeout_settings_are_checked():
    with pytest.raises(ValueError, match="ray.batch_timeout_s: must be > 0 seconds or null"):
        load_config(None, ["ray.batch_timeout_s=0"])
    with pytest.raises(ValueError, match=r"ray.batch_attempts: must be <= ray.max_task_retries \(1\)"):
        load_config(None, ["ray.batch_timeout_s=60", "ray.batch_attempts=2", "ray.max_task_retries=1"])
