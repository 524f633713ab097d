"""The online endpoint: ``python -m jobs.serve [--config configs/serve.yaml] [key=value ...]``.

Starts a local Ray (or joins ``ray.address`` / ``$RAY_ADDRESS``), runs the OpenAI-compatible app of
``pipeline.serve`` on ``serve.host``:``serve.port`` and serves until interrupted (Ctrl-C, SIGTERM),
then shuts Serve down. The same app under Serve's own CLI:

    serve run jobs.serve:app_builder config=configs/serve.yaml search.drafter=ngram

(every argument but ``config`` is a ``key=value`` override; there Serve's own HTTP options, not
``serve.host`` / ``serve.port`` / ``serve.request_timeout_s``, decide where it listens and when its proxy
times a request out: 127.0.0.1:8000, no proxy timeout by default; the replica still ends a request at
``serve.request_timeout_s``).
"""

from __future__ import annotations

import signal
import sys
import threading

from jobs.generate import _setup_logging, init_ray, job_parser, load_config
from pipeline.serve.app import ServeConfig, build_app, served_model_name, validate_serve
from pipeline.serve.errors import install as install_openai_errors


def start(cfg: ServeConfig) -> str:
    """Run the app on this Ray cluster (Ray must be initialized); returns its base URL."""
    from ray import serve

    s = cfg.serve
    # request_timeout_s: Serve's proxy answers 408 to a request not answered in time (queued included) and
    # cancels it in the replica; the ingress enforces the same deadline where these options are not ours
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"


def app_builder(args: dict):
    """For ``serve run jobs.serve:app_builder config=FILE key=value ...``."""
    args = dict(args)
    cfg = load_config(args.pop("config", None), [f"{k}={v}" for k, v in args.items()], ServeConfig, validate_serve)
    return build_app(cfg)


def main(argv: list[str] | None = None) -> int:
    args = job_parser("serve", __doc__, "serve.port=8000 search.registry=outputs/registry.json").parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides, ServeConfig, validate_serve)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if isinstance(cfg.serve.num_replicas, int):
        cfg.ray.concurrency = cfg.serve.num_replicas  # a local cluster shares its cores among the replicas
    cfg.ray.num_cpus_per_actor = cfg.serve.num_cpus
    install_openai_errors()  # Serve's proxy answers overload (503, 408) in OpenAI's error shape
    init_ray(cfg)

    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = start(cfg)
    print(f"serving {served_model_name(cfg)!r} at {url}/v1 (OpenAI API; GET {url}/healthz); Ctrl-C stops",
          flush=True)
    try:
        stop.wait()
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
