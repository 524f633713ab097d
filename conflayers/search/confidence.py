"""Layer confidence and the skip rule (ALGORITHM.md §3–§5), as pure functions.

- ``sublayer_confidence(h)``: how peaked a sublayer's update is, ``1 - H/log(hidden)``.
- ``layer_confidences(model, ids, window)``: one fresh full-model forward (no cache) over a
  row's tokens; ``c_i = conf(attn_i) + conf(mlp_i)`` over the last ``window`` positions for every
  intermediate layer ``1 … L-2``.
- ``skip_rule(c, lam)``: z-scores → curvature-scaled windows → local thresholds → the layers
  whose confidence is a local dip.
- ``update_lambda(lam, ratio, rho)``: the λ controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..layers import capture_sublayers, num_layers


def sublayer_confidence(h: torch.Tensor) -> float:
    """``h`` [T, hidden]: 1 − mean_t(entropy(softmax(h_t))) / log(hidden)."""
    h = h.double()
    logp = torch.log_softmax(h, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return float(1.0 - entropy / math.log(h.shape[-1]))


@torch.inference_mode()
def layer_confidences(model, token_ids: list[int], window: int) -> np.ndarray:
    """Confidences ``c`` [L-2] of layers 1 … L-2 over the last ``window`` of ``token_ids`` (§3).

    The whole sequence runs through the full model in one fresh forward (the earlier tokens are
    context); only the last ``window`` positions enter the entropy mean.
    """
    if not token_ids:
        raise ValueError("layer_confidences needs at least one token")
    L = num_layers(model)
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(token_ids)], dtype=torch.long, device=device)
    w = max(1, min(int(window), ids.shape[1]))
    with capture_sublayers(model) as cap:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return np.array(
        [sublayer_confidence(cap[i]["attn"][0, -w:]) + sublayer_confidence(cap[i]["mlp"][0, -w:]) for i in range(1, L - 1)]
    )


@dataclass
class SkipRule:
    """One proposal and everything that led to it (for plots and tests)."""

    layers: frozenset[int]  # the skip set (model layer indices)
    z: np.ndarray  # standardised confidence per intermediate layer
    g: np.ndarray  # curvature weights in [0, 1], mean 0.5
    run: int
    windows: np.ndarray  # w_k
    thresholds: np.ndarray  # t_k


def leading_run(x: np.ndarray) -> int:
    """Length of the leading run of equal values."""
    n = 1
    while n < len(x) and x[n] == x[0]:
        n += 1
    return n


def curvature_weights(z: np.ndarray) -> tuple[np.ndarray, int]:
    """§4.2: second derivative of ``z``, min-max scaled, then mapped affinely to mean 0.5 in [0, 1]."""
    if len(z) < 2:
        return np.full(len(z), 0.5), len(z)
    g = np.gradient(np.gradient(z))
    run = leading_run(g)
    lo, hi = g.min(), g.max()
    if hi == lo:
        return np.full(len(z), 0.5), run
    g = (g - lo) / (hi - lo)
    m = g.mean()
    # g' = 0.5 + s (g - m); the largest s that keeps both ends inside [0, 1]
    limits = []
    if g.max() > m:
        limits.append(0.5 / (g.max() - m))
    if g.min() < m:
        limits.append(0.5 / (m - g.min()))
    s = min(limits) if limits else 0.0
    return np.clip(0.5 + s * (g - m), 0.0, 1.0), run


def window_sizes(g: np.ndarray, n_layers: int, alpha: float) -> np.ndarray:
    """§4.3: ``w_k = 2 + floor(alpha · g_k · (k+1) / L)``."""
    k = np.arange(len(g))
    return 2 + np.floor(alpha * g * (k + 1) / n_layers).astype(int)


def skip_rule(c: np.ndarray, lam: float, n_layers: int | None = None, alpha_cap: int | None = None) -> SkipRule:
    """§4: the layers (1 … L-2) whose confidence dips below their neighbourhood's threshold.

    ``c`` holds the confidences of layers 1 … L-2 (so ``L = len(c) + 2`` unless given);
    ``alpha_cap`` caps α (the reference uses ``L // 3`` for Qwen models).
    """
    c = np.asarray(c, dtype=float)
    L = n_layers if n_layers is not None else len(c) + 2
    if len(c) != L - 2:
        raise ValueError(f"expected {L - 2} confidences for a {L}-layer model, got {len(c)}")
    z = (c - c.mean()) / (c.std() + 1e-6) if len(c) else c
    g, run = curvature_weights(z)
    alpha = 5 * run
    if alpha_cap is not None:
        alpha = min(alpha, alpha_cap)
    w = window_sizes(g, L, alpha)
    t = np.zeros(len(z))
    skip = set()
    for k in range(len(z)):
        half = int(w[k]) // 2
        nbhd = [j for j in range(max(0, k - half), min(len(z), k + half + 1)) if j != k]
        if nbhd:
            t[k] = z[nbhd].mean() - lam * z[nbhd].std()
        if z[k] < t[k]:
            skip.add(k + 1)  # position k is layer k+1
    return SkipRule(frozenset(skip), z, g, run, w, t)


def update_lambda(lam: float, ratio: float, rho: float, step: float = 0.05, band: float = 0.25) -> float:
    """§5: keep the skip ratio in ``[rho, rho + band]``."""
    if ratio > rho + band:
        return lam + step
    if ratio < rho:
        return lam - step
    return lam


def recent_context(history: list[int], generated: int | None, window: int) -> list[int]:
    """The prompt plus the row's last ``window`` generated tokens (the confidence pass's input)."""
    if generated is None:
        return list(history)
    prompt = len(history) - generated
    return list(history[:prompt]) + list(history[prompt:][-window:])


def longest_row(outcome) -> int:
    """The row with the most generated tokens in a ``StepOutcome`` (the one the searchers read)."""
    gen = outcome.generated or [len(h) for h in outcome.histories]
    return int(np.argmax(gen))
