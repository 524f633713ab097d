"""The cluster cost comparison: measured and predicted cells of settings, priced.

A *cell* is one setting of the job (actors, width, drafter, dtype, kernels) on one kind of
accelerator, with what it did on a fixed sample of the corpus: tokens in and out, wall time,
start-up time (until the actor pool was ready: model load, width choice, cost surface), the
seconds the engines were busy, and the rows' lengths.

- **measured** cells run the real pipeline (``pipeline.run.run``) on the sample: the same rows,
  token budget and sampling for every cell, one cell after the other on the running cluster, each
  under ``<output>/cells/<cell>/`` (a finished cell with the same config is reused on a rerun);
  or they are read from finished runs (``runs:``: ``metrics.parquet`` + ``run_config.yaml``);
- **predicted** cells are settings not run: plain decoding of the sample's length distribution
  replayed on a cost surface (``conflayers.costs.forecast``; the grid's devices are calibrated after
  the grid, kept in ``<output>/surfaces.json`` with the cells), times the measured/predicted ratio of the
  nearest measured cell on that device with that drafter (what Ray, tokenisation and the drafter
  add or save), or the bare surface where no cell of that device was measured (said so).

Each measured cell also gets the prediction the other cells would have made for it (leave one
out), so the report shows how far to trust the predicted ones. ``pipeline.cost.report`` prices
the cells and writes the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .. import io as storage_io
from ..config import (DRAFTERS, DTYPES, KERNELS, BaselineConfig, InputConfig, JobSections, OutputConfig,
                     PipelineConfig, check, shared_sections, validate)
from ..reader import read_rows

log = logging.getLogger("pipeline")

@dataclass
class SampleConfig:
    rows: int = 16  # corpus rows every measured cell runs (the same rows for every cell)
    seed: int = 0


@dataclass
class CorpusConfig:
    rows: Optional[int] = None  # rows to project wall time and $ for; null: counted (or estimated) from input.path
    scan_rows: int = 200000  # rows read to count and sample; a bigger input is estimated from its file sizes


@dataclass
class GridConfig:
    concurrency: list = field(default_factory=lambda: [1])
    max_batch: list = field(default_factory=lambda: [4, 8])
    drafter: list = field(default_factory=lambda: ["none", "auto"])
    dtype: list = field(default_factory=lambda: ["float32"])
    kernels: list = field(default_factory=lambda: ["auto"])


@dataclass
class PredictConfig:
    max_batch: list = field(default_factory=list)  # widths to predict (besides the grid's)
    concurrency: list = field(default_factory=list)  # actor counts to predict (besides the grid's)
    surfaces: list = field(default_factory=list)  # cost-surface files (python -m conflayers.costs.calibrate --cache F) of other devices


@dataclass
class PricesConfig:
    path: str = "configs/prices.yaml"  # local or s3://; a relative path missing here is looked up in the repo
    instances: list = field(default_factory=list)  # price only these instance names ([] = every matching row)
    pricing: str = "on_demand"  # on_demand | spot: what the recommendation and the plot use


@dataclass
class CostConfig(JobSections):
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(path="outputs/cost"))
    sample: SampleConfig = field(default_factory=SampleConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    runs: list = field(default_factory=list)  # finished run directories to price as measured cells
    predict: PredictConfig = field(default_factory=PredictConfig)
    prices: PricesConfig = field(default_factory=PricesConfig)
    deadline_hours: Optional[float] = None  # the recommendation: the cheapest cell that finishes the corpus in time
    rerun: bool = False  # true: run every grid cell again even where a finished one is on disk


GRID_KEYS = {"concurrency": ("ray", "concurrency"), "max_batch": ("engine", "max_batch"),
             "drafter": ("search", "drafter"), "dtype": ("model", "dtype"), "kernels": ("model", "kernels")}


def grid_cells(cfg: CostConfig) -> list[dict]:
    """Every combination of the grid's values, drafter innermost (a setting's drafters run back to back)."""
    g = cfg.grid
    cells = []
    for dtype in g.dtype:
        for kernels in g.kernels:
            for conc in g.concurrency:
                for width in g.max_batch:
                    for drafter in g.drafter:
                        cells.append({"concurrency": conc, "max_batch": width, "drafter": drafter, "dtype": dtype,
                                      "kernels": kernels})
    return cells


def cell_name(c: dict) -> str:
    return f"a{c['concurrency']}-w{c['max_batch']}-{c['drafter']}-{c['dtype']}-{c['kernels']}"


def validate_cost(cfg: CostConfig) -> CostConfig:
    g = cfg.grid
    for key in GRID_KEYS:
        vals = getattr(g, key)
        check(isinstance(vals, list), f"grid.{key}", f"must be a list, got {vals!r}")
        check(len(set(map(str, vals))) == len(vals), f"grid.{key}", f"lists a value twice: {vals}")
    cells = grid_cells(cfg)
    check(bool(cells) or bool(cfg.runs), "grid",
          "is empty (every grid list needs at least one value) and no runs are given: nothing to compare")
    for v in g.drafter:
        check(v in DRAFTERS, "grid.drafter", f"values must be in {DRAFTERS}, got {v!r}")
    for v in g.dtype:
        check(v in DTYPES, "grid.dtype", f"values must be in {DTYPES}, got {v!r}")
    for v in g.kernels:
        check(v in KERNELS, "grid.kernels", f"values must be in {KERNELS}, got {v!r}")
    for key in ("concurrency", "max_batch"):
        for v in getattr(g, key) + getattr(cfg.predict, key):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"grid.{key} / predict.{key}",
                  f"values must be integers >= 1, got {v!r}")
    check(cfg.sample.rows >= 1, "sample.rows", f"must be >= 1, got {cfg.sample.rows}")
    check(cfg.corpus.rows is None or cfg.corpus.rows >= 1, "corpus.rows", f"must be >= 1 or null, got {cfg.corpus.rows}")
    check(cfg.corpus.scan_rows >= cfg.sample.rows, "corpus.scan_rows", f"must be >= sample.rows, got {cfg.corpus.scan_rows}")
    check(cfg.deadline_hours is None or cfg.deadline_hours > 0, "deadline_hours",
          f"must be > 0 or null, got {cfg.deadline_hours}")
    check(cfg.prices.pricing in ("on_demand", "spot"), "prices.pricing",
          f"must be on_demand or spot, got {cfg.prices.pricing!r}")
    check(bool(cfg.output.path), "output.path", "must not be empty")
    for c in cells or [None]:
        validate(cell_config(cfg, c, "sample.jsonl", 1))  # the shared sections, checked as jobs.generate does
    return cfg


def repo_path(p: str) -> str:
    """``p`` as given when it exists (or is ``s3://`` / absolute); a relative path missing here is
    looked up in the project's checkout (the configs name ``configs/...`` and ``docs/...`` files)."""
    if storage_io.is_s3(p) or os.path.isabs(p) or os.path.exists(p):
        return p
    repo = Path(__file__).resolve().parents[2] / p
    return str(repo) if repo.exists() else p


# ---- the sample and the corpus -----------------------------------------------------------------
@dataclass
class Corpus:
    rows: int  # the corpus's rows (what the projection is for)
    counted: bool  # False: estimated from file sizes (or given as corpus.rows)
    errors: int  # unusable rows seen while scanning
    sample: list[dict]  # normalised rows (pipeline.reader), the sample every cell runs


def scan_corpus(cfg: CostConfig) -> Corpus:
    """Count the input's rows (up to ``corpus.scan_rows``; past that, estimate from file sizes) and draw
    ``sample.rows`` usable rows from them with a fixed seed (reservoir sampling, memory bounded)."""
    from ..run import DEMO_CORPUS

    path = cfg.input.path or DEMO_CORPUS
    files = storage_io.list_input_files(cfg.storage, path)
    rng = random.Random(cfg.sample.seed)
    sample: list[dict] = []
    seen = errors = 0
    read_bytes = 0
    sizes = []
    for f in files:
        fs, p = storage_io.filesystem(cfg.storage, f)
        sizes.append(fs.size(p))
    complete = True
    for f, size in zip(files, sizes):
        if seen >= cfg.corpus.scan_rows:
            complete = False
            break
        for row in read_rows(f, cfg.storage, cfg.input.format, cfg.input.file_format, cfg.generation.max_tokens_limit):
            if row["error_type"]:
                errors += 1
                continue
            seen += 1
            if len(sample) < cfg.sample.rows:
                sample.append(row)
            else:
                j = rng.randrange(seen)
                if j < cfg.sample.rows:
                    sample[j] = row
        read_bytes += size
    if not sample:
        raise ValueError(f"input.path: {path} holds no usable rows ({errors} error rows)")
    rows = seen if complete else int(round(seen * sum(sizes) / max(1, read_bytes)))
    if cfg.corpus.rows:
        rows, complete = cfg.corpus.rows, False
    sample.sort(key=lambda r: r["id"])
    return Corpus(rows, complete, errors, sample)


def write_sample(cfg: CostConfig, sample: list[dict]) -> str:
    path = storage_io.join(cfg.output.path, "sample.jsonl")
    lines = []
    for r in sample:
        rec = {"id": r["id"], "dataset": r["dataset"]}
        if r.get("messages"):
            rec["messages"] = json.loads(r["messages"])
        else:
            rec["prompt"] = r["prompt"]
        if r.get("max_tokens"):
            rec["max_tokens"] = r["max_tokens"]
        lines.append(json.dumps(rec, ensure_ascii=False))
    storage_io.write_bytes_atomic(cfg.storage, path, ("\n".join(lines) + "\n").encode())
    return path


# ---- measured cells -----------------------------------------------------------------------------
def cell_config(cfg: CostConfig, cell: dict | None, sample_path: str, rows: int,
                local_cores: int | None = None) -> PipelineConfig:
    """The generation job's config for one grid cell: the shared sections with the cell's values, the
    sample as input, no baseline re-runs (the plain cell of the same setting is the baseline), and
    rows split evenly over the actors (one call each)."""
    base = PipelineConfig(**shared_sections(cfg), input=InputConfig(path=sample_path, format="records"),
                          output=OutputConfig(path=storage_io.join(cfg.output.path, "cells",
                                                                   cell_name(cell) if cell else "check"),
                                              resume=False))
    base = replace(base, baseline=BaselineConfig(fraction=0.0, min_per_dataset=0))
    if cell is None:
        return base
    sections = {}
    for key, (sec, attr) in GRID_KEYS.items():
        obj = sections.get(sec) or getattr(base, sec)
        sections[sec] = replace(obj, **{attr: cell[key]})
    out = replace(base, **sections)
    conc = cell["concurrency"]
    threads = cfg.engine.threads or (max(1, local_cores // conc) if local_cores else None)
    return replace(out, ray=replace(out.ray, batch_size=math.ceil(rows / conc)),
                   engine=replace(out.engine, threads=threads))


def _read_yaml(storage, path: str) -> dict:
    return yaml.safe_load(storage_io.read_bytes(storage, path)) or {}


def read_cell(storage, run_dir: str, name: str | None = None) -> dict:
    """A measured cell from a finished run directory (``metrics.parquet``, ``run_config.yaml``,
    ``generations/``, and ``actors.json`` where the run wrote one)."""
    where = f"runs: {run_dir}"
    if not storage_io.exists(storage, storage_io.join(run_dir, "metrics.parquet")):
        raise FileNotFoundError(f"{where} has no metrics.parquet (not a finished run of jobs.generate)")
    if not storage_io.exists(storage, storage_io.join(run_dir, "run_config.yaml")):
        raise FileNotFoundError(f"{where} has no run_config.yaml (not a finished run of jobs.generate)")
    metrics = pq.read_table(pa.BufferReader(storage_io.read_bytes(storage, storage_io.join(run_dir, "metrics.parquet"))))
    rows = [m for m in metrics.to_pylist() if m["dataset"] == "__all__"]
    if not rows:
        raise ValueError(f"{where}: metrics.parquet has no __all__ row")
    m = rows[0]
    rc = _read_yaml(storage, storage_io.join(run_dir, "run_config.yaml"))
    actors = {}
    if storage_io.exists(storage, storage_io.join(run_dir, "actors.json")):
        actors = json.loads(storage_io.read_bytes(storage, storage_io.join(run_dir, "actors.json")))
    gens = storage_io.read_parquet_dir(storage, storage_io.join(run_dir, "generations"))
    lengths, texts, busy = [], {}, 0.0
    if gens is not None:
        from ..metrics import dedupe

        for r in dedupe(gens).to_pylist():
            if r["error_type"]:
                continue
            lengths.append((int(r["num_input_tokens"]), int(r["num_generated_tokens"])))
            texts[r["id"]] = r["generated_text"]
            busy += (r["compute_seconds"] or 0.0) + (r["baseline_compute_seconds"] or 0.0)
    else:
        busy = m["compute_seconds"] or 0.0
    ray_c, eng, search, model = rc.get("ray", {}), rc.get("engine", {}), rc.get("search", {}), rc.get("model", {})
    widths = sorted({a.get("width") for a in actors.values() if a.get("width")})
    threads = sorted({a.get("threads") for a in actors.values() if a.get("threads")})
    width = widths[-1] if widths else eng.get("max_batch")
    if not isinstance(width, int):
        raise ValueError(f"{where}: engine.max_batch is {width!r} and the run recorded no actor width (actors.json)")
    n_thr = threads[-1] if threads else (eng.get("threads") or int(ray_c.get("num_cpus_per_actor") or 1))
    conc = int(ray_c.get("concurrency") or 1)
    accel = m["accelerator_type"] or "cpu"
    startup = m.get("startup_seconds")
    wall = float(m["wall_seconds"])
    return {
        "cell": name or Path(run_dir.rstrip("/")).name, "mode": "measured", "source": run_dir,
        "accelerator": accel, "gpus": int(m["accelerator_count"] or 0) if accel != "cpu" else 0,
        "vcpus": conc * int(max(n_thr, float(ray_c.get("num_cpus_per_actor") or 1))) if accel == "cpu" else 0,
        "concurrency": conc, "width": int(width), "drafter": search.get("drafter", "auto"),
        "dtype": model.get("dtype", "float32"), "kernels": model.get("kernels", "auto"),
        "threads": int(n_thr) if accel == "cpu" else 0, "batch_size": int(ray_c.get("batch_size") or 256),
        "prefill_tokens": int(eng.get("prefill_tokens") or 512),
        "greedy": float((rc.get("generation") or {}).get("temperature") or 0.0) == 0.0,
        "rows": int(m["rows_ok"]), "input_tokens": int(m["prompt_tokens"]), "output_tokens": int(m["generated_tokens"]),
        "wall_seconds": wall, "startup_seconds": float(startup) if startup is not None else 0.0,
        "startup_known": startup is not None, "busy_seconds": busy,
        "lengths": lengths, "texts": texts, "note": "" if startup is not None else "start-up not recorded (older run)",
    }


def run_grid(cfg: CostConfig, sample_path: str, rows: int, local_cores: int | None) -> list[dict]:
    """Run (or reuse) every grid cell on the running Ray cluster; returns the measured cells."""
    from ..run import run

    out = []
    cells = grid_cells(cfg)
    for i, c in enumerate(cells):
        pc = cell_config(cfg, c, sample_path, rows, local_cores)
        d = pc.output.path
        fingerprint = json.dumps({"cell": c, "threads": pc.engine.threads, "rows": rows,
                                  "sample": storage_io.read_bytes(cfg.storage, sample_path).decode(),
                                  "generation": vars(pc.generation), "model": vars(pc.model)}, sort_keys=True, default=str)
        marker = storage_io.join(d, "cell.json")
        done = (not cfg.rerun and storage_io.exists(cfg.storage, marker)
                and storage_io.read_bytes(cfg.storage, marker).decode() == fingerprint)
        if done:
            log.info("cell %d/%d %s: finished before, reused (rerun=true runs it again)", i + 1, len(cells), cell_name(c))
        else:
            log.info("cell %d/%d %s: running %d rows", i + 1, len(cells), cell_name(c), rows)
            storage_io.write_run_config(pc, d)
            run(pc)
            storage_io.write_bytes_atomic(cfg.storage, marker, fingerprint.encode())
        out.append(read_cell(cfg.storage, d, cell_name(c)))
    return out


def calibrate_surfaces(cfg: CostConfig, cells: list[dict], widths: list[int], context: int) -> dict[tuple, dict]:
    """A plain-decoding cost surface per (dtype, kernels, threads) of the measured cells, measured in
    a Ray task that holds what one of the cells' actors holds (a GPU, or its CPUs and threads)."""
    import ray

    from ..run import _uses_gpu

    gpu = _uses_gpu(PipelineConfig(**shared_sections(cfg)))

    def calibrate_one(m, dtype, device, kernels, threads, widths, context):
        import torch

        from conflayers import Engine
        from conflayers.costs.calibrate import calibrate
        from conflayers.models import load_model

        if threads:
            torch.set_num_threads(threads)
        model, _ = load_model(m.source, dtype, "cuda" if device == "cuda" else "cpu", allow_pickle=m.allow_pickle,
                              trust_remote_code=m.trust_remote_code, revision=m.revision)
        return calibrate(Engine(model, kernels), widths, (1,), context).as_dict()

    task = ray.remote(calibrate_one)
    out, futures = {}, {}
    for c in cells:
        key = (c["dtype"], c["kernels"], c["threads"])
        if key in futures:
            continue
        opts = {"num_gpus": 1, "num_cpus": 0} if gpu else {"num_cpus": max(1, c["threads"] or 1)}
        futures[key] = task.options(**opts).remote(cfg.model, c["dtype"], "cuda" if gpu else "cpu",
                                                     c["kernels"], c["threads"], sorted(set(widths)), context)
    for key, f in futures.items():
        out[key] = ray.get(f)
    return out


def grid_surfaces(cfg: CostConfig, grid: list[dict], widths: list[int], context: int) -> dict:
    """The grid cells' cost surfaces: measured now (``calibrate_surfaces``) and kept in
    ``<output>/surfaces.json`` with the cells, so a rerun that reuses the cells reuses them too
    (and reports the same predictions), unless ``rerun`` or the widths or context changed."""
    from conflayers.costs.surface import CostSurface

    path = storage_io.join(cfg.output.path, "surfaces.json")
    want = {c["surface"] for c in grid}
    stamp = {"widths": widths, "context": context, "cells": sorted(c["cell"] for c in grid)}
    if not cfg.rerun and storage_io.exists(cfg.storage, path):
        kept = json.loads(storage_io.read_bytes(cfg.storage, path))
        if kept.get("stamp") == stamp and want <= set(kept.get("surfaces", {})):
            log.info("cost surfaces of the grid's devices: reused from %s", path)
            return {k: CostSurface.from_dict(v) for k, v in kept["surfaces"].items()}
    raw = calibrate_surfaces(cfg, grid, widths, context)
    out = {f"{dtype}|{kernels}|threads{threads}": d for (dtype, kernels, threads), d in raw.items()}
    storage_io.write_bytes_atomic(cfg.storage, path, json.dumps({"stamp": stamp, "surfaces": out}, indent=1).encode())
    return {k: CostSurface.from_dict(v) for k, v in out.items()}


def sample_context(lengths: list[tuple[int, int]]) -> int:
    """A typical cache length while decoding the sample: median prompt + half the median output."""
    if not lengths:
        return 256
    ps = sorted(p for p, _ in lengths)
    ns = sorted(n for _, n in lengths)
    return int(ps[len(ps) // 2] + ns[len(ns) // 2] / 2)


# ---- the whole comparison --------------------------------------------------------------------------
def load_surface_files(cfg: CostConfig) -> dict:
    """``predict.surfaces``: cost-surface files ({key: surface} as ``conflayers.costs.calibrate --cache`` and
    ``benchmarks/device_cost_check.py`` write; the latter adds ``stream_ratio``, the engine's measured
    seconds over the forecast per width, kept as the surface's ``stream_ratio`` attribute)."""
    from conflayers.costs.surface import CostSurface

    out = {}
    for i, path in enumerate(cfg.predict.surfaces):
        where = f"predict.surfaces[{i}]: {path}"
        try:
            data = json.loads(storage_io.read_bytes(cfg.storage, repo_path(path)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} does not exist") from None
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        items = [data] if isinstance(data, dict) and "table" in data else (list(data.values()) if isinstance(data, dict) else [])
        if not items:
            raise ValueError(f"{where}: holds no cost surface")
        for raw in items:
            try:
                s = CostSurface.from_dict(raw)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            s.stream_ratio = {int(w): float(r) for w, r in (raw.get("stream_ratio") or {}).items()}
            out[s.key or f"{path}#{len(out)}"] = s
    return out


def cluster_accelerator(cfg: CostConfig) -> str:
    """What the grid's actors will report as their accelerator: ``cpu``, or the cluster's GPU type."""
    import ray

    from ..run import _uses_gpu

    if not _uses_gpu(PipelineConfig(**shared_sections(cfg))):
        return "cpu"
    kinds = [k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:")]
    return kinds[0] if kinds else "GPU"


@dataclass
class Inputs:
    """What a comparison reads before any cell runs (so bad input fails before anything is written)."""

    prices: object  # pipeline.cost.prices.PriceTable
    only: list
    files: dict  # surface key -> CostSurface from predict.surfaces
    runs: list  # measured cells read from runs:


def read_inputs(cfg: CostConfig) -> Inputs:
    from .prices import load_prices

    prices = load_prices(repo_path(cfg.prices.path), cfg.storage)
    only = list(cfg.prices.instances)
    unknown = set(only) - {p.name for p in prices.instances}
    check(not unknown, "prices.instances", f"{sorted(unknown)} not in {prices.path}")
    files = load_surface_files(cfg)
    for s in files.values():
        prices.for_accelerator(s.accelerator, only)
    runs = [read_cell(cfg.storage, p) for p in cfg.runs]
    for c in runs:
        prices.for_accelerator(c["accelerator"], only)
    return Inputs(prices, only, files, runs)


def run_cost(cfg: CostConfig, local_cores: int | None = None, inputs: Inputs | None = None) -> dict:
    """Measure, predict, price and report; returns {"rows": report rows, "recommendation": str}.
    Every input is checked before a cell runs; the report files are written at the end, whole."""
    from . import report as rep

    inputs = inputs or read_inputs(cfg)
    prices, only, measured = inputs.prices, inputs.only, list(inputs.runs)
    cells = grid_cells(cfg)
    surfaces: dict = dict(inputs.files)
    corpus = None
    if cells:
        prices.for_accelerator(cluster_accelerator(cfg), only)
        corpus = scan_corpus(cfg)
        log.info("corpus: %d rows (%s), %d error rows; sample of %d rows; %d cells", corpus.rows,
                 "counted" if corpus.counted else "estimated", corpus.errors, len(corpus.sample), len(cells))
        fill = max(cfg.grid.max_batch) * max(cfg.grid.concurrency)
        if len(corpus.sample) < 2 * fill:
            log.warning("sample of %d rows: a cell of %d actors x width %d holds it all at once (its tokens/s "
                        "is mostly ramp-up and tail); sample.rows >= %d measures the widths apart better",
                        len(corpus.sample), max(cfg.grid.concurrency), max(cfg.grid.max_batch), 2 * fill)
        sample_path = write_sample(cfg, corpus.sample)
        grid = run_grid(cfg, sample_path, len(corpus.sample), local_cores)
        widths = sorted({1, *cfg.grid.max_batch, *cfg.predict.max_batch, *(c["width"] for c in grid)})
        ref = next((c for c in grid if c["drafter"] == "none"), grid[0])
        for c in grid:
            c["surface"] = f"{c['dtype']}|{c['kernels']}|threads{c['threads']}"
        surfaces.update(grid_surfaces(cfg, grid, widths, sample_context(ref["lengths"])))
        measured = grid + measured
    rep.add_ratios(measured, surfaces)
    with_lengths = [c for c in measured if c["lengths"]]
    lengths = next((c["lengths"] for c in with_lengths if c["drafter"] == "none"),
                   with_lengths[0]["lengths"] if with_lengths else [])
    widths = sorted({*cfg.grid.max_batch, *cfg.predict.max_batch})
    actor_counts = sorted({*cfg.grid.concurrency, *cfg.predict.concurrency})
    predicted = rep.predicted_cells(measured, surfaces, widths, actor_counts, lengths) if lengths else []
    everything = measured + predicted
    rep.add_comparisons(everything)
    corpus_rows = cfg.corpus.rows or (corpus.rows if corpus else max(c["rows"] for c in measured))
    rows = rep.report_rows(everything, prices, only, surfaces, corpus_rows, cfg.ray.batch_size)
    recommendation = rep.recommend(rows, cfg.deadline_hours, cfg.prices.pricing)
    write_report(cfg, rows, recommendation, corpus, corpus_rows, prices)
    return {"rows": rows, "recommendation": recommendation}


def write_report(cfg: CostConfig, rows: list[dict], recommendation: str, corpus: Corpus | None, corpus_rows: int,
                 prices) -> None:
    import platform
    import tempfile
    from datetime import datetime, timezone

    from . import report as rep

    loo = [r for r in rows if r["prediction_error"] is not None]
    seen = set()
    checks = []
    for r in loo:
        if r["cell"] not in seen:
            seen.add(r["cell"])
            checks.append(f"{r['cell']}: predicted {r['predicted_tokens_per_s']:.1f} tok/s, measured "
                          f"{r['tokens_per_s']:.1f} ({r['prediction_error']:+.1%})")
    how = "counted" if corpus and corpus.counted else ("given as corpus.rows" if cfg.corpus.rows else "estimated")
    text = "\n".join([
        "# Cluster cost comparison", "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, driver on {platform.node()}; model {cfg.model.source}; "
        f"prices from {prices.path} ({prices.currency}).",
        f"Corpus: {corpus_rows:,} rows ({how}); each measured cell ran the same "
        f"{len(corpus.sample) if corpus else '-'} sampled rows (seed {cfg.sample.seed}), max_tokens "
        f"{cfg.generation.max_tokens}, temperature {cfg.generation.temperature}.", "",
        f"**Recommendation**: {recommendation}", "",
        rep.markdown(rows), "",
        "Predicted cells replay plain decoding of the sample's lengths on the device's cost surface, times the "
        "measured/predicted ratio of the nearest measured cell of that device and drafter. Each measured cell's "
        "`pred. tok/s (err)` is what the other cells would have predicted for it (leave one out):", "",
        *(f"- {c}" for c in checks or ["(no measured cell had a neighbour of its device and drafter)"]), "",
    ])
    out = cfg.output.path
    storage_io.write_parquet(cfg.storage, storage_io.join(out, "cost.parquet"), rep.cost_table(rows))
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "pareto.png")
        rep.pareto_plot(rows, png, cfg.prices.pricing, cfg.deadline_hours,
                        f"{corpus_rows:,} rows of {cfg.input.path or 'the demo corpus'}: $ against hours")
        with open(png, "rb") as f:
            storage_io.write_bytes_atomic(cfg.storage, storage_io.join(out, "pareto.png"), f.read())
    storage_io.write_bytes_atomic(cfg.storage, storage_io.join(out, "cost.md"), text.encode())
    print(rep.markdown(rows), flush=True)
    print("\n" + "\n".join(checks), flush=True)
    print(f"\nrecommendation: {recommendation}\nwrote {out}/: cost.md, cost.parquet, pareto.png", flush=True)
