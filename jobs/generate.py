"""The offline generation job: ``python -m jobs.generate [--config FILE] [key=value ...]``.

Configuration: the structured defaults in ``pipeline.config``, then ``--config`` (YAML), then
``key=value`` overrides (OmegaConf dot-list). Unknown keys and values of the wrong type are errors
that name the key; value ranges are checked by ``pipeline.config.validate``.

Ray: with ``ray.address`` or ``$RAY_ADDRESS`` set it joins that cluster (as ``ray job submit``
does); otherwise it starts a local one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import io as storage_io
from pipeline.config import PipelineConfig, validate


def load_config(config_file: str | None, overrides: list[str], schema=PipelineConfig, check=validate):
    """Structured defaults <- YAML file <- ``key=value`` overrides, as a validated ``schema`` instance."""
    try:
        cfg = OmegaConf.structured(schema)
        if config_file:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(config_file))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must be key=value, got {bad[0]!r}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ValueError(f"{key}: {msg}" if key else msg) from None
    return check(obj)


def init_ray(cfg: PipelineConfig, concurrency: int | None = None) -> int | None:
    """Join ``ray.address`` / ``$RAY_ADDRESS``, else start a local cluster sized for ``concurrency``
    actors (default ``ray.concurrency``). Returns the machine's cores when it started a local one."""
    import ray

    if ray.is_initialized():  # embedded use (tests): the caller owns Ray
        return None
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return None
    # a local cluster: logical CPUs for the actor pool plus the read tasks, even on a 2-core machine;
    # the machine is the job's, so its cores are shared among the actors' torch threads
    cores = os.cpu_count() or 1
    if concurrency is None and cfg.engine.threads is None:
        cfg.engine.threads = max(1, cores // cfg.ray.concurrency)
    need = int((concurrency or cfg.ray.concurrency) * cfg.ray.num_cpus_per_actor) + 2
    ray.init(num_cpus=max(cores, need), include_dashboard=False)
    return cores


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped, e.g. by pytest)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging() -> None:
    log = logging.getLogger("pipeline")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False  # libraries that configure the root logger (absl, via rouge-score) would repeat it


def save_run_config(cfg) -> None:
    """The resolved config next to the outputs (``run_config.yaml``), credentials masked."""
    storage_io.write_run_config(cfg, cfg.output.path)


def job_parser(job: str, doc: str, example: str) -> argparse.ArgumentParser:
    """``python -m jobs.<job> [--config FILE] [key=value ...]`` (a job adds its own flags)."""
    p = argparse.ArgumentParser(prog=f"python -m jobs.{job}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML config file (e.g. configs/{job}.yaml)")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    return p


def reported(fn, *args) -> int:
    """Run a job's body: bad input it finds on the way is one line on stderr and exit status 2."""
    try:
        fn(*args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = job_parser("generate", __doc__, "input.path=s3://bucket/x.jsonl").parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from pipeline.run import run

    init_ray(cfg)
    save_run_config(cfg)
    return reported(run, cfg)


if __name__ == "__main__":
    sys.exit(main())
