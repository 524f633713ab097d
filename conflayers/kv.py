"""The engine's one KV cache, shared by draft and verify passes: preallocated slots, per-row lengths.

Storage is one ``[slots, kv_heads, columns, head_dim]`` tensor pair per layer (nanochat / gpt-fast
style). A row lives in a slot; column ``c`` of the slot holds the row's token at position ``c``,
and ``lengths[slot]`` is how many of its tokens are committed. A forward of ``q`` tokens writes
each row's keys and values in place at ``lengths + pending … + q - 1`` (nothing is re-copied), and
a row attends to exactly the columns below its own query position, so whatever lies past its
length (rejected drafts, a previous occupant's tokens, padding of a batched prefill) is never
seen, and the next write simply overwrites it:

- ``forward`` runs the model (under whatever layer plan is active) over the decode rows, slots
  ``[0, n)``, or over a given slot range (joiners being prefilled);
- ``rollback`` forgets draft writes (``pending = 0``); ``commit(a)`` advances each row by ``a + 1``;
- ``move(src, dst)`` relocates a row (the engine keeps decode rows in the leading slots);
- the engine ``reserve``s the columns its admitted rows will need (prompt + budget), so storage
  is allocated once per size; past that, columns grow by doubling (amortised O(1) per token).
  Slots are fixed at construction; ``kv_bytes_per_token`` lets the caller budget them.

The attention mask handed to the model is a ready 4D mask, which transformers models use as given.
The cache plugs into the model through transformers' public ``Cache`` / ``CacheLayerMixin`` API.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import NAME as PACKED_SDPA
from .compiled import base_attention
from .layers import num_layers


def kv_bytes_per_token(model) -> int:
    """Bytes of keys + values one token of one row occupies, over all layers."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return 2 * num_layers(model) * kv_heads * head_dim * torch.finfo(dtype).bits // 8


