"""Batched decoding with optional self-speculation, on an unmodified transformers causal LM.

One call of ``Engine.generate`` decodes B token-id prompts of any lengths:

1. prefill the left-padded batch with the full model and take each row's first token;
2. per step: ask the drafter for up to k tokens per row (none = plain decoding for that row);
3. roll back the drafter's KV writes and verify ``[last token, draft…]`` in one full forward;
4. accept (greedy: longest matching prefix; sampling: the rejection rule) and commit ``a+1``
   tokens per row, cut at stop tokens and the token budget;
5. drop finished rows from the batch, so they stop costing work.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .accept import accept_greedy, accept_sampled, commit
from .drafters import DraftContext, Drafter, NoDrafter, StepOutcome
from .kv import KVState
from .layers import num_layers
from .sampling import SamplingParams, sample, warp


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS token(s)

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")


@dataclass
class RowStats:
    new_tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    accept_hist: list[int] = field(default_factory=list)  # accept_hist[a] = steps that accepted a drafts
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_passes: int = 0  # draft forward passes run while this row was in the batch
    skip_counts: Counter = field(default_factory=Counter)
    finish_reason: str | None = None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tau(self) -> float | None:
        """Mean tokens committed per verify step (accepted drafts + the verify token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else None

    @property
    def skip_set(self) -> list[int]:
        """The skip set this row drafted under for the most steps ([] = none / plain decoding)."""
        return sorted(self.skip_counts.most_common(1)[0][0]) if self.skip_counts else []

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tau": self.tau,
            "accept_hist": list(self.accept_hist),
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "draft_passes": self.draft_passes,
            "skip_set": self.skip_set,
            "finish_reason": self.finish_reason,
        }

    def record_step(self, drafted: int, accepted: int, skip: frozenset[int]) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        if len(self.accept_hist) <= accepted:
            self.accept_hist.extend([0] * (accepted + 1 - len(self.accept_hist)))
        self.accept_hist[accepted] += 1
        if drafted:
            self.skip_counts[skip] += 1


@dataclass
class RowResult:
    token_ids: list[int]
    stats: RowStats

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason


def model_eos_ids(model) -> tuple[int, ...]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


class Engine:
    """Owns the model, one KV cache per ``generate`` call, and the decode loop."""

    def __init__(self, model):
        self.model = model.eval()
        self.n_layers = num_layers(model)  # also rejects unsupported architectures
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        self.vocab = model.config.vocab_size
        self.pad_id = 0

    # -- input checks ---------------------------------------------------------------------
    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        for i, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) >= self.context:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; the model's context is {self.context} tokens "
                    f"(the prompt must leave room for at least one new token)"
                )
            bad = [t for t in ids if not 0 <= int(t) < self.vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}")

    # -- 1. prefill -------------------------------------------------------------------------
    def _prefill(self, prompts: list[list[int]]) -> tuple[KVState, torch.Tensor]:
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        for i, ids in enumerate(prompts):  # left padding: every row's last token sits in column T-1
            tokens[i, T - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            valid[i, T - len(ids) :] = True
        kv = KVState(self.model, valid=torch.zeros(B, 0, dtype=torch.bool, device=self.device), next_pos=valid.sum(1))
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        logits = kv.forward(tokens, logits_to_keep=1, token_valid=valid, positions=positions)
        kv.valid, kv.pending = valid, 0
        return kv, logits[:, -1]

    # -- the loop -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], config: GenerationConfig = GenerationConfig(), drafter: Drafter | None = None
    ) -> list[RowResult]:
        self._check_prompts(prompts)
        drafter = drafter or NoDrafter()
        sp = config.sampling
        stop_ids = frozenset(config.stop_token_ids if config.stop_token_ids is not None else model_eos_ids(self.model))
        gen = None
        if not sp.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(config.seed if config.seed is not None else int(torch.seed() % (1 << 62)))

        B = len(prompts)
        results = [RowResult([], RowStats()) for _ in range(B)]
        budget = [min(config.max_new_tokens, self.context - len(p)) for p in prompts]
        histories = [list(map(int, p)) for p in prompts]

        t0 = time.perf_counter()
        kv, logits = self._prefill(prompts)
        first = logits.argmax(-1) if sp.greedy else sample(warp(logits, sp), gen)
        prefill_s = time.perf_counter() - t0

        rows = list(range(B))  # batch position -> original row
        last = first
        for i in rows:
            toks, reason = commit([], 0, int(first[i]), stop_ids, budget[i])
            results[i].token_ids += toks
            histories[i] += toks
            results[i].stats.new_tokens = len(toks)
            results[i].stats.prefill_seconds = prefill_s
            results[i].stats.finish_reason = reason

        while True:
            alive = [b for b, i in enumerate(rows) if results[i].stats.finish_reason is None]
            if not alive:
                break
            if len(alive) < len(rows):
                idx = torch.tensor(alive, device=self.device)
                kv.select(idx)
                last = last[idx]
                rows = [rows[b] for b in alive]

            # 2. draft
            step_t0 = time.perf_counter()
            remaining = torch.tensor([budget[i] - len(results[i].token_ids) for i in rows], device=self.device)
            ctx = DraftContext(kv, last, [histories[i] for i in rows], remaining - 1, sp, gen, stop_ids)
            prop = drafter.propose(ctx)
            # 3. verify
            kv.rollback()
            verify_t0 = time.perf_counter()
            logits = kv.forward(torch.cat([last[:, None], prop.tokens], dim=1))
            # 4. accept
            if sp.greedy:
                a, y = accept_greedy(prop.tokens, prop.lens, logits)
            else:
                p = warp(logits, sp)
                q = prop.q
                if q is None:  # a deterministic drafter: its distribution is one-hot on its tokens
                    q = torch.nn.functional.one_hot(prop.tokens, p.shape[-1]).to(p.dtype)
                a, y = accept_sampled(prop.tokens, prop.lens, p, q, gen)
            kv.commit(a)
            step_t1 = time.perf_counter()

            drafts = prop.tokens.tolist()
            committed = []
            for b, i in enumerate(rows):
                toks, reason = commit(drafts[b], int(a[b]), int(y[b]), stop_ids, budget[i] - len(results[i].token_ids))
                st = results[i].stats
                results[i].token_ids += toks
                histories[i] += toks
                st.new_tokens += len(toks)
                st.record_step(int(prop.lens[b]), int(a[b]), prop.skip)
                st.draft_passes += prop.passes
                st.decode_seconds += step_t1 - step_t0
                st.finish_reason = reason
                committed.append(len(toks))
            last = y
            drafter.observe(
                StepOutcome(
                    lens=prop.lens,
                    accepted=a,
                    committed=committed,
                    skip=prop.skip,
                    draft_seconds=verify_t0 - step_t0,
                    verify_seconds=step_t1 - verify_t0,
                    histories=[histories[i] for i in rows],
                    generated=[len(results[i].token_ids) for i in rows],
                    budget=[budget[i] for i in rows],
                )
            )
        return results
