"""Driver memory of the job's id accounting against corpus size: read, resume filter, exactly-once check.

    nice -n 10 python benchmarks/id_accounting_bench.py --rows 100000 1000000 --out docs/benchmarks/id_accounting

For each size it writes a synthetic corpus (JSONL files of 100k rows) and synthetic committed outputs
(Parquet batch files of 256 rows, as the actors write them), then runs, each in a fresh driver process
on a local Ray with 2 CPUs (so its peak RSS is its own):

- ``resume``: half the ids committed; ``pipeline.run.without_committed`` over the input with
  ``ray.driver_ids=0`` (hash buckets of the committed ids built in Ray tasks, the input filtered by a
  search of them in Ray Data) and a count of the rows left to generate;
- ``check``: every id committed; ``pipeline.run.check_exactly_once`` (one pass: the input's and the
  outputs' ids hash-partitioned in Ray tasks, missing and duplicated ids counted per bucket);
- ``sets``: what the driver did before issue 13 (every committed id into a Python set, every input id
  into another), for comparison;
- ``raydata`` (not run by default, slow): the exactly-once check as one Ray Data aggregation (input and
  output ids tagged, unioned, grouped by id, counts summed), the library alternative to ``check``.

No generation runs. Prints a table (driver peak RSS, wall) and writes ``table.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FILE_ROWS = 100_000
BATCH = 256


def make_data(root: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.actor import OUTPUT_SCHEMA, batch_file_name

    (root / "in").mkdir(parents=True)
    for start in range(0, n, FILE_ROWS):
        with open(root / "in" / f"part-{start // FILE_ROWS:04d}.jsonl", "w") as f:
            for i in range(start, min(n, start + FILE_ROWS)):
                f.write(json.dumps({"id": f"r{i:08d}", "prompt": "Tell me something."}) + "\n")
    for name, upto in (("half", n // 2), ("all", n)):
        out = root / name / "generations"
        out.mkdir(parents=True)
        for start in range(0, upto, BATCH):
            ids = [f"r{i:08d}" for i in range(start, min(upto, start + BATCH))]
            rows = [{"id": i, "dataset": "part", "prompt": "Tell me something.", "generated_text": "ok",
                     "num_input_tokens": 12, "num_generated_tokens": 1, "compute_seconds": 0.01, "baseline": False,
                     "actor_id": "a", "accelerator": "cpu"} for i in ids]
            pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), out / batch_file_name(ids))


def _raydata_check(cfg, files) -> dict:
    """The exactly-once check as Ray Data operations only: one hash-shuffled aggregation per id."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from ray.data.aggregate import Sum

    from pipeline.run import input_dataset, outputs_dataset

    def tag(n_in: int):
        def f(b: pa.Table) -> pa.Table:
            ones = pa.array([n_in] * b.num_rows, pa.int64())
            return pa.table({"id": b.column("id"), "n_in": ones, "n_out": pc.subtract(1, ones)})
        return f

    ins = input_dataset(cfg, files).select_columns(["id"]).map_batches(tag(1), batch_format="pyarrow")
    outs = outputs_dataset(cfg, ["id"]).map_batches(tag(0), batch_format="pyarrow")
    per_id = ins.union(outs).groupby("id").aggregate(Sum("n_in"), Sum("n_out"))
    missing = duplicated = 0
    for b in per_id.iter_batches(batch_size=65536, batch_format="pyarrow"):
        missing += pc.sum(pc.and_(pc.greater(b.column("sum(n_in)"), 0), pc.equal(b.column("sum(n_out)"), 0))).as_py() or 0
        duplicated += pc.sum(pc.greater(b.column("sum(n_out)"), 1)).as_py() or 0
    return {"missing": missing, "duplicated": duplicated}


def measure(root: str, mode: str) -> dict:
    """One measurement in this (fresh) process."""
    import ray

    from pipeline.config import InputConfig, OutputConfig, PipelineConfig
    from pipeline.io import list_input_files

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    out = "half" if mode == "resume" else "all"
    cfg = PipelineConfig(input=InputConfig(path=f"{root}/in"), output=OutputConfig(path=f"{root}/{out}"))
    cfg.ray.driver_ids = 0  # the bounded path, whatever the size (the job takes it above ray.driver_ids)
    files = list_input_files(cfg.storage, cfg.input.path)
    t0 = time.perf_counter()
    if mode == "resume":
        from pipeline.run import input_dataset, without_committed

        ds, done = without_committed(cfg, input_dataset(cfg, files))
        result = {"committed": done, "to_generate": ds.count()}
    elif mode == "check":
        from pipeline.run import check_exactly_once

        result = {"duplicated": check_exactly_once(cfg, files)}
    elif mode == "raydata":
        result = _raydata_check(cfg, files)
    else:  # the driver-side sets of before
        from pipeline.io import read_parquet_dir
        from pipeline.reader import read_rows

        done = frozenset(read_parquet_dir(cfg.storage, f"{root}/all/generations", columns=["id"])
                         .column("id").to_pylist())
        expected = set()
        for f in files:
            expected.update(r["id"] for r in read_rows(f))
        result = {"missing": len(expected - done)}
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"mode": mode, "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **result, "load": round(os.getloadavg()[0], 1)}


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--modes", nargs="+", default=["resume", "check", "sets"])
    p.add_argument("--out", help="directory for table.md")
    p.add_argument("--measure", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    results = []
    for n in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            make_data(Path(tmp), n)
            print(f"{n:,} rows: data written in {time.perf_counter() - t0:.0f} s", flush=True)
            for mode in args.modes:
                proc = subprocess.run([sys.executable, __file__, "--measure", tmp, mode], capture_output=True,
                                      text=True, cwd=REPO)
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                r = {"rows": n, **json.loads(proc.stdout.strip().splitlines()[-1])}
                results.append(r)
                print(f"  {mode:8s} peak RSS {r['peak_rss_mb']:7.0f} MB  wall {r['wall_s']:6.1f} s  "
                      f"{ {k: v for k, v in r.items() if k not in ('rows', 'mode', 'wall_s', 'peak_rss_mb', 'load')} }",
                      flush=True)
    lines = ["| rows | mode | driver peak RSS (MB) | wall (s) | load (1 min) | result |", "|---|---|---|---|---|---|"]
    for r in results:
        extra = {k: v for k, v in r.items() if k not in ("rows", "mode", "wall_s", "peak_rss_mb", "load")}
        lines.append(f"| {r['rows']:,} | {r['mode']} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | {r['load']} | {extra} |")
    growth = []
    for mode in args.modes:
        rss = [r["peak_rss_mb"] for r in results if r["mode"] == mode]
        if len(rss) >= 2:
            growth.append(f"{mode}: {rss[-1] / rss[0] - 1:+.1%} from {args.rows[0]:,} to {args.rows[-1]:,} rows")
    text = "\n".join(["# Driver memory of the id accounting", "",
                      f"`python benchmarks/id_accounting_bench.py --rows {' '.join(map(str, args.rows))}`, "
                      f"{datetime.now(timezone.utc):%Y-%m-%d}, {_cpu()} ({os.cpu_count()} cores), "
                      "local Ray with 2 CPUs, each measurement in a fresh driver process.", "", *lines, "",
                      "Peak RSS growth: " + "; ".join(growth), ""])
    print("\n" + text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "table.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
