"""The drafter seam: what proposes tokens for the verify pass, and what it hears back.

The seam has two methods, after transformers' candidate generators:

- ``propose(ctx) -> Proposal``: up to ``k`` tokens per row. A row with length 0 has no proposal
  and is simply decoded plainly by the verify pass; ``k == 0`` for the whole batch is plain
  decoding.
- ``observe(outcome)``: what the verify pass made of the proposal (for drafters that adapt).

A drafter that needs no model (an n-gram / prompt-lookup drafter) only reads ``ctx.histories``
and returns ``q=None`` (a deterministic proposal). The engine core imports this file and no
other under ``conflayers/drafts/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..sampling import SamplingParams


@dataclass
class DraftContext:
    """What a drafter may look at. ``kv`` runs the model over the shared cache (draft writes are
    rolled back by the engine before verification)."""

    kv: "object"  # conflayers.kv.KVState
    last_tokens: torch.Tensor  # [B] last committed token of each row (not yet in the cache)
    histories: list[list[int]]  # prompt + committed tokens per row
    max_draft: torch.Tensor  # [B] most tokens worth drafting per row (token budget left - 1)
    sampling: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    groups: list[str] = field(default_factory=list)  # each row's Request.group (for conflayers.drafts.router)


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, k] (positions at or past lens[i] are padding)
    lens: torch.Tensor  # [B]
    q: torch.Tensor | None = None  # [B, k, V] draft distributions; None = deterministic (one-hot)
    skip: frozenset[int] = frozenset()
    passes: int = 0  # draft forward passes spent on this proposal (for cost accounting)
    drafter: str = "none"  # which drafter proposed: "none" | "ngram" | "corpus" | "layerskip" (per-row stats)
    sources: list[str] | None = None  # per row, where a mixed proposal's draft came from (else ``drafter``)

    @staticmethod
    def empty(batch: int, device) -> "Proposal":
        return Proposal(
            torch.zeros(batch, 0, dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.long, device=device)
        )


@dataclass
class StepOutcome:
    """One verify step of the whole batch, reported to the drafter."""

    lens: torch.Tensor  # [B] drafted
    accepted: torch.Tensor  # [B] accepted draft tokens
    committed: list[int]  # tokens each row actually committed this step (after stop/budget cuts)
    skip: frozenset[int]
    draft_seconds: float
    verify_seconds: float
    histories: list[list[int]] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)  # tokens generated so far per row (history minus prompt)
    budget: list[int] = field(default_factory=list)  # the row's token budget (max new tokens)

    def restrict(self, rows: list[int]) -> "StepOutcome":
        """The same step seen by a drafter that drafted for ``rows`` only."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.lens.device)

        def pick(values: list) -> list:
            return [values[b] for b in rows] if values else values

        return dataclasses.replace(self, lens=self.lens[idx], accepted=self.accepted[idx],
                                   committed=pick(self.committed), histories=pick(self.histories),
                                   generated=pick(self.generated), budget=pick(self.budget))


class Drafter(Protocol):
    def propose(self, ctx: DraftContext) -> Proposal: ...

    def observe(self, outcome: StepOutcome) -> None: ...


class NoDrafter:
    """Plain decoding: never proposes anything."""

    name = "none"

    def propose(self, ctx: DraftContext) -> Proposal:
        return Proposal.empty(len(ctx.histories), ctx.last_tokens.device)

    def observe(self, outcome: StepOutcome) -> None:
        pass
