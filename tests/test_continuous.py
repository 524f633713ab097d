"""Continuous batching: rows join freed slots mid-run, and every row's output is what it would be
decoded alone (float64 tiny models, token for token)."""

import random

import pytest
import torch

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter, Request
from conflayers.kv import KVState


STOP_NONE = ()


def mixed_requests(seed=0, n=11):
    """Prompts of 1..40 tokens with budgets of 1..18 new tokens."""
    rng = random.Random(seed)
    return [Request([rng.randrange(1, 97) for _ in range(rng.randint(1, 40))], rng.randint(1, 18)) for _ in range(n)]


def alone(engine, requests, drafter=None):
    """Batch-1 plain decoding of every request, one at a time: the reference."""
    return [engine.generate([r.token_ids], GenerationConfig(max_new_tokens=r.max_new_tokens, stop_token_ids=STOP_NONE))[0].token_ids
            for r in requests]


@pytest.fixture(scope="module")
def refs(tiny):
    engine = Engine(tiny)
    reqs = mixed_requests()
    return engine, reqs, alone(engine, reqs)


@pytest.mark.parametrize("width", [1, 3, 8])
@pytest.mark.parametrize("speculative", [False, True])
def test_continuous_greedy_equals_batch1_plain_in_any_arrival_order(tiny, refs, width, speculative):
    engine, reqs, ref = refs
    order = list(range(len(reqs)))
    random.Random(width).shuffle(order)
    drafter = None
    if speculative:
        drafter = LayerSkipDrafter(tiny, FixedSkip(range(1, tiny.config.num_hidden_layers - 1, 2)), 0.0, 4)
    cfg = GenerationConfig(max_new_tokens=99, stop_token_ids=STOP_NONE)
    got = {}
    for i, r in engine.stream(iter([reqs[j] for j in order]), cfg, drafter, max_batch=width, prefill_tokens=24):
        assert order[i] not in got  # each row comes back exactly once
        got[order[i]] = r
    assert sorted(got) == list(range(len(reqs)))
    for j, r in got.items():
        assert r.token_ids == ref[j], j
        assert r.stats.new_tokens == reqs[j].max_new_tokens and r.finish_reason == "length"
        assert r.error is None
    if speculative:
        assert sum(r.stats.drafted for r in got.values()) > 0


def test_a_reused_slot_never_sees_the_previous_rows_kv(tiny):
    """Width 1: a long row fills the slot's storage, then short rows reuse it; each short row's
    output equals its output on a fresh cache, and its logits equal a cache-free forward."""
    engine = Engine(tiny)
    long = Request(list(range(1, 90)) + list(range(1, 60)), 12)
    shorts = [Request([5, 6, 7], 8), Request([40], 6), Request([9, 8, 7, 6, 5, 4], 5)]
    ref = alone(engine, shorts)
    got = engine.generate([long, *shorts], GenerationConfig(max_new_tokens=99, stop_token_ids=STOP_NONE), max_batch=1)
    assert [r.token_ids for r in got[1:]] == ref
    # the same at the cache level: slot 0 held 148 tokens; a 3-token row now sits there
    kv = KVState(tiny, slots=1)
    with torch.inference_mode():
        kv.forward(torch.tensor([long.token_ids]), rows=(0, 1), offsets=torch.tensor([0]))
        kv.forward(torch.tensor([[5, 6, 7]]), rows=(0, 1), offsets=torch.tensor([0]))
        kv.lengths[0], kv.n = 3, 1
        step = kv.forward(torch.tensor([[11]]))[:, -1]
        fresh = tiny(torch.tensor([[5, 6, 7, 11]])).logits[:, -1]
    torch.testing.assert_close(step, fresh)


def test_chunked_prefill_of_long_prompts_equals_one_forward(tiny):
    engine = Engine(tiny)
    reqs = [Request([3 + j % 90 for j in range(n)], 6) for n in (150, 70, 2, 33)]
    ref = alone(engine, reqs)
    for chunk in (1, 16, 1000):
        got = engine.generate(reqs, GenerationConfig(max_new_tokens=6, stop_token_ids=STOP_NONE), max_batch=3,
                              prefill_tokens=chunk)
        assert [r.token_ids for r in got] == ref, chunk


def test_per_row_stop_tokens_and_budgets(tiny):
    engine = Engine(tiny)
    reqs = mixed_requests(seed=4, n=6)
    ref = alone(engine, reqs)
    stop = ref[0][2]  # a token the first row produces third
    cfg = GenerationConfig(max_new_tokens=99, stop_token_ids=(stop,))
    got = engine.generate(reqs, cfg, max_batch=2)
    for r, full in zip(got, ref):
        if stop in full:
            cut = full.index(stop) + 1
            assert r.token_ids == full[:cut] and r.finish_reason == "stop"
        else:
            assert r.token_ids == full and r.finish_reason == "length"
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 3


def test_stream_turns_unusable_prompts_into_error_rows_and_goes_on(tiny):
    engine = Engine(tiny)
    good = Request([4, 5, 6], 5)
    budget = 4 * engine.bytes_per_token * 60  # 60 KV positions per row at width 4
    items = [good, [], [1] * 300, [1, 500], Request([7] * 50, 20), good]
    got = dict(engine.stream(items, GenerationConfig(stop_token_ids=STOP_NONE), max_batch=4, kv_budget_bytes=budget))
    assert sorted(got) == list(range(6))
    assert got[0].token_ids == got[5].token_ids == alone(engine, [good])[0]
    assert "is empty" in got[1].error
    assert "has 300 tokens; the model's context is 256" in got[2].error
    assert "outside the vocabulary" in got[3].error
    assert "needs 70 KV positions" in got[4].error and "allows 60 per row at width 4" in got[4].error
    assert all(got[i].finish_reason == "error" and got[i].token_ids == [] for i in (1, 2, 3, 4))


def test_a_width_that_cannot_fit_the_budget_is_refused(tiny):
    engine = Engine(tiny)
    with pytest.raises(ValueError, match="a KV cache of 64 rows does not fit the budget"):
        list(engine.stream([[1, 2]], max_batch=64, kv_budget_bytes=1000))
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        list(engine.stream([[1, 2]], max_batch=0))


def test_the_cache_grows_with_the_longest_row_not_with_the_stream(tiny):
    """Many rows through two slots: storage stays sized by the longest row, never by the total."""
    engine = Engine(tiny)
    reqs = [Request([3 + i % 50] * 20, 10) for i in range(30)]
    engine.generate(reqs, GenerationConfig(max_new_tokens=10, stop_token_ids=STOP_NONE), max_batch=2)
    kv = engine.last_stream
    # 30 rows x 30 tokens went through 2 slots of at most 64 positions
    assert kv["max_batch"] == 2 and 0 < kv["kv_bytes"] <= 2 * 64 * engine.bytes_per_token
