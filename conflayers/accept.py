"""The verify/accept step as pure functions of the verify logits and the draft.

Shapes: ``draft`` [B, k] token ids (entries at or past a row's length are padding), ``lens``
[B] draft lengths ``d`` (0 = no draft for that row), ``p`` [B, k+1, V] verify distributions
``p_0 … p_k``, ``q`` [B, k, V] draft distributions. Both return ``a`` [B] (accepted draft
tokens) and ``y`` [B] (the token the verify pass adds: the correction, or the bonus when the
whole draft was accepted). A step therefore commits ``draft[:a] + [y]``.
"""

from __future__ import annotations

import torch


def _first_false(ok: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row."""
    return ok.long().cumprod(-1).sum(-1)


def _within(lens: torch.Tensor, k: int) -> torch.Tensor:
    return torch.arange(k, device=lens.device)[None, :] < lens[:, None]


def accept_greedy(draft: torch.Tensor, lens: torch.Tensor, target_logits: torch.Tensor):
    """Longest prefix of the draft that equals the full model's argmax, plus the model's next token."""
    k = draft.shape[1]
    target = target_logits.argmax(-1)  # [B, k+1]
    ok = (draft == target[:, :k]) & _within(lens, k)
    a = _first_false(ok)
    y = target.gather(1, a[:, None]).squeeze(1)
    return a, y


def accept_sampled(
    draft: torch.Tensor,
    lens: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    generator: torch.Generator | None = None,
):
    """Speculative sampling (Leviathan et al.; Chen et al.): the committed tokens are distributed
    exactly as sampling from ``p`` token by token.

    Draft token ``x_i`` is accepted with probability ``min(1, p(x_i) / q(x_i))``; at the first
    rejection ``y ~ normalize(max(0, p - q))``; if all ``d`` are accepted ``y ~ p_d``.
    """
    B, k = draft.shape
    if k:
        idx = draft[..., None]
        px = p[:, :k].gather(-1, idx).squeeze(-1)
        qx = q.gather(-1, idx).squeeze(-1)
        u = torch.rand(px.shape, generator=generator, device=px.device, dtype=px.dtype)
        ok = (u * qx < px) & _within(lens, k)  # u < p/q without dividing by q
        a = _first_false(ok)
    else:
        a = torch.zeros(B, dtype=torch.long, device=draft.device)
    p_a = p.gather(1, a[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
    rejected = a < lens
    if k and bool(rejected.any()):
        q_a = q.gather(1, a.clamp(max=k - 1)[:, None, None].expand(-1, 1, q.shape[-1])).squeeze(1)
        residual = (p_a - q_a).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        # p == q exactly at a rejected position has probability 0; fall back to p for safety
        residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_a)
        p_a = torch.where(rejected[:, None], residual, p_a)
    y = torch.multinomial(p_a, 1, generator=generator).squeeze(-1)
    return a, y


def commit(
    draft_row: list[int], a: int, y: int, stop_ids: frozenset[int], remaining: int
) -> tuple[list[int], str | None]:
    """Tokens one row commits this step, cut at the first stop token or the token budget.

    Returns (tokens, finish_reason) where finish_reason is "stop", "length" or None.
    """
    tokens = list(draft_row[:a]) + [y]
    for i, t in enumerate(tokens):
        if t in stop_ids and i < remaining:
            return tokens[: i + 1], "stop"
    if len(tokens) >= remaining:
        return tokens[:remaining], "length"
    return tokens, None
