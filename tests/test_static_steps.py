"""Static-shape steps (conflayers.steps): padded rows and read columns never change a real row, the
inputs live in per-bucket buffers written in place, and the engine's tokens are the same as with
dynamic steps (float64, token for token)."""

import pytest
import torch

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter, Request, SamplingParams
from conflayers.drafts.corpus import CorpusDrafter
from conflayers.drafts.ngram import NgramDrafter
from conflayers.engine import STEPS
from conflayers.kv import KVState
from conflayers.steps import MIN_COLUMNS, StaticSteps, bucket, column_bucket, width_buckets

from .conftest import RAGGED, tiny_model


def test_buckets():
    assert width_buckets(1) == [1]
    assert width_buckets(8) == [1, 2, 4, 8]
    assert width_buckets(11) == [1, 2, 4, 8, 11]
    assert [bucket(n, [1, 2, 4, 8, 11]) for n in (1, 2, 3, 5, 8, 9, 11)] == [1, 2, 4, 8, 8, 11, 11]
    with pytest.raises(ValueError):
        bucket(12, [1, 2, 4, 8, 11])
    assert column_bucket(1, 1000) == MIN_COLUMNS
    assert column_bucket(MIN_COLUMNS + 1, 1000) == 2 * MIN_COLUMNS
    assert column_bucket(600, 1000) == 1000  # capped at the storage
    with pytest.raises(ValueError, match="scratch_slot"):
        StaticSteps(KVState(tiny_model(layers=2), slots=2))