class SlotLayer(CacheLayerMixin):
    """One decoder layer's slot storage; writes and reads go through the owning ``KVState``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, state: "KVState"):
        super().__init__()
        self.state = state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, dim = key_states.shape
        shape = (self.state.slots + self.state.scratch_slot, heads, self.state.columns, dim)
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        st = self.state
        st.writes += 1
        lo, hi = st.active
        rows, cols = st.write_index
        self.keys[rows, :, cols] = key_states.transpose(1, 2)
        self.values[rows, :, cols] = value_states.transpose(1, 2)
        return self.keys[lo:hi, :, : st.read_len], self.values[lo:hi, :, : st.read_len]

    def grow(self, columns: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], old.shape[1], columns, old.shape[3])
                new[:, :, : old.shape[2]] = old
                setattr(self, name, new)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.read_len, 0

    def get_seq_length(self) -> int:
        return self.state.read_len

    def get_max_length(self) -> int:
        return -1


def _version_hint() -> str:
    import transformers

    return (f"transformers {transformers.__version__}; conflayers needs >=5.24,<5.25: an older version does not "
            "take the cache as `cache=`")


class KVState:
    def __init__(self, model, slots: int, columns: int = 16, scratch_slot: bool = False):
        self.model = model
        self.slots = slots
        # one more slot past the rows' own, written by the padding rows of static-shape steps and never read
        self.scratch_slot = scratch_slot
        self.columns = max(1, columns)
        self.n_layers = num_layers(model)
        self.device = next(model.parameters()).device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.layers = [SlotLayer(self) for _ in range(self.n_layers)]
        self.cache = Cache(layers=self.layers)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)  # committed tokens per slot
        self.max_columns: int | None = None  # columns the KV budget allows (None: no budget)
        self.n = 0  # decode rows occupy slots [0, n)
        self.pending = 0  # columns written past ``lengths`` since the last commit (draft writes)
        self.writes = 0  # layer writes during the current forward (0 after one: the model ignored the cache)
        # set per forward, read by the layers
        self.active = (0, 0)
        self.write_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self.read_len = 0
        # eager attention adds the mask to the scores; SDPA (the default) also accepts booleans
        self.additive_mask = base_attention(model) not in ("sdpa", PACKED_SDPA)

    def reserve(self, columns: int) -> None:
        """Make room for rows of ``columns`` positions now (one allocation instead of doublings)."""
        self.ensure_columns(columns, exact=True)

    def ensure_columns(self, needed: int, exact: bool = False) -> None:
        if needed <= self.columns:
            return
        new = -(-(needed if exact else max(needed, 2 * self.columns)) // 16) * 16
        if self.max_columns is not None:  # rounding and doubling stay within the KV budget
            new = max(needed, min(new, self.max_columns))
        for layer in self.layers:
            layer.grow(new)
        self.columns = new

    def attention_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[B, 1, q, kv_len] mask (boolean for SDPA, additive otherwise): a query at position p sees its
        row's columns 0..p and nothing else."""
        allowed = torch.arange(kv_len, device=positions.device)[None, None, :] <= positions[:, :, None]
        if not self.additive_mask:
            return allowed[:, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=positions.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    def forward(
        self,
        tokens: torch.Tensor,
        logits_to_keep: int | torch.Tensor = 0,
        rows: tuple[int, int] | None = None,
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model over ``tokens`` [B, q]; returns logits [B, q or len(logits_to_keep), V].

        By default the rows are the decode rows (slots ``[0, n)``) and the new tokens continue each
        row after its committed and pending tokens. Prefill passes a slot range ``rows`` and each
        row's write ``offsets`` (the prompt tokens it already has)."""
        B, q = tokens.shape
        lo, hi = rows if rows is not None else (0, self.n)
        if hi - lo != B:
            raise ValueError(f"{B} token rows for slots [{lo}, {hi})")
        if offsets is None:
            offsets = self.lengths[lo:hi] + self.pending
        positions = offsets[:, None] + torch.arange(q, device=tokens.device)[None, :]
        kv_len = int(offsets.max()) + q
        self.ensure_columns(kv_len)
        slot_idx = torch.arange(lo, hi, device=tokens.device)[:, None].expand(B, q)
        self.active, self.write_index, self.read_len = (lo, hi), (slot_idx, positions), kv_len
        logits = self.run_model(tokens, self.attention_mask(positions, kv_len), positions, logits_to_keep)
        if rows is None:
            self.pending += q
        return logits

    def run_model(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                  logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """The model over this cache (``active``, ``write_index`` and ``read_len`` set by the caller);
        an error if the model never wrote to it (a transformers version that does not take ``cache=``
        would decode without the rows' past and return wrong tokens)."""
        self.writes = 0
        try:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                             use_cache=True, logits_to_keep=logits_to_keep)
        except Exception as e:
            if self.writes:
                raise
            raise RuntimeError(f"the forward failed before it wrote the engine's KV cache: {e} "
                               f"({_version_hint()})") from e
        if not self.writes:
            raise RuntimeError(f"the model did not use the engine's KV cache ({_version_hint()})")
        return out.logits

    def rollback(self) -> None:
        """Forget every column written since the last commit (draft KV): the next write overwrites it."""
        self.pending = 0

    def commit(self, accepted: torch.Tensor) -> None:
        """After a verify forward: decode row i keeps its first ``accepted[i] + 1`` new columns (the last
        committed token and the accepted drafts); what lies past them is never read again."""
        self.lengths[: self.n] += accepted + 1
        self.pending = 0

    def move(self, src: int, dst: int) -> None:
        """Copy the row in slot ``src`` to slot ``dst`` (its committed columns and length)."""
        if src == dst:
            return
        length = int(self.lengths[src])
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[dst, :, :length] = layer.keys[src, :, :length]
                layer.values[dst, :, :length] = layer.values[src, :, :length]
        self.lengths[dst] = length

    def storage_bytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers if l.is_initialized)
