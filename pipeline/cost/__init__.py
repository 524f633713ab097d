"""Cluster cost comparison: settings of the job measured or predicted on a corpus sample, priced.

Entry point: ``python -m jobs.cost`` (``jobs/cost.py``), which calls ``run.run_cost``. Files:

- ``run``: the config, the sample, the measured cells (the core pipeline, ``pipeline.run``) and
  the predicted ones (``conflayers.costs.forecast`` on cost surfaces);
- ``report``: pricing every cell, the table, ``cells.parquet``, the Pareto plot, the recommendation;
- ``prices``: the price table (``configs/prices.yaml``).
"""
