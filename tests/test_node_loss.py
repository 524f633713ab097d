"""Nodes that disappear mid-job, on a multi-node Ray cluster on one machine.

A head with no CPUs runs the driver and the coordinator (pinned to the driver's node,
``pipeline.coordinator.start_coordinator``); worker nodes of 2 CPUs run the generation actors
(``ray.concurrency=2``, 1 CPU each, so each node keeps a CPU for the read tasks). A worker node
that holds a generation actor is killed outright (raylet and every process on it) once the job
has committed a batch. Each scenario checks: every input id exactly once in the outputs, the
batch files committed before the loss still there (one whose result the lost node had not handed
back yet may be redone and rewritten under its own name, the same rows: counted), the metrics
consistent with the generations, and how long the job took to finish after the loss (the figures in
docs/reliability.md, printed with ``pytest -s``). Ray internals used: ``tests/ray_internals.py``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import ray_internals as ri
from tests.pipeline_helpers import job_overrides, save_tiny_model, write_corpus

pytestmark = pytest.mark.slow

ROWS = 24
FIGURES: list[dict] = []


@pytest.fixture(scope="module")
def cluster():
    c = ri.start_cluster(workers=3, cpus_per_worker=2)
    yield c
    ri.stop_cluster(c)
    for f in FIGURES:
        print("node loss:", f)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tied=False)  # writes words: summaries not empty


def overrides(tiny_dir, corpus, out, **extra):
    return job_overrides(tiny_dir, str(corpus), str(out), **{
        "ray.concurrency": 2, "ray.num_cpus_per_actor": 1, "generation.max_tokens": 48, "progress.interval_s": 0,
        **extra})


def committed(gen: Path) -> dict[Path, int]:
    return {f: f.stat().st_mtime_ns for f in gen.glob("*.parquet")} if gen.exists() else {}


def run_losing_a_node(cluster, job, gen: Path, after_loss=None, lose=None) -> dict:
    """Run ``job()`` in a thread; once a batch is committed kill a worker node that holds a generation
    actor (``lose(node)``, default at once), then ``after_loss()``; returns the figures."""
    result: dict = {}

    def target():
        try:
            result["value"] = job()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while not committed(gen) and thread.is_alive():
        time.sleep(0.1)
    assert thread.is_alive(), f"the job ended before a batch was committed: {result}"
    victim = ri.node_of_a_generation_actor(cluster)
    before = committed(gen)
    t_loss = time.monotonic()
    (lose or (lambda node: ri.remove_node(cluster, node)))(victim)
    if after_loss:
        after_loss()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the job did not finish within 300 s of losing a node"
    assert "error" not in result, f"the job failed after losing a node: {result.get('error')!r}"
    after = committed(gen)
    assert set(before) <= set(after), "a batch committed before the loss was removed"
    # a batch whose file landed but whose result the lost node never handed back is redone by Ray and its file
    # rewritten under the same name (the name is a hash of its ids: the same rows, never a second copy)
    rewritten = sum(after[f] != t for f, t in before.items())
    return {"value": result["value"], "committed_before_loss": len(before), "rewritten_same_ids": rewritten,
            "recovery_s": round(time.monotonic() - t_loss, 1)}


def exactly_once(gen: Path, ids: list[str]) -> list[dict]:
    rows = [r for f in sorted(gen.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    got = [r["id"] for r in rows]
    assert sorted(got) == sorted(ids), (f"lost {sorted(set(ids) - set(got))}, "
                                        f"duplicated {sorted(i for i in set(got) if got.count(i) > 1)}")
    return rows


def check_metrics(metrics: list[dict], rows: list[dict]) -> None:
    m = {r["dataset"]: r for r in metrics}["__all__"]
    ok = [r for r in rows if r["error_type"] is None]
    assert m["rows_ok"] == len(ok) == ROWS and m["rows_error"] == 0
    assert m["generated_tokens"] == sum(r["num_generated_tokens"] for r in ok)


def generation_job(cluster, tiny_dir, tmp_path, name: str, after_loss=None, lose=None):
    from jobs.generate import load_config
    from pipeline.run import run

    ids = write_corpus(tmp_path / "c.jsonl", n=ROWS)
    out = tmp_path / "out"
    cfg = load_config(None, overrides(tiny_dir, tmp_path / "c.jsonl", out))
    fig = run_losing_a_node(cluster, lambda: run(cfg), out / "generations", after_loss, lose)
    rows = exactly_once(out / "generations", ids)
    check_metrics(fig["value"], rows)
    FIGURES.append({"scenario": name, "rows": ROWS, "lost": 0, "duplicated": 0,
                    "committed_before_loss": fig["committed_before_loss"],
                    "rewritten_same_ids": fig["rewritten_same_ids"], "recovery_s": fig["recovery_s"]})


def test_a_worker_node_lost_and_a_new_one_added(cluster, tiny_dir, tmp_path):
    generation_job(cluster, tiny_dir, tmp_path, "worker node lost, a new one added",
                   after_loss=lambda: ri.add_node(cluster, 2))


def test_a_spot_preemption_with_a_grace_period(cluster, tiny_dir, tmp_path):
    """The node is drained first (no new work there; the batch in flight may finish), killed 5 s later."""
    generation_job(cluster, tiny_dir, tmp_path, "spot preemption (drained, killed after 5 s), a new node added",
                   lose=lambda node: ri.preempt_node(cluster, node, grace_s=5), after_loss=lambda: ri.add_node(cluster, 2))


def test_a_worker_node_lost_and_not_replaced(cluster, tiny_dir, tmp_path):
    assert len(cluster.worker_nodes) == 3
    generation_job(cluster, tiny_dir, tmp_path, "worker node lost, not replaced")
    assert len(cluster.worker_nodes) == 2


def test_the_coordinator_lives_on_the_drivers_node(cluster):
    import ray

    from pipeline.coordinator import start_coordinator

    coord = start_coordinator("conflayers-coordinator-test")
    try:
        ray.get(coord.progress.remote())
        nodes = ri.actor_nodes("Coordinator")
        assert set(nodes.values()) == {ray.get_runtime_context().get_node_id()}
        assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
    finally:
        ray.kill(coord)


def test_a_summarization_tick_that_loses_a_worker_node(cluster, tiny_dir, tmp_path):
    from jobs.generate import load_config
    from pipeline.summarize.run import SummarizeConfig, read_summaries, run_tick, validate_summarize
    from pipeline.summarize.schedule import parse_run_id

    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    for i in range(ROWS):
        (docs / f"d{i:02d}.txt").write_text(f"Item {i}: the council met on day {i} and closed road {i}.")
    o = [x for x in overrides(tiny_dir, docs, out, **{"search.drafter": "auto", "search.searcher": "none"})
         if not x.startswith(("search.skip_layers", "search.stop_threshold"))]
    cfg = load_config(None, o, SummarizeConfig, validate_summarize)
    tick = "20261203T010000Z"
    gen = out / "runs" / tick / "work" / "generations"
    fig = run_losing_a_node(cluster, lambda: run_tick(cfg, parse_run_id(tick)), gen)
    got = [i for f in gen.glob("*.parquet") for i in pq.read_table(f).column("id").to_pylist()]
    assert len(got) == len(set(got)) == ROWS  # the tick's generation: every document's row once
    summaries = read_summaries(cfg).to_pylist()
    names = [r["id"].rsplit("/", 1)[-1] for r in summaries]
    assert sorted(names) == sorted(f"d{i:02d}.txt" for i in range(ROWS))
    assert all(r["error_type"] is None and r["num_generated_tokens"] > 0 for r in summaries)
    FIGURES.append({"scenario": "summarization tick, worker node lost", "rows": ROWS, "lost": 0, "duplicated": 0,
                    "committed_before_loss": fig["committed_before_loss"],
                    "rewritten_same_ids": fig["rewritten_same_ids"], "recovery_s": fig["recovery_s"]})


def test_actors_that_would_take_every_cpu_are_refused(cluster, tiny_dir, tmp_path):
    from jobs.generate import load_config
    from pipeline.run import run

    write_corpus(tmp_path / "c.jsonl", n=2)
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    cfg = load_config(None, overrides(tiny_dir, tmp_path / "c.jsonl", tmp_path / "out", **{"ray.concurrency": cpus}))
    with pytest.raises(ValueError, match=r"ray.concurrency=\d+ x ray.num_cpus_per_actor=1 = \d+ CPUs leave 0"):
        run(cfg)
