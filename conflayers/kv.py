"""The engine's one KV cache, shared by draft and verify passes.

Storage is append-only and position-addressed: every forward appends its tokens as new storage
columns of a transformers ``DynamicCache``; a per-row ``valid`` mask says which columns are real
context for that row, and each row keeps its own next position (rows of a batch accept different
numbers of tokens per step). Rejected draft columns are masked, never copied out; draft-only
writes are dropped by truncating back to the committed length (``rollback``). When masked
columns pile up, ``compact`` gathers each row's valid columns together again.

The attention mask handed to the model is a ready 4D additive mask, which transformers models
use as given, so the model's own mask construction never has to understand the holes.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVState:
    def __init__(self, model, valid: torch.Tensor, next_pos: torch.Tensor):
        self.model = model
        self.cache = DynamicCache()
        self.valid = valid  # [B, T] bool: committed storage columns that are context for the row
        self.next_pos = next_pos  # [B] long: position id of the row's next token
        self.pending = 0  # columns appended since the last commit (draft writes)
        self.dtype = next(model.parameters()).dtype
        # eager attention adds the mask to the scores; SDPA (the default) also accepts booleans
        self.additive_mask = getattr(model.config, "_attn_implementation", "eager") != "sdpa"

    @property
    def committed_len(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]

    def attention_mask(self, q_len: int, new_valid: torch.Tensor) -> torch.Tensor:
        """[B, 1, q, kv] mask (boolean for SDPA, additive otherwise): causal over storage order,
        restricted to valid columns."""
        kv_valid = torch.cat([self.valid, new_valid], dim=1)
        kv_len = kv_valid.shape[1]
        device = kv_valid.device
        q_idx = torch.arange(kv_len - q_len, kv_len, device=device)
        causal = torch.arange(kv_len, device=device)[None, :] <= q_idx[:, None]
        allowed = causal[None] & kv_valid[:, None, :]
        allowed[:, torch.arange(q_len, device=device), q_idx] = True  # a padding query still sees itself
        if not self.additive_mask:  # SDPA takes a boolean mask (True = attend): cheaper than an additive one
            return allowed[:, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    def forward(
        self,
        tokens: torch.Tensor,
        logits_to_keep: int = 0,
        token_valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model (under whatever layer plan is active) over ``tokens`` [B, q] appended after
        everything in storage; returns logits [B, q or logits_to_keep, V].

        By default the new tokens are all real and numbered on from each row's next position;
        prefill passes ``token_valid`` (padding) and ``positions`` explicitly.
        """
        B, q = tokens.shape
        if token_valid is None:
            token_valid = torch.ones(B, q, dtype=torch.bool, device=tokens.device)
        pending_valid = torch.ones(B, self.pending, dtype=torch.bool, device=tokens.device)
        mask = self.attention_mask(q, torch.cat([pending_valid, token_valid], dim=1))
        if positions is None:
            positions = self.next_pos[:, None] + self.pending + torch.arange(q, device=tokens.device)[None, :]
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.pending += q
        return out.logits

    def rollback(self) -> None:
        """Drop every column written since the last commit (draft KV, in every layer that wrote any)."""
        T = self.committed_len
        for layer in self._layers():
            if layer.keys.shape[-2] > T:
                layer.keys = layer.keys[..., :T, :]
                layer.values = layer.values[..., :T, :]
        self.pending = 0

    def commit(self, accepted: torch.Tensor) -> None:
        """After a verify forward of width ``w``: row i keeps its first ``accepted[i] + 1`` new columns
        (the last committed token and the accepted drafts); the rest stay in storage, masked."""
        w = self.pending
        keep = torch.arange(w, device=accepted.device)[None, :] <= accepted[:, None]
        self.valid = torch.cat([self.valid, keep], dim=1)
        self.next_pos = self.next_pos + accepted + 1
        self.pending = 0
        if self.committed_len > 32 and self.committed_len > 1.5 * int(self.valid.sum(1).max()) + 16:
            self.compact()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (finished rows stop costing work)."""
        self.rollback()
        for layer in self._layers():
            layer.keys = layer.keys[rows]
            layer.values = layer.values[rows]
        self.valid = self.valid[rows]
        self.next_pos = self.next_pos[rows]
        self.compact()

    def compact(self) -> None:
        """Gather each row's valid columns together, right-aligned, dropping the masked ones."""
        counts = self.valid.sum(1)
        new_len = int(counts.max()) if counts.numel() else 0
        if new_len == self.committed_len:
            return
        T = self.committed_len
        # sort key: invalid columns first, then valid ones in storage order (stable)
        key = self.valid.long() * (T + 1) + torch.arange(T, device=self.valid.device)[None, :]
        order = key.argsort(dim=1)[:, T - new_len :]
        for layer in self._layers():
            B, H, _, D = layer.keys.shape
            idx = order[:, None, :, None].expand(B, H, new_len, D)
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, idx)
        self.valid = self.valid.gather(1, order)
