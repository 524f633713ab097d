"""Drafters: what proposes tokens for the verify pass.

The seam has two methods, after transformers' candidate generators:

- ``propose(ctx) -> Proposal``: up to ``k`` tokens per row. A row with length 0 has no proposal
  and is simply decoded plainly by the verify pass; ``k == 0`` for the whole batch is plain
  decoding.
- ``observe(outcome)``: what the verify pass made of the proposal (for drafters that adapt).

``LayerSkipDrafter`` is the self-speculative drafter: chain drafting with the model itself
under a skip set. A drafter that needs no model (an n-gram / prompt-lookup drafter) only reads
``ctx.histories`` and returns ``q=None`` (a deterministic proposal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .layers import skip_layers
from .sampling import SamplingParams, sample, warp


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
    groups: list[str] = field(default_factory=list)  # each row's Request.group (for conflayers.router)


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


class FixedSkip:
    """A skip-set policy that never changes (a searcher implements the same two methods)."""

    def __init__(self, layers=()):
        self.layers = frozenset(layers)

    def skip_set(self) -> frozenset[int] | None:
        return self.layers

    def observe(self, outcome: StepOutcome) -> None:
        pass


class LayerSkipDrafter:
    """Chain drafting with the model itself under a skip set (ALGORITHM.md §2).

    Each row drafts until the draft's top-1 probability falls below ``stop_threshold`` (that
    token is not proposed), it drafts a stop token, or it reaches ``max_draft_len`` / its budget.
    The policy's ``skip_set()`` is asked at every step; ``None`` means "decode plainly now".
    """

    name = "layerskip"

    def __init__(self, model, policy=None, stop_threshold: float = 0.8, max_draft_len: int = 8):
        if not 0.0 <= stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1], got {stop_threshold!r}")
        if max_draft_len < 1:
            raise ValueError(f"max_draft_len must be >= 1, got {max_draft_len!r}")
        self.model = model
        self.policy = policy if policy is not None else FixedSkip()
        self.stop_threshold = stop_threshold
        self.max_draft_len = max_draft_len

    def propose(self, ctx: DraftContext) -> Proposal:
        skip = self.policy.skip_set()
        B = len(ctx.histories)
        device = ctx.last_tokens.device
        limit = ctx.max_draft.clamp(max=self.max_draft_len)
        k_max = int(limit.max()) if B else 0
        if skip is None or k_max <= 0:
            return Proposal.empty(B, device)
        stop_ids = torch.tensor(sorted(ctx.stop_ids), dtype=torch.long, device=device)
        tokens, qs = [], []
        drafting = limit > 0
        lens = torch.zeros(B, dtype=torch.long, device=device)
        current = ctx.last_tokens
        passes = 0
        with skip_layers(self.model, skip):
            for j in range(k_max):
                passes += 1
                logits = ctx.kv.forward(current[:, None], logits_to_keep=1)[:, -1]
                if ctx.sampling.greedy:
                    probs = logits.float().softmax(-1)
                    top1, nxt = probs.max(-1)
                    q = None
                else:
                    q = warp(logits, ctx.sampling)
                    nxt = sample(q, ctx.generator)
                    top1 = q.max(-1).values
                confident = top1 >= self.stop_threshold
                take = drafting & confident
                lens = lens + take.long()
                tokens.append(nxt)
                if q is not None:
                    qs.append(q)
                drafting = take & (lens < limit) & ~torch.isin(nxt, stop_ids)
                if not bool(drafting.any()):
                    break
                current = nxt
        draft = torch.stack(tokens, 1)
        k = int(lens.max())
        return Proposal(draft[:, :k], lens, torch.stack(qs, 1)[:, :k] if qs else None, skip, passes, self.name)

    def observe(self, outcome: StepOutcome) -> None:
        self.policy.observe(outcome)

