"""``LayerSkipDrafter``: the self-speculative drafter, chain drafting with the model itself under
a skip set; ``FixedSkip``, the skip-set policy that never changes (the searchers under
``conflayers/search/`` implement the same two methods)."""

from __future__ import annotations

import torch

from ..layers import skip_layers
from ..sampling import sample, warp
from .seam import DraftContext, Proposal, StepOutcome


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

