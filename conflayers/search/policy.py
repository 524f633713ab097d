"""Skip-set policies: what ``LayerSkipDrafter`` asks for a skip set at every step.

A policy has two methods: ``skip_set()`` (a frozenset of layers, or ``None`` = decode plainly
this step) and ``observe(outcome)`` (what the verify step made of it). One policy object serves
a whole dataset stream: its state carries across prompts and batches.

- ``ConfLayersSearch``: the iterative confidence-guided search (ALGORITHM.md §6), with two
  objectives: ``acceptance`` (the paper's: mean accepted tokens) and ``throughput`` (default:
  committed tokens per second of decode time, compared against plain decoding measured in the
  same process; a set that does not beat plain decoding is never installed).
- ``SwiftSearch``: SWIFT's random proposals at a fixed skip ratio plus periodic Bayesian
  optimisation, scored by teacher-forced greedy agreement with the full model.
- ``PlainPolicy`` (``none``), ``FixedSkip`` (``static``), ``CachedSkip`` (``cached``).

``make_policy(name, model, **knobs)`` builds any of them.
"""

from __future__ import annotations

from dataclasses import fields

from ..layers import num_layers, validate_skip_set
from .conflayers import ConfLayersSearch, SearchConfig
from .static import CachedSkip, PlainPolicy, StaticSkip, every_other_layer
from .swift import SwiftSearch

SEARCHERS = ("conflayers", "static", "swift", "none", "cached")


def make_policy(name: str, model, **knobs):
    """A skip-set policy by name: conflayers | static | swift | none | cached.

    Knobs: ``conflayers`` takes ``SearchConfig`` fields (``objective``, ``rho``, ``interval``, …);
    ``static`` takes ``layers`` (default every other intermediate layer); ``swift`` takes
    ``skip_ratio``, ``context``, ``max_iter``, ``bo_every``, ``eval_every``, ``min_tokens``, ``seed``;
    ``cached`` takes ``registry`` (path), ``dataset`` and optionally ``model_id``.
    Knobs that are ``None`` are ignored (they mean "the default").
    """
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if name not in SEARCHERS:
        raise ValueError(f"unknown searcher {name!r}: choose one of {', '.join(SEARCHERS)}")
    L = num_layers(model)
    if name == "none":
        _no_knobs(name, knobs)
        return PlainPolicy()
    if name == "static":
        layers = knobs.pop("layers", None)
        _no_knobs(name, knobs)
        return StaticSkip(validate_skip_set(every_other_layer(L) if layers is None else layers, L))
    if name == "swift":
        try:
            return SwiftSearch(model, **knobs)
        except TypeError as e:
            raise ValueError(f"swift: {e}") from None
    if name == "cached":
        from .registry import load_entry, model_identity

        try:
            path, dataset = knobs.pop("registry"), knobs.pop("dataset")
        except KeyError as e:
            raise ValueError(f"the cached searcher needs a {e.args[0]!r} knob") from None
        model_id = knobs.pop("model_id", None) or model_identity(model)
        _no_knobs(name, knobs)
        return CachedSkip(load_entry(path, model_id, dataset, L))
    valid = {f.name for f in fields(SearchConfig)}
    unknown = set(knobs) - valid
    if unknown:
        raise ValueError(f"conflayers: unknown knob(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return ConfLayersSearch(model, **knobs)


def _no_knobs(name: str, knobs: dict) -> None:
    if knobs:
        raise ValueError(f"the {name} searcher takes no knob(s) {sorted(knobs)}")
