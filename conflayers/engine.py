"""Continuous batching with optional self-speculation, on an unmodified transformers causal LM.

``Engine.stream`` decodes any number of prompts (a list or an iterator) with at most ``max_batch``
rows in flight, in one slot cache (``kv.KVState``). Each round of the loop:

1. admit: free slots take the next prompts (all joiners of a round are prefilled together, in
   chunks of about ``prefill_tokens`` tokens a forward, a decode step of the running rows between
   chunks, so a long prompt never stalls the batch for more than one chunk); a joiner's first
   token comes from its prefill, then it joins the decode rows;
2. draft: the drafter proposes up to k tokens per decode row (none = plain decoding for that row);
3. verify: forget the draft's KV writes and run ``[last token, draft…]`` through the full model;
4. accept (greedy: longest matching prefix; sampling: the rejection rule) and commit ``a+1``
   tokens per row, cut at stop tokens and the row's token budget;
5. retire finished rows: their result is yielded and the last decode row moves into the freed
   slot, so decode rows stay in the leading slots and no step gathers or re-copies the cache.

``Engine.generate`` is the same loop over a list, returning results in input order.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .accept import accept_greedy, accept_sampled, commit
from .attention import use_packed_attention
from .compiled import COMPILE, CompiledSteps, CompileError
from .drafts.seam import DraftContext, Drafter, NoDrafter, StepOutcome
from .kernels import apply_kernels
from .kv import KVState, kv_bytes_per_token
from .layers import num_layers
from .sampling import SamplingParams, sample, warp
from .steps import StaticSteps

STEPS = ("dynamic", "static")

log = logging.getLogger(__name__)


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
    drafter_steps: Counter = field(default_factory=Counter)  # steps by the drafter whose draft was verified
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
            "drafter_steps": dict(self.drafter_steps),
            "finish_reason": self.finish_reason,
        }

    def record_step(self, drafted: int, accepted: int, skip: frozenset[int], drafter: str = "none") -> None:
        self.steps += 1
        self.drafter_steps[drafter if drafted else "none"] += 1
        self.drafted += drafted
        self.accepted += accepted
        if len(self.accept_hist) <= accepted:
            self.accept_hist.extend([0] * (accepted + 1 - len(self.accept_hist)))
        self.accept_hist[accepted] += 1
        if drafted:
            self.skip_counts[skip] += 1


@dataclass
class Request:
    """A prompt with its own token budget (``None``: the config's ``max_new_tokens``) and group.

    ``on_tokens`` (optional) is called with the tokens the row commits, as it commits them (its first
    token after prefill, then every step, its last ones included); returning a string ends the row
    there with that finish reason (e.g. ``"stop"`` when a stop string appeared in the text, ``"abort"``
    when the client went away), freeing its slot before the next step."""

    token_ids: list[int]
    max_new_tokens: int | None = None
    group: str = ""  # e.g. the row's dataset: conflayers.drafts.router.GroupRouter drafts per group
    on_tokens: Callable[[list[int]], str | None] | None = None


@dataclass
class RowResult:
    token_ids: list[int]
    stats: RowStats
    error: str | None = None  # why the row was refused (``stream`` only; ``generate`` raises instead)

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
    """Owns the model, one slot KV cache per ``stream`` call, and the decode loop.

    ``kernels`` puts the model's linear layers on a kernel plan (``conflayers.kernels``): ``auto``
    (default) = the fastest known path for the device and dtype, ``native`` = PyTorch's default,
    ``onednn`` = prepacked oneDNN (CPU, float32/bfloat16). The plan is applied to the model in place,
    and a grouped-query model on SDPA gets the packed attention of ``conflayers.attention`` (no
    key/value copies when a pass scores several tokens per row).

    ``steps`` is how verify/decode steps are shaped: ``dynamic`` (default) = each step in its exact
    shape, ``static`` = in bucketed shapes with in-place input buffers (``conflayers.steps``: what a CUDA
    graph can replay; eagerly it only adds padding work). The tokens are the same either way.

    ``compile``: ``on`` = decode/verify steps with compiled decoder layers (``conflayers.compiled``, on
    the kernel plan in effect), compiled here; ``off`` = eager; ``auto`` (default) = eager
    until ``costs.compile.choose_compile`` measures, at the width a run will use, whether compiled steps
    are faster here and pay back their compile time, and switches them on if so. A compile that fails
    leaves the engine eager, with one warning naming the cause.
    """

    def __init__(self, model, kernels: str = "auto", steps: str = "dynamic", compile: str = "auto"):
        if steps not in STEPS:
            raise ValueError(f"steps must be one of {', '.join(STEPS)}, got {steps!r}")
        if compile not in COMPILE:
            raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {compile!r}")
        self.steps = steps
        self.compile = compile
        self.kernels = kernels  # the plan asked for
        self.compiled: CompiledSteps | None = None
        self._compiled_by_plan: dict[str, CompiledSteps] = {}  # compiled once per kernel plan, kept across switches
        self.compiled_now_seconds: float | None = None  # what the last use_compiled spent compiling (None: reused)
        self.compile_error: str | None = None  # why compiled steps are off, after a failed compile
        self.model = model.eval()
        self.n_layers = num_layers(model)  # also rejects unsupported architectures
        self.kernel_plan = apply_kernels(model, kernels)
        self.attention = use_packed_attention(model)
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        self.vocab = model.config.vocab_size
        self.pad_id = 0
        self.bytes_per_token = kv_bytes_per_token(model)
        self.extra_slots = 0 if steps == "dynamic" else 1  # static steps' scratch slot: in the KV budget too
        self._idle_static: StaticSteps | None = None
        self._idle_lock = threading.Lock()
        if compile == "on":
            self.use_compiled()

    # -- compiled steps ---------------------------------------------------------------------
    def use_compiled(self) -> bool:
        """Switch decode/verify steps to compiled decoder layers (compiles now: seconds to a minute on a
        CPU, cached on disk for the next start). Returns False, leaving the engine eager and saying why
        in one warning, where they cannot run."""
        if self.compiled is not None:
            return True
        if self.steps != "dynamic":
            why = "compiled steps run on dynamic-shape steps (captured static steps wait for a GPU run)"
        elif (kept := self._compiled_by_plan.get(self.kernel_plan.name)) is not None and not kept.failed:
            self.compiled, self.compiled_now_seconds = kept, None  # compiled before on this plan: reused
            return True
        else:
            try:
                compiled = CompiledSteps(self.model)
                seconds = compiled.prepare(lambda w: self.step_cache(w, columns=64, context=16)[0])
            except CompileError as e:
                why = str(e)
            else:
                self.compiled = self._compiled_by_plan[compiled.kernels] = compiled
                self.compiled_now_seconds = seconds
                log.info("compiled steps (rows 1 / several, q 1 / several; %s linears) in %.1f s",
                         compiled.kernels, seconds)
                return True
        self.compile_error = why
        log.warning("compiled steps are off, decoding eagerly: %s", why)
        return False

    def use_eager(self, kernels: str | None = None) -> None:
        """Back to eager steps on the kernel plan ``kernels`` (default: the one asked for). Compiled steps
        made on a plan are kept: ``use_compiled`` on that plan again needs no new compile."""
        self.compiled = None
        self.kernel_plan = apply_kernels(self.model, kernels or self.kernels)

    def verify_step(self, kv: KVState) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decode/verify step this engine runs over ``kv``'s decode rows (dynamic steps)."""
        return kv.forward if self.compiled is None else functools.partial(self.compiled.forward, kv)

    def step_cache(self, slots: int, columns: int = 16,
                   context: int | None = None) -> tuple[KVState, Callable[[torch.Tensor], torch.Tensor]]:
        """A cache of ``slots`` slots and the forward this engine's verify/decode steps run over it
        (``kv.forward``, or static steps' ``forward``): for timings that should see what a stream sees
        (a layer-skip draft pass always runs ``kv.forward``). With ``context``, every slot is a decode
        row of ``context`` cached tokens (what they hold does not change a step's cost)."""
        if self.steps == "dynamic":
            kv = KVState(self.model, slots=slots, columns=columns)
            step = self.verify_step(kv)
        else:
            steps = StaticSteps(KVState(self.model, slots=slots, columns=columns, scratch_slot=True))
            kv, step = steps.kv, steps.forward
        if context is not None:
            with torch.no_grad():
                zeros = torch.zeros(slots, dtype=torch.long, device=self.device)
                kv.forward(torch.ones(slots, 1, dtype=torch.long, device=self.device), rows=(0, slots), offsets=zeros)
            kv.lengths[:] = context
            kv.n = slots
        return kv, step

    def _static_cache(self, slots: int, column_limit: int | None) -> StaticSteps:
        """Static steps over a cache of ``slots`` slots: the one the last finished stream of that width
        left (same storage, same step buffers: what captured steps replay on) if it fits this stream's
        KV budget, else a new one. A stream takes it for its lifetime, so streams running side by side
        never share one."""
        with self._idle_lock:
            idle, self._idle_static = self._idle_static, None
        if idle is None or idle.kv.slots != slots or (column_limit is not None and idle.kv.columns > column_limit):
            return StaticSteps(KVState(self.model, slots=slots, scratch_slot=True))
        idle.kv.lengths.zero_()
        idle.kv.n = idle.kv.pending = 0
        return idle

    # -- input checks ---------------------------------------------------------------------
    def prompt_error(self, ids: list[int]) -> str | None:
        """Why a prompt cannot be decoded, or None."""
        if len(ids) == 0:
            return "is empty"
        if len(ids) >= self.context:
            return (f"has {len(ids)} tokens; the model's context is {self.context} tokens "
                    f"(the prompt must leave room for at least one new token)")
        bad = [t for t in ids if not 0 <= int(t) < self.vocab]
        if bad:
            return f"has token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}"
        return None

    def _check_prompts(self, prompts: list) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            err = self.prompt_error(_ids(p))
            if err:
                raise ValueError(f"prompt {i} {err}")

    # -- 1. prefill -------------------------------------------------------------------------
    def _prefill_chunk(self, kv: KVState, lo: int, rows: list["_Row"], chunk: int) -> dict[int, torch.Tensor]:
        """One forward over the next ``chunk`` prompt tokens of joiners in slots ``[lo, lo+len(rows))``
        (rows sorted longest prompt first, so the ones with prompt left are a prefix); returns
        {row position: last-token logits} for the rows whose prompt ends in this chunk."""
        rows = [r for r in rows if r.prefilled < len(r.prompt)]
        segs = [r.prompt[r.prefilled : r.prefilled + chunk] for r in rows]
        width = max(map(len, segs))
        # one padded host list, one copy to the device (not one per row)
        tokens = torch.tensor([seg + [self.pad_id] * (width - len(seg)) for seg in segs], dtype=torch.long,
                              device=self.device)
        offsets = torch.tensor([r.prefilled for r in rows], device=self.device)
        ending = {t: len(seg) - 1 for t, (r, seg) in enumerate(zip(rows, segs)) if r.prefilled + len(seg) == len(r.prompt)}
        keep = sorted(set(ending.values()))
        logits = torch.empty(0)
        if keep:  # logits only at the columns where some row's prompt ends
            logits = kv.forward(tokens, logits_to_keep=torch.tensor(keep, device=self.device),
                                rows=(lo, lo + len(rows)), offsets=offsets)
        else:
            kv.forward(tokens, logits_to_keep=1, rows=(lo, lo + len(rows)), offsets=offsets)
        for r, seg in zip(rows, segs):
            r.prefilled += len(seg)
        return {t: logits[t, keep.index(col)] for t, col in ending.items()}

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[KVState, torch.Tensor]:
        """A cache holding ``prompts`` as decode rows (in order), and each row's last-token logits."""
        self._check_prompts(prompts)
        rows = [_Row(i, list(p), 1) for i, p in enumerate(prompts)]
        longest = max(map(len, prompts))
        kv = KVState(self.model, slots=len(prompts), columns=longest + 16)
        out = self._prefill_chunk(kv, 0, rows, longest)  # one chunk: every prompt ends in it
        kv.lengths[:] = torch.tensor([len(p) for p in prompts])
        kv.n = len(prompts)
        return kv, torch.stack([out[t] for t in range(len(rows))])

    # -- the loop -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list,
        config: GenerationConfig = GenerationConfig(),
        drafter: Drafter | None = None,
        max_batch: int | None = None,
        prefill_tokens: int = 512,
    ) -> list[RowResult]:
        """Decode every prompt (token-id lists or ``Request``s); results in input order. Bad input
        raises ``ValueError`` before anything runs. ``max_batch`` None: all rows in flight at once.

        Rows are admitted shortest prompt first: rows in flight then have similar lengths, and every
        row's attention spans the longest row's positions, so mixing lengths costs attention."""
        self._check_prompts(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(_ids(prompts[i])))
        out: list[RowResult | None] = [None] * len(prompts)
        for j, r in self.stream([prompts[i] for i in order], config, drafter, max_batch or len(prompts),
                                prefill_tokens):
            out[order[j]] = r
        return out

    @torch.inference_mode()
    def stream(
        self,
        prompts: Iterable,
        config: GenerationConfig = GenerationConfig(),
        drafter: Drafter | None = None,
        max_batch: int = 8,
        prefill_tokens: int = 512,
        kv_budget_bytes: int | None = None,
        pulse: bool = False,
    ) -> Iterator[tuple[int, RowResult]]:
        """Continuous batching: yields ``(input index, RowResult)`` as rows finish. A prompt that cannot
        run (empty, over the context, out of vocabulary, or over the KV budget at this width) yields
        a result with ``error`` set and finish_reason ``error``.

        For a server: ``prompts`` may yield ``None`` for "nothing to admit now" (the stream goes on with
        the rows it has, and asks again when a slot is free), and with ``pulse`` the stream also yields
        ``(-1, None)`` after every round (one prefill chunk and/or one decode step), so a caller can
        interleave several streams or admit new requests between steps. Such a stream ends only when
        ``prompts`` is exhausted."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens!r}")
        column_limit = None
        if kv_budget_bytes is not None:
            column_limit = kv_budget_bytes // ((max_batch + self.extra_slots) * self.bytes_per_token)
            if column_limit < 2:
                raise ValueError(
                    f"a KV cache of {max_batch} rows does not fit the budget of {kv_budget_bytes / 2**30:.2f} GiB "
                    f"({self.bytes_per_token} bytes per token and row): lower the width or raise the budget")
        drafter = drafter or NoDrafter()
        sp = config.sampling
        stop_ids = frozenset(config.stop_token_ids if config.stop_token_ids is not None else model_eos_ids(self.model))
        gen = None
        if not sp.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(config.seed if config.seed is not None else int(torch.seed() % (1 << 62)))

        queue = enumerate(prompts)
        if self.steps == "static":
            steps = self._static_cache(max_batch, column_limit)
            kv, verify = steps.kv, steps.forward
        else:
            kv = KVState(self.model, slots=max_batch)
            verify = self.verify_step(kv)
        kv.max_columns = column_limit
        # for benchmarks: the cache's final size and where the time went. decode = draft + verify (until the
        # step's kernels are issued; on a GPU they may still run), then sync (waiting for its results), rows
        # (per-row commits, statistics, the drafter's observe) and move (retired rows' slots refilled)
        self.last_stream = {"max_batch": max_batch, "kv_bytes": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                            "steps": 0, "draft_seconds": 0.0, "verify_seconds": 0.0, "sync_seconds": 0.0,
                            "rows_seconds": 0.0, "move_seconds": 0.0}
        times = self.last_stream
        rows: list[_Row] = []  # decode rows; rows[s] lives in slot s
        joiners: list[_Row] = []  # being prefilled, in slots [jlo, jlo + len(joiners))
        jlo = 0
        exhausted = False

        def first_token(r: _Row, logits: torch.Tensor) -> None:
            tok = logits.argmax(-1) if sp.greedy else sample(warp(logits[None], sp), gen)[0]
            toks, reason = commit([], 0, int(tok), stop_ids, r.budget)
            r.add(toks, reason)
            r.last = int(tok)

        while True:
            # 1. admit and prefill
            if not joiners and not exhausted:
                free = max_batch - len(rows)
                while len(joiners) < free:
                    nxt = next(queue, None)
                    if nxt is None:
                        exhausted = True
                        break
                    i, p = nxt
                    if p is None:  # nothing to admit now
                        break
                    req = p if isinstance(p, Request) else Request(list(p))
                    ids = list(map(int, req.token_ids))
                    n_new = req.max_new_tokens or config.max_new_tokens
                    err = self.prompt_error(ids)
                    if err is None and column_limit is not None and len(ids) + n_new > column_limit:
                        err = (f"needs {len(ids) + n_new} KV positions (prompt + max new tokens); the KV budget allows "
                               f"{column_limit} per row at width {max_batch}")
                    if err is not None:
                        yield i, RowResult([], RowStats(finish_reason="error"), error=f"prompt {err}")
                        continue
                    joiners.append(_Row(i, ids, min(n_new, self.context - len(ids)), group=req.group,
                                        on_tokens=req.on_tokens))
                joiners.sort(key=lambda r: -len(r.prompt))
                jlo = len(rows)
                if joiners:
                    kv.reserve(max(len(r.prompt) + r.budget for r in joiners))
            if joiners:
                t0 = time.perf_counter()
                left = sum(r.prefilled < len(r.prompt) for r in joiners)  # rows that still take prompt tokens
                per_row = max(16, prefill_tokens // left)
                for t, logits in self._prefill_chunk(kv, jlo, joiners, per_row).items():
                    first_token(joiners[t], logits)
                dt = time.perf_counter() - t0
                self.last_stream["prefill_seconds"] += dt
                for r in joiners:
                    r.result.stats.prefill_seconds += dt
                if all(r.prefilled == len(r.prompt) for r in joiners):
                    for t, r in enumerate(joiners):
                        kv.lengths[jlo + t] = len(r.prompt)
                        if r.done:
                            yield r.index, r.result
                        else:
                            kv.move(jlo + t, len(rows))
                            rows.append(r)
                    joiners = []
                    kv.n = len(rows)
            if not rows:
                if exhausted and not joiners:
                    self.last_stream["kv_bytes"] = kv.storage_bytes()
                    if self.steps == "static":
                        with self._idle_lock:
                            self._idle_static = steps  # the next stream of this width starts on it
                    return
                if pulse:
                    yield -1, None
                continue

            # 2. draft
            step_t0 = time.perf_counter()
            last = torch.tensor([r.last for r in rows], device=self.device)
            remaining = torch.tensor([r.budget - len(r.result.token_ids) for r in rows], device=self.device)
            ctx = DraftContext(kv, last, [r.history for r in rows], remaining - 1, sp, gen, stop_ids,
                               [r.group for r in rows])
            prop = drafter.propose(ctx)
            # 3. verify
            kv.rollback()
            verify_t0 = time.perf_counter()
            logits = verify(torch.cat([last[:, None], prop.tokens], dim=1))
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
            times["decode_seconds"] += step_t1 - step_t0
            times["draft_seconds"] += verify_t0 - step_t0
            times["verify_seconds"] += step_t1 - verify_t0
            times["steps"] += 1

            drafts = prop.tokens.tolist()
            a_list, y_list, lens = a.tolist(), y.tolist(), prop.lens.tolist()
            rows_t0 = time.perf_counter()
            times["sync_seconds"] += rows_t0 - step_t1
            committed = []
            for b, r in enumerate(rows):
                toks, reason = commit(drafts[b], a_list[b], y_list[b], stop_ids, r.budget - len(r.result.token_ids))
                st = r.result.stats
                r.add(toks, reason)
                r.last = y_list[b]
                st.record_step(lens[b], a_list[b], prop.skip, prop.sources[b] if prop.sources else prop.drafter)
                st.draft_passes += prop.passes
                st.decode_seconds += step_t1 - step_t0
                committed.append(len(toks))
            drafter.observe(
                StepOutcome(
                    lens=prop.lens,
                    accepted=a,
                    committed=committed,
                    skip=prop.skip,
                    draft_seconds=verify_t0 - step_t0,
                    verify_seconds=step_t1 - verify_t0,
                    histories=[r.history for r in rows],
                    generated=[len(r.result.token_ids) for r in rows],
                    budget=[r.budget for r in rows],
                )
            )
            times["rows_seconds"] += time.perf_counter() - rows_t0
            # 5. retire: the last decode row moves into each freed slot
            for s in sorted((s for s, r in enumerate(rows) if r.done), reverse=True):
                yield rows[s].index, rows[s].result
                end = len(rows) - 1
                if s != end:
                    move_t0 = time.perf_counter()
                    kv.move(end, s)
                    times["move_seconds"] += time.perf_counter() - move_t0
                    rows[s] = rows[end]
                rows.pop()
            kv.n = len(rows)
            if pulse:
                yield -1, None


def _ids(p) -> list[int]:
    return p.token_ids if isinstance(p, Request) else p


@dataclass
class _Row:
    """A row in flight: its prompt, budget, history and result so far."""

    index: int
    prompt: list[int]
    budget: int
    group: str = ""
    prefilled: int = 0
    last: int = 0
    result: RowResult = field(default_factory=lambda: RowResult([], RowStats()))
    history: list[int] = field(default_factory=list)
    on_tokens: Callable[[list[int]], str | None] | None = None

    def __post_init__(self):
        self.history = list(self.prompt)

    @property
    def done(self) -> bool:
        return self.result.stats.finish_reason is not None

    def add(self, toks: list[int], reason: str | None) -> None:
        self.result.token_ids += toks
        self.history += toks
        self.result.stats.new_tokens += len(toks)
        self.result.stats.finish_reason = reason
        if self.on_tokens is not None:
            why = self.on_tokens(toks)
            if why and reason is None:
                self.result.stats.finish_reason = why
