"""The Ray Data batch-inference pipeline around the ``conflayers`` engine.

``reader`` (corpus -> rows), ``actor`` (the ``map_batches`` generation stage), ``coordinator``
(cluster-wide skip sets), ``policies`` (where ``conflayers.search`` plugs in), ``metrics``,
``io`` (local / s3 storage), ``config`` (plain dataclasses) and ``run`` (the driver).
"""
