"""Rows of several groups (datasets) in one decode batch, each group under its own drafter.

A layer-skip draft pass runs one skip set for the whole forward, so one step can draft for one
group only. ``GroupRouter`` takes the groups present in the batch in turn: on a group's turn its
drafter proposes for that group's rows (every other row gets ``max_draft = 0`` and is decoded
plainly by the same verify pass), and the outcome of that step, cut down to the group's rows,
goes back to that drafter alone. A drafter thus sees the steps it chose for (its searcher's
``skip_set()`` / ``observe()`` pairs stay matched), timed as whole steps of the shared batch.
With one group this is exactly its drafter.
"""

from __future__ import annotations

import dataclasses

import torch

from .seam import DraftContext, Drafter, Proposal, StepOutcome


class GroupRouter:
    def __init__(self, drafters: dict[str, Drafter]):
        if not drafters:
            raise ValueError("GroupRouter needs at least one group's drafter")
        self.drafters = dict(drafters)
        self._turn = 0
        self._active: tuple[str, list[int]] | None = None

    def propose(self, ctx: DraftContext) -> Proposal:
        if len(ctx.groups) != len(ctx.histories):
            raise ValueError("GroupRouter needs every row's group (Request.group)")
        present = sorted(set(ctx.groups))
        unknown = [g for g in present if g not in self.drafters]
        if unknown:
            raise ValueError(f"no drafter for group(s) {unknown}")
        group = present[self._turn % len(present)]
        self._turn += 1
        rows = [b for b, g in enumerate(ctx.groups) if g == group]
        mine = torch.zeros(len(ctx.groups), dtype=torch.bool, device=ctx.max_draft.device)
        mine[rows] = True
        self._active = (group, rows)
        return self.drafters[group].propose(dataclasses.replace(ctx, max_draft=ctx.max_draft.masked_fill(~mine, 0)))

    def observe(self, outcome: StepOutcome) -> None:
        if self._active is None:
            return
        group, rows = self._active
        self._active = None
        self.drafters[group].observe(outcome.restrict(rows))
