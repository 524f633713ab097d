"""The scheduled summarization job: ``python -m jobs.summarize [--config FILE] [--once] [key=value ...]``.

Points at a directory or ``s3://`` prefix where documents keep landing and summarizes each new or
changed document once (``pipeline.summarize``): summaries per run under
``<output>/runs/<run_id>/summaries/``, one row per run in ``<output>/runs.parquet``.

- default: a long-lived driver (e.g. under ``ray job submit``) that runs a tick at every time of
  ``schedule.cron`` in ``schedule.timezone``; with ``schedule.catch_up=true`` it first runs the
  ticks missed since the last recorded run;
- ``--once``: one tick now, then exit (for an external scheduler: cron, a KubeRay RayCronJob,
  Airflow); ``--tick 2026-11-26T01:00:00Z`` runs the tick of that time instead (a backfill; a
  tick already committed is not redone).

Configuration as ``jobs.generate``: structured defaults (``pipeline.summarize.run.SummarizeConfig``),
then ``--config`` (``configs/summarize.yaml``), then ``key=value`` overrides; the model, storage,
generation, engine, search and ray sections are the generation job's.
Exit status: 0 ok (a tick skipped because another run holds the lock is ok, and says so), 1 a
tick failed, 2 bad configuration.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone

from jobs.generate import _setup_logging, init_ray, job_parser, load_config, save_run_config
from pipeline.summarize.schedule import Schedule
from pipeline.summarize.run import SummarizeConfig, missed_ticks, read_runs, run_tick, runs_table, validate_summarize

log = logging.getLogger("pipeline")


def _parse_tick(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--tick: {text!r} is not an ISO time such as 2026-11-26T01:00:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _tick(cfg: SummarizeConfig, tick: datetime) -> bool:
    try:
        row = run_tick(cfg, tick)
    except (ValueError, FileNotFoundError) as e:
        log.error("tick %s failed: %s (nothing of it is committed)", tick.isoformat(), e)
        return False
    except Exception:
        log.exception("tick %s failed (nothing of it is committed; its documents stay pending)", tick.isoformat())
        return False
    print(runs_table(read_runs(cfg) if row["status"] != "skipped" else [row]), flush=True)
    return True


def serve_schedule(cfg: SummarizeConfig, schedule: Schedule) -> None:
    """Run ticks for ever (until interrupted)."""
    if cfg.schedule.catch_up:
        missed = missed_ticks(cfg, schedule, datetime.now(timezone.utc))
        log.info("catch-up: %d missed tick(s) to run", len(missed))
        for t in missed:
            _tick(cfg, t)
    while True:
        nxt = schedule.next_after(datetime.now(timezone.utc))
        log.info("next tick at %s (%s)", nxt.isoformat(), cfg.schedule.cron)
        while (left := (nxt - datetime.now(timezone.utc)).total_seconds()) > 0:
            time.sleep(min(left, 60.0))
        _tick(cfg, nxt)


def main(argv: list[str] | None = None) -> int:
    p = job_parser("summarize", __doc__, "input.path=s3://bucket/docs/")
    p.add_argument("--once", action="store_true", help="run one tick now and exit")
    p.add_argument("--tick", help="run the tick of this time (ISO, e.g. 2026-11-26T01:00:00Z) and exit")
    args = p.parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides, SummarizeConfig, validate_summarize)
        schedule = Schedule(cfg.schedule.cron, cfg.schedule.timezone)
        tick = _parse_tick(args.tick) if args.tick else None
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    init_ray(cfg)
    save_run_config(cfg)
    if args.once or tick is not None:
        return 0 if _tick(cfg, tick or datetime.now(timezone.utc).replace(microsecond=0)) else 1
    try:
        serve_schedule(cfg, schedule)
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
