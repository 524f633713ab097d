"""The job's id accounting on a local Ray, no generation: the resume filter and the exactly-once check
over hash buckets built in Ray tasks (``ray.driver_ids=0``, the path big corpora take), against the
driver-side set path, on small synthetic inputs and committed outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.actor import OUTPUT_SCHEMA, batch_file_name
from pipeline.config import InputConfig, OutputConfig, PipelineConfig

pytestmark = pytest.mark.slow


def _ids(a: int, b: int) -> list[str]:
    return [f"r{i:03d}" for i in range(a, b)]


def _corpus(root: Path, n: int, per_file: int = 15) -> Path:
    d = root / "in"
    d.mkdir()
    for k, start in enumerate(range(0, n, per_file)):
        (d / f"part-{k}.jsonl").write_text("".join(
            json.dumps({"id": i, "prompt": "hi"}) + "\n" for i in _ids(start, min(n, start + per_file))))
    return d


def _commit(out: Path, ids: list[str], name: str | None = None) -> None:
    (out / "generations").mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "dataset": "part", "prompt": "hi", "generated_text": "ok"} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA),
                   out / "generations" / (name or batch_file_name(ids)))


def _cfg(root: Path, out: Path, driver_ids: int = 0, limit: int | None = None) -> tuple[PipelineConfig, list[str]]:
    from pipeline.io import list_input_files

    cfg = PipelineConfig(input=InputConfig(path=str(root / "in"), limit=limit), output=OutputConfig(path=str(out)))
    cfg.ray.driver_ids = driver_ids
    return cfg, list_input_files(cfg.storage, cfg.input.path)


@pytest.fixture
def corpus(tmp_path):
    _corpus(tmp_path, 40)  # 3 files: r000..r039
    out = tmp_path / "out"
    for start in range(0, 30, 4):  # r000..r029 committed in batches of 4, r005 and r006 committed twice
        _commit(out, _ids(start, min(30, start + 4)))
    _commit(out, ["r005", "r006"], name="batch-dup.parquet")
    return tmp_path, out


@pytest.mark.parametrize("driver_ids", [0, 10**6])
def test_resume_filter_leaves_exactly_the_uncommitted_rows(ray_local, corpus, driver_ids):
    from pipeline.run import input_dataset, without_committed

    root, out = corpus
    cfg, files = _cfg(root, out, driver_ids)
    ds, done = without_committed(cfg, input_dataset(cfg, files))
    assert done == 32  # committed rows, the duplicated pair counted twice
    left = sorted(r["id"] for r in ds.take_all())
    assert left == _ids(30, 40)


def test_exactly_once_check_counts_missing_and_duplicated_ids(ray_local, corpus):
    from pipeline.run import check_exactly_once

    root, out = corpus
    cfg, files = _cfg(root, out)
    with pytest.raises(RuntimeError, match=r"^10 input id\(s\) missing from the output, "
                                           r"e\.g\. \['r030', 'r031', 'r032'\]$"):
        check_exactly_once(cfg, files)
    cfg, files = _cfg(root, out, limit=30)  # the first 30 rows in file order: all committed
    assert check_exactly_once(cfg, files) == 2
    cfg, files = _cfg(root, out, limit=33)
    with pytest.raises(RuntimeError, match=r"^3 input id\(s\) missing"):
        check_exactly_once(cfg, files)
    _commit(out, _ids(30, 40))
    cfg, files = _cfg(root, out)
    assert check_exactly_once(cfg, files) == 2  # r005, r006


def test_no_outputs_at_all(ray_local, tmp_path):
    from pipeline.run import check_exactly_once, input_dataset, without_committed

    _corpus(tmp_path, 5)
    cfg, files = _cfg(tmp_path, tmp_path / "out")
    ds, done = without_committed(cfg, input_dataset(cfg, files))
    assert done == 0 and ds.count() == 5
    with pytest.raises(RuntimeError, match=r"^5 input id\(s\) missing from the output, e\.g\. \['r000', 'r001', 'r002'\]$"):
        check_exactly_once(cfg, files)


def test_many_buckets_and_a_hash_collision(ray_local):
    """The reduce and search steps with several buckets (the tasks above use one), and two committed
    ids sharing a 64-bit hash (forged): ids are compared exactly, the hash only places them."""
    import ray

    from pipeline.idsets import _id_hashes, _reduce_check, _reduce_committed, _split, drop_committed

    buckets = 5
    ins = _split(pa.array(_ids(0, 200)), buckets)
    outs = _split(pa.array(_ids(0, 150) + _ids(10, 13)), buckets)
    assert sum(t.num_rows for t in ins) == 200 and all(t.num_rows for t in ins)
    results = [_reduce_check(1, [None], ins[b], outs[b]) for b in range(buckets)]
    assert sum(r[0] for r in results) == 50 and sum(r[2] for r in results) == 3
    assert sorted(i for r in results for i in r[1])[:3] == _ids(150, 153)

    committed = [ray.put(_reduce_committed(outs[b])) for b in range(buckets)]
    batch = pa.table({"id": _ids(140, 160), "prompt": ["hi"] * 20})
    assert drop_committed(committed, None)(batch).column("id").to_pylist() == _ids(150, 160)

    h = int(_id_hashes(pa.array(["x"]))[0])  # "y" forged to collide with "x", sorted before it
    forged = ray.put(pa.table({"h": pa.array([h, h], pa.uint64()), "id": ["y", "x"]}))
    kept = drop_committed([forged], None)(pa.table({"id": ["x", "z", "y"]})).column("id").to_pylist()
    assert kept == ["z", "y"]  # "x" found past the forged "y"; "y" itself hashes elsewhere: not committed
