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

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import io as storage_io
from pipeline.config import PipelineConfig, validate


def load_config(config_file: str | None, overrides: list[str], schema=PipelineConfig, check=validate):
    """Structured defaults <- YAML file <- ``key=value`` overrides, as a validated ``schema`` instance."""
    try:
        cfg = OmegaConf.structured(schema)
        if config_file:
            from_file = _read_yaml(config_file)
            warn_literal_secrets(from_file, config_file)
            cfg = OmegaConf.merge(cfg, from_file)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must be key=value, got {bad[0]!r}")
        from_cli = OmegaConf.from_dotlist(overrides)
        warn_literal_secrets(from_cli, "the command line (visible in ps, shell history and Ray's job list)")
        cfg = OmegaConf.merge(cfg, from_cli)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        if msg.startswith("KeyError raised while resolving interpolation: "):  # ${oc.env:X} with X unset
            msg = msg.split(": ", 1)[1].strip('"')
        raise ValueError(f"{key}: {msg}" if key else msg) from None
    return check(obj)


def _read_yaml(path: str):
    """``--config``: a YAML mapping, or an error naming the file (and the line of a syntax error)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"--config: {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(node, DictConfig):
        raise ValueError(f"--config: {path} must hold a mapping of sections (model:, input:, ...)")
    return node


def warn_literal_secrets(node, where: str) -> None:
    """A credential written out in a config file or on the command line is a warning: give it as
    ``storage.secret: ${oc.env:MY_SECRET}`` (resolved from the environment when the job starts)."""
    storage = node.get("storage") if hasattr(node, "get") else None
    if storage is None:
        return
    for key in ("secret", "key"):
        if key not in storage or OmegaConf.is_interpolation(storage, key):  # never resolve it here
            continue
        if storage.get(key) is not None:
            logging.getLogger("pipeline").warning(
                "storage.%s is written out literally in %s: use ${oc.env:VARIABLE} (or leave it null for the "
                "usual AWS credential chain) so credentials stay out of files and command lines", key, where)


def init_ray(cfg: PipelineConfig, concurrency: int | None = None) -> int | None:
    """Join ``ray.address`` / ``$RAY_ADDRESS``, else start a local cluster sized for ``concurrency``
    actors (default ``ray.concurrency``). Returns the machine's cores when it started a local one."""
    import ray

    if ray.is_initialized():  # embedded use (tests): the caller owns Ray
        return None
    quiet_ray(cfg.progress.verbose)
    level = logging.INFO if cfg.progress.verbose else logging.WARNING  # Ray's own start-up lines: -v
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=level)
        return None
    # a local cluster: logical CPUs for the actor pool plus the read tasks, even on a 2-core machine;
    # the machine is the job's, so its cores are shared among the actors' torch threads
    cores = os.cpu_count() or 1
    if concurrency is None and cfg.engine.threads is None:
        cfg.engine.threads = max(1, cores // cfg.ray.concurrency)
    need = int((concurrency or cfg.ray.concurrency) * cfg.ray.num_cpus_per_actor) + 2
    ray.init(num_cpus=max(cores, need), include_dashboard=False, logging_level=level)
    return cores


def quiet_ray(verbose: bool) -> None:
    """Without ``-v``: Ray Data's own log lines and its progress output off (the job draws its own
    progress, ``pipeline.progress``); warnings and errors still show."""
    if verbose:
        return
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data then warns once that its bars are off, as they are meant to be here
    logging.getLogger("ray.data._internal.progress").addFilter(
        lambda record: not record.getMessage().startswith("Progress bars disabled"))


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


class _JobParser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if ns.verbose:
            ns.overrides.append("progress.verbose=true")
        return ns


def job_parser(job: str, doc: str, example: str) -> argparse.ArgumentParser:
    """``python -m jobs.<job> [--config FILE] [-v] [key=value ...]`` (a job adds its own flags)."""
    p = _JobParser(prog=f"python -m jobs.{job}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML config file (e.g. configs/{job}.yaml)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also Ray's own log lines and Ray Data's progress output (= progress.verbose=true)")
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
