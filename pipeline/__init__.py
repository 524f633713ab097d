"""The Ray Data batch-inference pipeline around the ``conflayers`` engine.

The generation core, at this level: ``run`` (the driver; entry point ``python -m jobs.generate``),
``reader`` (corpus -> rows), ``actor`` (the ``map_batches`` generation stage), ``coordinator``
(cluster-wide advice: skip sets, cost surfaces, progress, the corpus pool's addresses) and ``advice``
(an actor's bounded, never-blocking side of it), ``corpus`` / ``corpus_pool`` (saved indexes, the
run's pooled outputs in storage), ``memory`` (what actors declare to Ray), ``policies`` (where
``conflayers.search`` plugs in), ``metrics``, ``progress`` (the job's progress display), ``idsets``
(resume and exactly-once id accounting), ``io`` (local / s3 storage), ``config`` (plain dataclasses).

A sub-package per use, each built on the core: ``summarize`` (scheduled summarization),
``cost`` (cluster cost comparison), ``serve`` (the OpenAI-compatible endpoint).
"""