def cache_with_rows(model, lengths: list[int], slots: int, joiner: int = 0, seed: int = 0) -> KVState:
    """A scratch-slot cache whose decode rows hold random prompts of ``lengths`` (slots [0, n)), plus
    ``joiner`` tokens prefilled into slot n (a row mid-prefill, which padding rows must not touch)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    kv = KVState(model, slots=slots, scratch_slot=True)
    n = len(lengths)
    for s, length in enumerate(lengths + ([joiner] if joiner else [])):
        ids = torch.randint(0, vocab, (1, length), generator=g)
        kv.forward(ids, rows=(s, s + 1), offsets=torch.zeros(1, dtype=torch.long))
        kv.lengths[s] = length
    kv.n = n
    return kv


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n,slots", [(1, 1), (3, 8), (5, 8), (8, 8), (3, 11)])
def test_a_static_step_equals_the_dynamic_step_for_every_real_row(attn, n, slots):
    model = tiny_model("llama")
    if attn == "eager":
        model.set_attn_implementation("eager")
    Engine(model)  # the engine's attention plan (packed SDPA for this grouped-query model)
    lengths = [3 + 7 * i for i in range(n)]
    joiner = 20 if n < slots else 0
    kv = cache_with_rows(model, lengths, slots, joiner)  # a joiner's prompt in slot n, when there is one
    steps = StaticSteps(kv)
    # eager attention takes its softmax in float32 (transformers), where more (masked) columns round differently
    tol = 1e-10 if attn == "sdpa" else 1e-6
    g = torch.Generator().manual_seed(1)
    for q in (1, 2, 5):
        for pending in (0, 3):  # a verify after draft writes of a layer-skip drafter
            tokens = torch.randint(0, model.config.vocab_size, (n, q), generator=g)
            kv.pending = pending
            dyn = kv.forward(tokens)
            dyn_kv = [(l.keys[:n].clone(), l.values[:n].clone()) for l in kv.layers]
            kv.pending = pending
            for l in kv.layers:  # forget what the dynamic step wrote: the static step must write it again
                for b in range(n):
                    start = int(kv.lengths[b]) + pending
                    l.keys[b, :, start : start + q] = float("nan")
                    l.values[b, :, start : start + q] = float("nan")
            others = [(l.keys[n : kv.slots].clone(), l.values[n : kv.slots].clone()) for l in kv.layers]
            stat = steps.forward(tokens)
            assert stat.shape == dyn.shape
            torch.testing.assert_close(stat, dyn, rtol=0, atol=tol)
            assert kv.pending == pending + q
            for l, (keys, values) in zip(kv.layers, dyn_kv):  # the same keys and values at the same columns
                torch.testing.assert_close(l.keys[:n], keys, rtol=0, atol=tol)
                torch.testing.assert_close(l.values[:n], values, rtol=0, atol=tol)
            for l, (keys, values) in zip(kv.layers, others):  # the slots past the rows (a joiner): untouched
                assert torch.equal(l.keys[n : kv.slots], keys) and torch.equal(l.values[n : kv.slots], values)
            kv.rollback()


def test_inputs_are_buffers_written_in_place_per_bucket():
    model = tiny_model("llama")
    Engine(model)
    kv = cache_with_rows(model, [5, 9, 12], slots=8)
    kv.reserve(4 * MIN_COLUMNS)  # storage past the column bucket: a step reads its first MIN_COLUMNS only
    steps = StaticSteps(kv)
    storage = [l.keys.data_ptr() for l in kv.layers]
    tokens = torch.ones(3, 2, dtype=torch.long)
    key, buf = steps.prepare(tokens)
    assert key == (4, 2, MIN_COLUMNS)
    ptrs = [t.data_ptr() for t in (buf.tokens, buf.positions, buf.write_rows, buf.mask)]
    for step in range(5):  # commit one token a step: same bucket, same buffers, new contents
        kv.rollback()
        key2, buf2 = steps.prepare(tokens + step)
        assert key2 == key and buf2 is buf
        assert [t.data_ptr() for t in (buf.tokens, buf.positions, buf.write_rows, buf.mask)] == ptrs
        assert buf.positions[:3, 0].tolist() == [5 + step, 9 + step, 12 + step]
        assert buf.write_rows[3:].eq(kv.slots).all()  # the padding row writes the scratch slot
        assert buf.mask[3, 0, :, 1:].logical_not().all()  # ... and reads column 0 only
        steps.run(key2, buf2)
        kv.commit(torch.zeros(3, dtype=torch.long))
    assert [l.keys.data_ptr() for l in kv.layers] == storage  # no reallocation between steps
    assert len(steps.buffers) == 1
    kv.n = 2  # a row retired: the same bucket width (2), a new set of buffers
    steps.prepare(tokens[:2])
    assert sorted(steps.buffers) == [(2, 2, MIN_COLUMNS), (4, 2, MIN_COLUMNS)]


def test_engine_rejects_unknown_steps():
    with pytest.raises(ValueError, match="steps must be one of"):
        Engine(tiny_model(layers=2), steps="bogus")


def drafters(model, name):
    if name == "layerskip":
        return LayerSkipDrafter(model, FixedSkip([1, 3]), stop_threshold=0.0, max_draft_len=4)
    if name == "ngram":
        return NgramDrafter(max_tokens=5)
    if name == "corpus":
        return CorpusDrafter(max_tokens=6)
    return None


@pytest.mark.parametrize("drafter", ["none", "ngram", "layerskip", "corpus"])
@pytest.mark.parametrize("width", [1, 3, 8])
def test_engine_tokens_are_the_same_with_static_steps(drafter, width):
    model = tiny_model("llama", std=0.2)  # a larger init: each token depends on its context, not only the last one
    prompts = RAGGED * 3 + [[9, 8, 7, 6, 5, 4, 3, 2, 1] * 3]
    budgets = [12 + 5 * (i % 4) for i in range(len(prompts))]  # rows finish at different steps
    reqs = [Request(p, max_new_tokens=b, group=str(i % 2)) for i, (p, b) in enumerate(zip(prompts, budgets))]
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    dyn = Engine(model).generate(reqs, cfg, drafters(model, drafter), max_batch=width)
    stat = Engine(model, steps="static").generate(reqs, cfg, drafters(model, drafter), max_batch=width)
    assert [r.token_ids for r in stat] == [r.token_ids for r in dyn]
    assert [r.stats.steps for r in stat] == [r.stats.steps for r in dyn]
    if drafter != "none":
        assert sum(r.stats.accepted for r in stat) > 0


def test_sampled_tokens_are_the_same_with_static_steps():
    model = tiny_model("qwen2", std=0.2)  # a peaked distribution with several likely tokens
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=(), seed=7,
                           sampling=SamplingParams(temperature=0.8, top_p=0.95))
    prompts = RAGGED * 2
    dyn = Engine(model).generate(prompts, cfg, NgramDrafter(), max_batch=3)
    stat = Engine(model, steps="static").generate(prompts, cfg, NgramDrafter(), max_batch=3)
    assert [r.token_ids for r in stat] == [r.token_ids for r in dyn]
    assert len({tuple(r.token_ids) for r in dyn}) > 1


def test_a_static_engine_keeps_its_cache_between_streams_but_never_shares_one():
    model = tiny_model("llama", std=0.2)
    cfg = GenerationConfig(max_new_tokens=16, stop_token_ids=())
    dyn, stat = Engine(model), Engine(model, steps="static")
    first, second = RAGGED * 2, [p[::-1] + [7] for p in RAGGED] * 2
    assert [r.token_ids for r in stat.generate(first, cfg, NgramDrafter(), max_batch=4)] == \
        [r.token_ids for r in dyn.generate(first, cfg, NgramDrafter(), max_batch=4)]
    kept = stat._idle_static
    storage, buffers = kept.kv.layers[0].keys.data_ptr(), dict(kept.buffers)
    # the next stream of that width starts on the same storage and step buffers, from empty rows
    assert [r.token_ids for r in stat.generate(second, cfg, NgramDrafter(), max_batch=4)] == \
        [r.token_ids for r in dyn.generate(second, cfg, NgramDrafter(), max_batch=4)]
    assert stat._idle_static is kept and kept.kv.layers[0].keys.data_ptr() == storage
    assert all(kept.buffers[k] is b for k, b in buffers.items())
    # two streams side by side: the second gets a cache of its own, and both stay exact
    a = stat.stream(iter(first), cfg, max_batch=4, pulse=True)  # pulse: a yield after every step
    b = stat.stream(iter(second), cfg, max_batch=4, pulse=True)
    got_a, got_b = {}, {}
    live = [(a, got_a), (b, got_b)]
    while live:  # one step of each in turn
        for gen, got in list(live):
            item = next(gen, None)
            if item is None:
                live.remove((gen, got))
            elif item[0] >= 0:
                got[item[0]] = item[1].token_ids
    assert [got_a[i] for i in range(len(first))] == [r.token_ids for r in dyn.generate(first, cfg, max_batch=4)]
    assert [got_b[i] for i in range(len(second))] == [r.token_ids for r in dyn.generate(second, cfg, max_batch=4)]
    # another width: a new cache
    stat.generate(first, cfg, max_batch=3)
    assert stat._idle_static.kv.slots == 3


def test_timings_of_a_static_engine_run_its_static_steps(monkeypatch):
    from conflayers.costs.calibrate import calibrate
    from conflayers.costs.width import engine_key, measure_step_seconds

    model = tiny_model("llama", layers=4)
    dyn, stat = Engine(model), Engine(model, steps="static")
    assert engine_key(stat) == engine_key(dyn) + "|steps-static"  # cached timings never mix the two
    calls = []
    forward = StaticSteps.forward
    monkeypatch.setattr(StaticSteps, "forward", lambda self, tokens: calls.append(tokens.shape) or forward(self, tokens))
    s = calibrate(dyn, widths=(1, 3), qs=(1, 2), context=24, reps=1)
    measure_step_seconds(dyn, 3, 24, steps=1)
    assert calls == []
    s = calibrate(stat, widths=(1, 3), qs=(1, 2), context=24, reps=1)
    assert s.key.endswith("steps-static") and sorted(s.table) == [1, 3]
    assert (3, 2) in calls and (1, 1) in calls  # the full-model cells ran static steps
    calls.clear()
    measure_step_seconds(stat, 3, 24, steps=1)
    assert calls == [(3, 1)] * 2


def test_the_scratch_slot_counts_in_the_kv_budget_and_a_kept_cache_fits_the_next_budget():
    model = tiny_model("llama", std=0.2)
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    stat, dyn = Engine(model, steps="static"), Engine(model)
    per_row = 64 * stat.bytes_per_token  # a budget of 64 positions for each of 4 rows
    for budget in (None, 4 * per_row, None, 2 * per_row):  # unbudgeted first: a larger cache is kept
        prompts = [list(range(1, 30))] * 3 if budget is None else RAGGED
        got = list(stat.stream(prompts, cfg, max_batch=4, kv_budget_bytes=budget))
        assert all(r.error is None for _, r in got)
        if budget is not None:
            assert stat.last_stream["kv_bytes"] <= budget  # the 5th (scratch) slot included
    want = dyn.generate(RAGGED, cfg, max_batch=4)
    assert [r.token_ids for _, r in sorted(got)] == [r.token_ids for r in want]
    tight = 4 * 20 * dyn.bytes_per_token  # 20 positions a row: rows need 19, storage rounds to 16s
    assert [r.token_ids for _, r in sorted(dyn.stream(RAGGED, cfg, max_batch=4, kv_budget_bytes=tight))] == \
        [r.token_ids for r in want]
    assert dyn.last_stream["kv_bytes"] <= tight
    # a row that fits 4 slots of the budget but not 5 is refused up front (its error names the budget)
    budget = 4 * (len(RAGGED[0]) + 12) * stat.bytes_per_token
    (_, r), = [x for x in stat.stream([RAGGED[0]], cfg, max_batch=4, kv_budget_bytes=budget)]
    assert r.error and "KV budget" in r.error
    (_, r), = [x for x in dyn.stream([RAGGED[0]], cfg, max_batch=4, kv_budget_bytes=budget)]
    assert r.error is None


def test_a_surface_measured_on_static_steps_prices_a_step_at_its_bucket():
    from conflayers.costs.surface import CostSurface

    table = {1: {1: 0.01}, 2: {1: 0.012}, 4: {1: 0.016}, 8: {1: 0.024}}
    plain, bucketed = CostSurface(table, 4), CostSurface(table, 4, bucketed=True)
    assert bucketed.seconds(3) == bucketed.seconds(4) == plain.seconds(4) and plain.seconds(3) < plain.seconds(4)
    assert bucketed.seconds(5) == plain.seconds(8)
    assert CostSurface.from_dict(bucketed.as_dict()).bucketed and not CostSurface.from_dict(plain.as_dict()).bucketed


def test_a_model_that_ignores_the_engines_cache_is_an_error_not_wrong_tokens():
    """What a transformers version without ``cache=`` does: it decodes without the rows' past."""
    from transformers import LlamaForCausalLM

    class IgnoresTheCache(LlamaForCausalLM):
        def forward(self, *args, cache=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = tiny_model("llama", layers=2)
    kv = cache_with_rows(model, [4, 6], slots=2)  # prefilled while the model still takes the cache
    model.__class__ = IgnoresTheCache
    for steps in STEPS:
        with pytest.raises(RuntimeError, match="did not use the engine's KV cache.*needs >=5.24"):
            Engine(model, steps=steps).generate([[1, 2, 3]], GenerationConfig(max_new_tokens=4))
    # a static step's own call: its decode-shaped mask fails the model before any layer writes
    with pytest.raises(RuntimeError, match="failed before it wrote the engine's KV cache.*needs >=5.24"):
        StaticSteps(kv).forward(torch.ones(2, 1, dtype=torch.long))
