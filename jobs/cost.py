"""The cluster cost comparison: ``python -m jobs.cost --config configs/cost.yaml [key=value ...]``.

Runs every cell of ``grid`` (actors x width x drafter x dtype x kernels) on the same sample of the
corpus on this Ray cluster, reads finished runs listed under ``runs``, predicts the settings of
``predict`` from cost surfaces (this device's, measured after the grid, and any calibration files
of other devices), prices every cell from ``prices.path`` and writes ``cost.md`` (table and
recommendation), ``cost.parquet`` and ``pareto.png`` under ``output.path``.
See ``pipeline.cost`` and docs/cost.md.
"""

from __future__ import annotations

import sys

from jobs.generate import _setup_logging, init_ray, job_parser, load_config, reported
from pipeline.cost.run import CostConfig, read_inputs, validate_cost


def main(argv: list[str] | None = None) -> int:
    args = job_parser("cost", __doc__, "grid.max_batch=[4,16] deadline_hours=24").parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides, CostConfig, validate_cost)
        inputs = read_inputs(cfg)  # prices, surface files, finished runs: checked before Ray starts
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from pipeline.cost.run import run_cost

    # a local cluster's cells share this machine's cores among their actors
    local_cores = init_ray(cfg, concurrency=max(cfg.grid.concurrency or [1]))
    return reported(run_cost, cfg, local_cores, inputs)


if __name__ == "__main__":
    sys.exit(main())
