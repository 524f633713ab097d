"""Corpus indexes shared and kept: the coordinator's pool, the saved files (no Ray here; the job
test runs them end to end)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from conflayers.drafts.corpus import keep_newest, pack, unpack
from pipeline.config import PipelineConfig
from pipeline.coordinator import Coordinator
from pipeline.corpus import corpus_dir, index_file, load_index, save_pooled


def test_the_pool_hands_each_actor_the_others_outputs_in_bounded_messages():
    """The coordinator passes addresses of pooled files (and their token counts), never the outputs."""
    c = Coordinator(corpus_cap=1000)
    c.corpus_put("d", "k", "a1", "p1", 5)
    c.corpus_put("d", "k", "a2", "p2", 4)
    c.corpus_put("d", "k", "a2", "p3", 5)
    c.corpus_put("d", "k", "a2", "p4", 5)
    c.corpus_put("e", "k", "a2", "q1", 1)
    got, after = [], 0
    while True:  # a1 asks in messages of at most 6 tokens: it gets a2's files, never its own
        after, outs = c.corpus_since("d", after, "a1", 6)
        if not outs:
            break
        assert len(outs) == 1
        got += outs
    assert got == ["p2", "p3", "p4"]
    assert c.corpus_since("d", after, "a1", 6) == (after, [])  # nothing new
    c.corpus_put("d", "k", "a2", "p5", 2)
    c.corpus_put("d", "k", "a2", "p5", 2)  # a retried batch, or one re-sent after a restart: once
    assert c.corpus_since("d", after, "a1", 6)[1] == ["p5"]
    assert c.corpus_since("d", 0, "a3", 100)[1] == ["p1", "p2", "p3", "p4", "p5"]
    c.corpus_put("d", "other-model", "a3", "x", 1)  # another model's tokens are not this dataset's
    key, outs = c.corpus_pooled()["d"]
    assert key == "k" and outs == ["p1", "p2", "p3", "p4", "p5"]


def test_the_pool_never_holds_more_than_its_cap_and_reads_cost_what_is_new():
    c = Coordinator(corpus_cap=50)
    sizes = {}
    for i in range(3000):
        sizes[f"f{i}"] = i % 7 + 2
        c.corpus_put("d", "k", f"a{i % 3}", f"f{i}", sizes[f"f{i}"])
        live = c.corpus_pooled()["d"][1]
        assert c.pool_tokens["d"] == sum(sizes[p] for p in live) <= 50
    assert live == [f"f{i}" for i in range(3000 - len(live), 3000)]  # the newest, in order
    assert len(c.pool["d"]) < 1100  # evicted entries are compacted away
    after = c.corpus_since("d", 0, "a9", 10**6)[0]
    c.corpus_put("d", "k", "a1", "new", 3)
    assert c.corpus_since("d", after, "a9", 10**6) == (after + 1, ["new"])


def test_pooled_files_round_trip_newest_first_within_the_cap(tmp_path):
    import os

    from pipeline.corpus_pool import read_batch, read_pool, write_batch

    cfg = PipelineConfig()
    cfg.output.path = str(tmp_path / "out")
    a = write_batch(cfg, "batch-a.parquet", "k", {"d": [[1, 2, 3]], "e": [[9]]})
    b = write_batch(cfg, "batch-b.parquet", "k", {"d": [[4, 5], [6, 7, 8]]})
    os.utime(a.replace("file://", ""), (1, 1))  # a is older
    assert write_batch(cfg, "batch-c.parquet", "k", {"d": []}) is None
    assert [list(o) for o in read_batch(cfg, b, "d", "k")] == [[4, 5], [6, 7, 8]]
    assert read_batch(cfg, b, "d", "other-key") == []
    pooled = read_pool(cfg, cap=100)
    assert pooled["d"] == ("k", [[1, 2, 3], [4, 5], [6, 7, 8]]) and pooled["e"] == ("k", [[9]])
    assert read_pool(cfg, cap=7)["d"] == ("k", [[4, 5], [6, 7, 8]])  # the newest that fit (a token + 1 each)


def test_keep_newest_fits_the_cap():
    outs = [[1] * 5, [2] * 3, [3] * 4]
    assert keep_newest(outs, 100) == outs
    assert keep_newest(outs, 10) == [[2] * 3, [3] * 4]
    assert keep_newest(outs, 4) == [[3] * 4]  # an output past the cap keeps its first cap - 1 tokens when indexed


def _cfg(tmp_path, **corpus):
    cfg = PipelineConfig()
    return SimpleNamespace(corpus_index=SimpleNamespace(**{**vars(cfg.corpus_index), **corpus}), search=cfg.search,
                           storage=cfg.storage)


def test_indexes_are_saved_merged_and_loaded_per_dataset_and_model(tmp_path):
    cfg = _cfg(tmp_path, path=str(tmp_path / "idx"), max_tokens_indexed=30)
    assert save_pooled(cfg, {"d": ("model-A", [[1, 2, 3], [4, 5, 6]]), "e/x y": ("model-A", [[7, 8]])}) == 2
    ix = load_index(cfg, "d", "model-A")
    assert [list(o) for o in ix.outputs] == [[1, 2, 3], [4, 5, 6]] and ix.key == "model-A" and ix.cap == 30
    assert ix.propose([1, 2], 4) == [3]
    assert [list(o) for o in load_index(cfg, "e/x y", "model-A").outputs] == [[7, 8]]
    assert load_index(cfg, "d", "model-B").tokens_indexed == 0  # another model: another file, none yet
    # the next run's outputs are merged in, the oldest dropped past the cap
    save_pooled(cfg, {"d": ("model-A", [[9] * 11, [10] * 10])})
    assert [list(o) for o in load_index(cfg, "d", "model-A").outputs] == [[4, 5, 6], [9] * 11, [10] * 10]


def test_a_damaged_index_file_starts_the_dataset_cold_and_is_replaced(tmp_path, caplog):
    cfg = _cfg(tmp_path, path=str(tmp_path / "idx"))
    save_pooled(cfg, {"d": ("m", [[1, 2, 3]])})
    path = index_file(str(tmp_path / "idx"), "d", "m")
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING, logger="conflayers.drafts.corpus"):
        ix = load_index(cfg, "d", "m")
    assert ix.tokens_indexed == 0 and "checksum" in caplog.text and "starts with an empty index" in caplog.text
    save_pooled(cfg, {"d": ("m", [[4, 5]])})  # the end of that run writes a good file in its place
    assert [list(o) for o in unpack(open(path, "rb").read(), key="m")[2]] == [[4, 5]]
    open(path, "wb").write(pack([[1]], key="someone-else"))  # a file under this name for another key
    with caplog.at_level(logging.WARNING, logger="conflayers.drafts.corpus"):
        assert load_index(cfg, "d", "m").tokens_indexed == 0
    assert "refusing it" in caplog.text


def test_where_indexes_are_kept(tmp_path):
    cfg = PipelineConfig()
    assert corpus_dir(cfg) is None  # neither corpus_index.path nor a registry: nothing saved
    cfg.search.registry = str(tmp_path / "reg" / "skip_sets.json")
    assert corpus_dir(cfg) == str(tmp_path / "reg" / "corpus")
    cfg.corpus_index.path = "s3://bucket/idx"
    assert corpus_dir(cfg) == "s3://bucket/idx"


def test_an_actor_without_a_coordinator_drafts_from_the_saved_index(tmp_path):
    """What a Serve replica does: its dataset's saved index is loaded at the dataset's first request,
    and a server (lanes) does not add what it serves to it."""
    from pipeline.actor import GenerationActor
    from pipeline.corpus import index_key
    from tests.pipeline_helpers import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    cfg = PipelineConfig()
    cfg.model.source, cfg.engine.max_batch, cfg.search.drafter = model_dir, 2, "corpus"
    cfg.corpus_index.path = str(tmp_path / "idx")
    actor = GenerationActor(cfg, lanes=1)
    key = index_key(actor.model_id, actor.tokenizer)
    save_pooled(cfg, {"support": (key, [[5, 6, 7, 8, 9]])})
    drafter = actor._drafter(["support"])
    assert drafter is actor.corpus and not drafter.learn_finished
    assert [list(o) for o in drafter.index_for("support").outputs] == [[5, 6, 7, 8, 9]]
    assert drafter.candidates([[1, 5, 6]], [3], ["support"]) == [[7, 8, 9]]
