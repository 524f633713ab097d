"""Attention for grouped-query models when a pass scores several new tokens per row (verify, prefill).

transformers' SDPA path avoids copying keys and values for grouped-query attention (GQA: ``n_rep``
query heads share one key/value head) only for a single query token (``pack_gqa``) or when there is
no mask (``enable_gqa``). A verify pass of ``q > 1`` tokens under the engine's 4D mask takes the
third branch, ``repeat_kv``, which copies every layer's keys and values ``n_rep`` times over the
whole context. On the 2-core CPU that copy was 60% of a verify pass (SmolLM2, 7 rows, q = 3, 1,400
cached tokens: 1.07 s instead of 0.2 s), and it grows with context and width, so the longer the
rows the less any draft could pay.

``packed_sdpa`` stacks the ``n_rep`` query heads that share a key/value head along the query axis,
``[B, H, q, D] -> [B, H_kv, n_rep * q, D]``, and repeats the mask (shared by all heads) ``n_rep``
times along that axis: one SDPA call over the keys and values as cached, no copy; the same attention
up to float rounding (the kernel blocks the longer query axis differently). Where it cannot apply (no
GQA, one query token, a per-head mask, a causal pass without a mask) it hands over to
transformers' own SDPA function.

It is registered with transformers' public ``AttentionInterface`` (and the mask interface, with
SDPA's mask builder), and ``use_packed_attention(model)`` switches a model that runs SDPA to it:
the model classes are untouched.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "conflayers_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """SDPA over ``query`` [B, H, q, D] and unrepeated ``key`` / ``value`` [B, H_kv, kv, D]; returns the
    attention output [B, q, H, D] (transformers' attention-function contract)."""
    b, h, q, d = query.shape
    n_rep = h // key.shape[1]
    mask = attention_mask
    if (n_rep == 1 or q == 1 or mask is None or mask.shape[1] != 1 or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    mask = mask[:, :, :, : key.shape[-2]].repeat(1, 1, n_rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, h // n_rep, n_rep * q, d), key, value, attn_mask=mask,
        dropout_p=dropout, scale=scaling)
    # reshape, not view: CUDA kernels may return a non-contiguous output
    return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def grouped_query(model) -> bool:
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return bool(heads) and kv_heads < heads


def use_packed_attention(model) -> str:
    """Switch a GQA model that runs SDPA to ``packed_sdpa`` (in place); returns the attention
    implementation in effect."""
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    if current == "sdpa" and grouped_query(model):
        model.set_attn_implementation(NAME)
        return NAME
    return current
