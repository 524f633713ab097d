"""The n-gram drafter: prompt lookup over each row's prompt + output, batched, at no model cost.

For each row the last ``n`` tokens (``n`` from ``max_ngram`` down to ``min_ngram``) are looked up in
the row's earlier tokens; the tokens that followed the most recent earlier occurrence are the draft
(up to ``max_tokens``, and the row's budget). Where outputs copy the input (extraction,
translation, code edits, summaries quoting the text) drafts are long and mostly accepted; where they
do not, most rows have no match and decode plainly.

Each row keeps an index {n-gram: end position of its latest occurrence} that is extended by the
tokens committed since the last step, so a step costs O(new tokens) per row, not O(context).
Rows are recognised by their history list (the engine extends each row's list in place); an
index whose list is gone is dropped. The proposal is deterministic (``q=None``): the engine's
rejection rule treats it as one-hot, so sampling keeps the target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .seam import DraftContext, Proposal, StepOutcome


@dataclass
class _Index:
    history: list[int]
    upto: int = 0  # n-grams ending at positions < upto are indexed (each with a token after it)
    last: dict[tuple[int, ...], int] = field(default_factory=dict)


class NgramDrafter:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_tokens: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_ngram, self.min_ngram, self.max_tokens = max_ngram, min_ngram, max_tokens
        self._rows: dict[int, _Index] = {}

    def _index(self, history: list[int]) -> _Index:
        ix = self._rows.get(id(history))
        if ix is None or ix.history is not history or ix.upto > len(history):
            ix = self._rows[id(history)] = _Index(history)
        end = len(history) - 1  # the last token has nothing after it yet
        for p in range(max(ix.upto, 1), end + 1):  # n-grams history[p-n:p], followed by history[p]
            for n in range(self.min_ngram, min(self.max_ngram, p) + 1):
                ix.last[tuple(history[p - n : p])] = p
        ix.upto = max(ix.upto, end + 1)
        return ix

    def candidates(self, histories: list[list[int]], limits: list[int]) -> list[list[int]]:
        """Each row's draft (possibly empty) of at most ``limits[b]`` tokens."""
        out = []
        for hist, limit in zip(histories, limits):
            limit = min(limit, self.max_tokens)
            draft: list[int] = []
            if limit > 0 and len(hist) > 1:
                ix = self._index(hist)
                for n in range(min(self.max_ngram, len(hist) - 1), self.min_ngram - 1, -1):
                    p = ix.last.get(tuple(hist[-n:]))
                    if p is not None:
                        draft = hist[p : p + limit]
                        break
            out.append(draft)
        live = {id(h) for h in histories}
        for k in [k for k in self._rows if k not in live]:
            del self._rows[k]
        return out

    def propose(self, ctx: DraftContext) -> Proposal:
        drafts = self.candidates(ctx.histories, ctx.max_draft.tolist())
        return proposal_from(drafts, ctx.last_tokens.device, self.name)

    def observe(self, outcome: StepOutcome) -> None:
        pass


def proposal_from(drafts: list[list[int]], device, drafter: str, sources: list[str] | None = None) -> Proposal:
    """A deterministic proposal from per-row token lists (padding past each row's length);
    ``sources``: per row, which drafter made its draft (per-row step counts)."""
    k = max((len(d) for d in drafts), default=0)
    # one padded host list, one copy to the device (not one per row: on a GPU each is a transfer)
    tokens = torch.tensor([list(d) + [0] * (k - len(d)) for d in drafts], dtype=torch.long,
                          device=device).reshape(len(drafts), k)
    lens = torch.tensor([len(d) for d in drafts], dtype=torch.long, device=device)
    return Proposal(tokens, lens, drafter=drafter, sources=sources)
