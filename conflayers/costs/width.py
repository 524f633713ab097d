"""How many rows to keep in flight: measured decode throughput against width, within a KV budget.

Decode throughput grows with width until the device saturates (on the 2-core CPU: 11 tok/s at
width 1, ~145 at 64). ``choose_width`` times a few plain decode steps at widths 1, 2, 4, … on a
synthetic cache of ``context`` tokens (the cost of a step does not depend on what the cache
holds, so nothing is prefilled: seconds, not minutes), keeps the widths whose KV cache fits the
budget, and picks the smallest width within ``tolerance`` of the best tokens/s (wider costs
memory and thins out at the end of a stream for nothing). The table is cached in a JSON file
keyed by model, device, dtype, kernel plan and threads.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class WidthChoice:
    width: int
    tokens_per_s: dict[int, float]  # measured plain decode tokens/s per width
    kv_budget_bytes: int
    max_fitting: int  # widest candidate whose KV cache fits the budget
    cached: bool  # the table came from the cache file

    def as_dict(self) -> dict:
        return asdict(self)


def default_kv_budget(device: torch.device | str, share: float = 0.5) -> int:
    """A safe share of free memory: free GPU memory on CUDA, available RAM elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * share)
    import psutil

    return int(psutil.virtual_memory().available * share)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def engine_key(engine) -> str:
    """What a timing depends on: model, layers, width, dtype, device, kernel plan, attention, threads, and
    the step mode (static shapes, compiled layers)."""
    cfg = engine.model.config
    return "|".join([getattr(engine.model, "name_or_path", "") or cfg.model_type, f"L{engine.n_layers}",
                     f"H{cfg.hidden_size}", str(next(engine.model.parameters()).dtype), device_name(engine.device),
                     engine.kernel_plan.name, getattr(engine, "attention", ""), f"threads{torch.get_num_threads()}"]
                    + ([f"steps-{engine.steps}"] if getattr(engine, "steps", "dynamic") != "dynamic" else [])
                    + (["compiled"] if getattr(engine, "compiled", None) is not None else []))


def default_cache_file() -> Path:
    base = os.environ.get("CONFLAYERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "conflayers")
    return Path(base) / "widths.json"


def measure_step_seconds(engine, width: int, context: int, steps: int = 3) -> float:
    """Median seconds of one plain decode step at ``width`` rows after ``context`` cached tokens."""
    tok = torch.ones(width, 1, dtype=torch.long, device=engine.device)
    with torch.inference_mode():
        kv, step = engine.step_cache(width, columns=context + 8, context=context)
        times = []
        for _ in range(steps + 1):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(tok)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            kv.rollback()
    return statistics.median(times[1:])


def choose_width(
    engine,
    kv_budget_bytes: int | None = None,
    row_tokens: int = 512,
    context: int = 200,
    max_width: int = 256,
    tolerance: float = 0.05,
    cache_file: str | Path | None = None,
) -> WidthChoice:
    """The width for ``max_batch: auto``. ``row_tokens``: KV positions budgeted per row (prompt + new)."""
    budget = kv_budget_bytes if kv_budget_bytes is not None else default_kv_budget(engine.device)
    extra = getattr(engine, "extra_slots", 0)  # static steps' scratch slot
    fitting = [w for w in (2**i for i in range(max_width.bit_length()))
               if (w + extra) * row_tokens * engine.bytes_per_token <= budget]
    if not fitting:
        raise ValueError(
            f"not even one row of {row_tokens} KV positions fits the KV budget of {budget / 2**30:.2f} GiB "
            f"({engine.bytes_per_token} bytes per position): raise the budget or shorten prompts / max new tokens")
    key = f"{engine_key(engine)}|ctx{context}"
    path = Path(cache_file) if cache_file else default_cache_file()
    table = _read_cache(path).get(key, {})
    cached = all(str(w) in table for w in fitting)
    if not cached:
        for w in fitting:
            if str(w) not in table:
                table[str(w)] = w / measure_step_seconds(engine, w, context)
        _write_cache(path, key, table)
    tps = {w: table[str(w)] for w in fitting}
    best = max(tps.values())
    width = min(w for w, v in tps.items() if v >= (1 - tolerance) * best)
    log.info("max_batch auto: width %d (%.1f tok/s; best %.1f) from %s", width, tps[width], best,
             {w: round(v, 1) for w, v in tps.items()})
    return WidthChoice(width, tps, budget, max(fitting), cached)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = table
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop a run
        log.warning("could not write the cache %s: %s", path, e)
