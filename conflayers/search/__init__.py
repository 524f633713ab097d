"""Skip-set search: which layers a layer-skip draft skips. Enter by ``policy`` (``make_policy(name,
model, **knobs)`` builds any searcher by name).

- ``policy``: ``make_policy`` and the searcher names (``conflayers``, ``static``, ``swift``,
  ``none``, ``cached``).
- ``conflayers``: ``ConfLayersSearch`` and ``SearchConfig``, the paper's iterative
  confidence-guided search (ALGORITHM.md §3-§6) with the throughput objective.
- ``swift``: ``SwiftSearch``, SWIFT's random sets plus Bayesian optimisation (the baseline).
- ``static``: the searchers that do not search (``none``, ``static``, ``cached``).
- ``confidence``: the confidence pass (§3), the skip rule (§4), the λ controller (§5) and what the
  pass reads.
- ``registry``: searched sets saved per (model, dataset) in a JSON file.
- ``plot``: ``python -m conflayers.search.plot``, a PNG of one proposal (confidences, thresholds,
  windows, the set).
"""
