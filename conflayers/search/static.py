"""The searchers that do not search: ``none`` (plain decoding), ``static`` (one fixed set) and
``cached`` (a set loaded from the skip-set registry)."""

from __future__ import annotations

from dataclasses import asdict

from ..drafts.layerskip import FixedSkip
from ..drafts.seam import StepOutcome


def every_other_layer(n_layers: int) -> frozenset[int]:
    """Layers 1, 3, 5, … among the intermediate layers 1 … L-2."""
    return frozenset(range(1, n_layers - 1, 2))


class PlainPolicy:
    """``none``: never skips anything; every step is plain decoding."""

    name = "none"

    def skip_set(self):
        return None

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def state(self) -> dict:
        return {"searcher": self.name, "phase": "plain", "skip_set": None}


class StaticSkip(FixedSkip):
    """``static``: one fixed set (an empty set means plain decoding)."""

    name = "static"

    def skip_set(self):
        return self.layers or None

    def state(self) -> dict:
        return {"searcher": self.name, "phase": "installed" if self.layers else "plain", "skip_set": sorted(self.layers)}


class CachedSkip(StaticSkip):
    """``cached``: a set loaded from the skip-set registry (no search)."""

    name = "cached"

    def __init__(self, entry):
        super().__init__(entry.layers)
        self.entry = entry

    def state(self) -> dict:
        return {**super().state(), "searcher": self.name, "cache": asdict(self.entry)}
