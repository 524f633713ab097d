"""Whether compiled steps pay here: measured at the width a run will use, against the eager step on
the kernel plan that is fastest eagerly, and against the run's length.

``choose_compile(engine, width, expected_tokens)`` (for ``compile: auto``) times one plain decode step
at ``width`` on a synthetic cache three ways: eager on the ``native`` linears, eager on the
``onednn`` plan (where it can run), and compiled (``conflayers.compiled``) on whichever of the two
was faster. It keeps that kernel plan, and compiled steps if they beat its eager step by ``min_gain``
and, when the run's size is known, the decode time they save pays back what compiling costs on this
machine. Both timings go in
one log line. The measurement is cached with the compile seconds (the first compile on a machine is
cold; later ones read inductor's on-disk cache) in ``compile.json`` beside the other caches, keyed by
model, device, dtype, attention and threads, and width.

A run too short to pay back a first compile is not measured at all: without a cached measurement,
compiling is tried only when the run's eager decode time is at least ``payback`` times the cold
compile estimate (``COLD_COMPILE_SECONDS``), so a demo run never spends a minute compiling to save
ten seconds.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .width import _read_cache, _write_cache, default_cache_file, device_name, measure_step_seconds

log = logging.getLogger(__name__)

COLD_COMPILE_SECONDS = 90.0  # a first compile of the four step variants on a 2-core CPU, before it is measured


@dataclass
class CompileChoice:
    compiled: bool  # compiled steps are on
    kernels: str  # the kernel plan in effect
    eager_ms: dict[str, float]  # measured eager step ms per kernel plan ({} when not measured)
    compiled_ms: float | None
    compile_seconds: float | None  # the last compile's seconds on this machine
    reason: str
    cached: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def cache_file() -> Path:
    return default_cache_file().parent / "compile.json"


def compile_key(engine, width: int) -> str:
    cfg = engine.model.config
    return "|".join([getattr(engine.model, "name_or_path", "") or cfg.model_type, f"L{engine.n_layers}",
                     f"H{cfg.hidden_size}", str(next(engine.model.parameters()).dtype), device_name(engine.device),
                     getattr(engine, "attention", ""), f"threads{torch.get_num_threads()}", f"w{width}", "v2"])


def decide(table: dict, expected_tokens: int | None, width: int, min_gain: float = 0.03) -> tuple[bool, str, str]:
    """(compile?, eager kernel plan, reason) from a measured table ``{"eager_ms": {plan: ms}, "compiled_ms",
    "compile_seconds"}``: pure, so decisions can be printed and tested on a synthetic table."""
    eager = table["eager_ms"]
    plan = min(eager, key=eager.get)
    compiled = table.get("compiled_ms")
    if compiled is None:
        return False, plan, table.get("error") or "compiled steps could not run here"
    gain = eager[plan] / compiled
    if gain < 1 + min_gain:
        return False, plan, f"compiled steps are not faster at width {width} ({gain:.2f}x the eager {plan} step)"
    if expected_tokens is not None:
        saved = expected_tokens / width * (eager[plan] - compiled) / 1e3
        cost = table.get("compile_seconds") or COLD_COMPILE_SECONDS
        if saved < cost:
            return False, plan, (f"compiled steps are {gain:.2f}x faster but would save ~{saved:.0f} s of this run's "
                                 f"decoding against ~{cost:.0f} s of compiling")
    return True, plan, f"compiled steps are {gain:.2f}x the eager {plan} step at width {width}"


def choose_compile(engine, width: int, expected_tokens: int | None = None, context: int = 200,
                   cache: str | Path | None = None, payback: float = 2.0,
                   eager_tokens_per_s: float | None = None) -> CompileChoice:
    """Put ``engine`` (built with ``compile="auto"``) on compiled or eager steps for runs at ``width``,
    by measurement (see the module docstring). ``expected_tokens``: the tokens the run will generate, if
    known; ``eager_tokens_per_s``: the eager plain-decoding rate at ``width`` if already measured (the
    width chooser's), which spares a measurement for a run too short to compile for. An engine built
    with ``on`` or ``off`` keeps its mode (the choice says so)."""
    if engine.compile != "auto":
        on = engine.compiled is not None
        return CompileChoice(on, engine.kernel_plan.name, {}, None, None,
                             f"compile {engine.compile}" + ("" if on or engine.compile == "off"
                                                            else f" (failed: {engine.compile_error})"))
    if next(engine.model.parameters()).dtype == torch.float64:
        return CompileChoice(False, engine.kernel_plan.name, {}, None, None,
                             "float64 (reference precision): eager steps")
    path = Path(cache) if cache else cache_file()
    key = compile_key(engine, width)
    table = _read_cache(path).get(key)
    cached = table is not None
    if table is None:
        eager_ms = {engine.kernel_plan.name: width / eager_tokens_per_s * 1e3 if eager_tokens_per_s
                    else measure_step_seconds(engine, width, context) * 1e3}
        if expected_tokens is not None:
            decode_s = expected_tokens / width * eager_ms[engine.kernel_plan.name] / 1e3
            if decode_s < payback * COLD_COMPILE_SECONDS:
                reason = (f"not measured: this run's ~{decode_s:.0f} s of eager decoding would not pay back a first "
                          f"compile (~{COLD_COMPILE_SECONDS:.0f} s)")
                log.info("compile auto: eager %s steps (%s)", engine.kernel_plan.name, reason)
                return CompileChoice(False, engine.kernel_plan.name, eager_ms, None, None, reason)
        for plan in ("native", "onednn"):  # the eager alternative: whichever kernel plan is faster at this width
            if plan in eager_ms:
                continue
            try:
                engine.use_eager(plan)
            except ValueError:  # onednn where it cannot run
                continue
            eager_ms[plan] = measure_step_seconds(engine, width, context) * 1e3
        table = {"eager_ms": eager_ms}
        engine.use_eager(min(eager_ms, key=eager_ms.get))  # compiled steps on the faster plan
        if engine.use_compiled():
            table["compiled_ms"] = measure_step_seconds(engine, width, context) * 1e3
            table["compile_seconds"] = engine.compiled_now_seconds or engine.compiled.compile_seconds
        else:
            table["error"] = engine.compile_error
        _write_cache(path, key, table)
    on, plan, reason = decide(table, expected_tokens, width)
    if on and (engine.compiled is None or engine.kernel_plan.name != plan):
        engine.use_eager(plan)
        if engine.use_compiled():  # from the cache: this compile's seconds (warm, most likely) price the next
            if engine.compiled_now_seconds is not None:  # none if this process had compiled them already
                table["compile_seconds"] = engine.compiled_now_seconds
                _write_cache(path, key, table)
        else:
            on, reason = False, f"compile failed: {engine.compile_error}"
    if not on:
        engine.use_eager(plan)
    eager_txt = ", ".join(f"eager {p} {ms:.1f} ms" for p, ms in table["eager_ms"].items())
    compiled_txt = f"compiled {table['compiled_ms']:.1f} ms" if table.get("compiled_ms") else "compiled -"
    log.info("compile auto at width %d: %s (%s, %s%s)", width, "compiled steps" if on else f"eager {plan} steps",
             compiled_txt, eager_txt, ", cached" if cached else "")
    return CompileChoice(on, engine.kernel_plan.name, table["eager_ms"], table.get("compiled_ms"),
                         engine.compiled.compile_seconds if on and engine.compiled else table.get("compile_seconds"),
                         reason, cached)
