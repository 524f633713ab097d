"""The cost model: what a step costs on this device, and what follows from it. Enter by
``surface`` (``CostSurface``, the measured step seconds by width and verify length).

- ``surface``: ``CostSurface`` (calibrated, refined online by the engine's own steps) and the
  expected tokens a draft commits.
- ``calibrate``: times the surface on this device and caches it (``python -m
  conflayers.costs.calibrate`` prints it and draws a heatmap).
- ``width``: ``choose_width``, how many rows to keep in flight within a KV budget.
- ``forecast``: replays the continuous-batching loop on a surface (the cost job's predictions).
- ``compile``: ``choose_compile``, whether compiled steps pay at a run's width and length (and which
  kernel plan is fastest eagerly).
"""
