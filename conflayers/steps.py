"""Static-shape decode and verify steps: the same forward as ``KVState.forward``, in shapes a CUDA graph
can replay.

A graph replays fixed kernels on fixed addresses, so every tensor a step reads or writes must keep its
shape and storage from one step to the next. ``StaticSteps.forward`` runs the decode rows' verify pass
(``[last token, draft…]``, ``q`` tokens a row; plain decoding is ``q = 1``) in a shape bucket:

- **rows**: ``n`` decode rows are padded to the width bucket ``W`` (powers of two, and the cache's slot
  count). Padding rows read slots ``[n, W)`` (possibly a joiner mid-prefill: reading is harmless), attend
  to column 0 only, and write their keys and values into the cache's scratch slot, which no real row
  ever reads; their logits are dropped;
- **q** is exact (one bucket per verify length ``1 … max draft + 1``): no query padding;
- **columns**: attention reads the first ``C`` cached columns, ``C`` the power of two (at least
  ``MIN_COLUMNS``) at or above the longest row's last position + 1, capped at the storage; the mask lets
  each query see its own row's columns ``0 … position`` only, so the columns past it change nothing.

Per bucket ``(W, q, C)`` the inputs live in buffers written in place each step (token ids, positions,
the cache write index, the mask), so a step allocates no input tensor and reads and writes the same
addresses every time its bucket recurs. A real row's logits equal ``KVState.forward``'s up to float
rounding (a differently shaped matmul may block its sums differently).

Here the step runs eagerly (CPU, and CUDA without graphs); the dynamic forward stays the engine's
default, since eagerly the padding only adds work. Layer-skip draft passes always run dynamically:
a captured step would replay the full layer set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv import KVState

MIN_COLUMNS = 64


def width_buckets(slots: int) -> list[int]:
    """The row counts a step is padded to: powers of two below ``slots``, and ``slots``."""
    out, w = [], 1
    while w < slots:
        out.append(w)
        w *= 2
    return out + [slots]


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= ``n``."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def column_bucket(needed: int, columns: int) -> int:
    """Columns a step reads: the power of two >= ``needed`` (at least MIN_COLUMNS), at most ``columns``."""
    c = MIN_COLUMNS
    while c < needed:
        c *= 2
    return min(c, columns)


@dataclass
class StepBuffers:
    """One bucket's inputs, written in place each step."""

    tokens: torch.Tensor  # [W, q] token ids
    positions: torch.Tensor  # [W, q] each token's position (its cache column)
    write_rows: torch.Tensor  # [W, q] the slot each token's keys/values go to (padding rows: the scratch slot)
    mask: torch.Tensor  # [W, 1, q, C] boolean (SDPA) or additive (eager attention)


class StaticSteps:
    """Verify/decode steps over ``kv``'s decode rows in bucketed shapes (``kv`` needs a scratch slot)."""

    def __init__(self, kv: KVState):
        if not kv.scratch_slot:
            raise ValueError("static steps need a KVState built with scratch_slot=True (padding rows write there)")
        self.kv = kv
        self.widths = width_buckets(kv.slots)
        self.buffers: dict[tuple[int, int, int], StepBuffers] = {}

    def shape(self, n: int, q: int) -> tuple[int, int, int]:
        """The bucket ``(W, q, C)`` a step of ``n`` rows and ``q`` tokens a row runs in (grows the cache's
        columns first if the rows need more)."""
        kv = self.kv
        needed = int((kv.lengths[:n] + kv.pending).max()) + q
        kv.ensure_columns(needed)
        return bucket(n, self.widths), q, column_bucket(needed, kv.columns)

    def _buffers(self, key: tuple[int, int, int]) -> StepBuffers:
        buf = self.buffers.get(key)
        if buf is None:
            w, q, c = key
            dev, kv = self.kv.device, self.kv
            mask_dtype = kv.dtype if kv.additive_mask else torch.bool
            buf = StepBuffers(
                tokens=torch.zeros(w, q, dtype=torch.long, device=dev),
                positions=torch.zeros(w, q, dtype=torch.long, device=dev),
                write_rows=torch.zeros(w, q, dtype=torch.long, device=dev),
                mask=torch.zeros(w, 1, q, c, dtype=mask_dtype, device=dev),
            )
            self.buffers[key] = buf
        return buf

    def prepare(self, tokens: torch.Tensor) -> tuple[tuple[int, int, int], StepBuffers]:
        """Write a step's inputs (``tokens`` [n, q] for decode rows ``[0, n)``) into its bucket's buffers."""
        kv = self.kv
        n, q = tokens.shape
        if n != kv.n:
            raise ValueError(f"{n} token rows for {kv.n} decode rows")
        key = self.shape(n, q)
        w, _, c = key
        buf = self._buffers(key)
        cols = torch.arange(q, device=kv.device)
        buf.tokens[:n].copy_(tokens)
        buf.tokens[n:].fill_(0)
        torch.add((kv.lengths[:n] + kv.pending)[:, None], cols[None, :], out=buf.positions[:n])
        buf.positions[n:].copy_(cols.expand(w - n, q))  # padding rows: positions 0..q-1 of the scratch slot
        buf.write_rows[:n].copy_(torch.arange(n, device=kv.device)[:, None].expand(n, q))
        buf.write_rows[n:].fill_(kv.slots)  # the scratch slot
        allowed = torch.arange(c, device=kv.device)[None, None, :] <= buf.positions[:, :, None]
        allowed[n:, :, 1:] = False  # padding rows see column 0 only
        if kv.additive_mask:
            buf.mask.zero_().masked_fill_(~allowed[:, None], torch.finfo(kv.dtype).min)
        else:
            buf.mask.copy_(allowed[:, None])
        return key, buf

    def run(self, key: tuple[int, int, int], buf: StepBuffers) -> torch.Tensor:
        """The model over a prepared bucket: logits [W, q, V] (padding rows included)."""
        w, _, c = key
        kv = self.kv
        kv.active, kv.write_index, kv.read_len = (0, w), (buf.write_rows, buf.positions), c
        return kv.run_model(buf.tokens, buf.mask, buf.positions)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``KVState.forward(tokens)`` for the decode rows, in a static shape: logits [n, q, V]; the
        tokens' keys and values are pending in the cache, as after ``KVState.forward``."""
        key, buf = self.prepare(tokens)
        logits = self.run(key, buf)
        self.kv.pending += tokens.shape[1]
        return logits[: tokens.shape[0]]
