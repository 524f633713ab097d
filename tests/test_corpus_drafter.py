"""Corpus drafts are lossless: greedy output equals plain decoding, sampling keeps the distribution."""

import random

import pytest

from conflayers import Engine, GenerationConfig, SamplingParams
from conflayers.corpus import CorpusDrafter, SuffixIndex

from .conftest import tiny_model

N_NEW = 20


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model("llama", layers=4, vocab=97)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    head = [rng.randrange(97) for _ in range(6)]  # a shared template, as in a real corpus
    return [head + [rng.randrange(97) for _ in range(rng.randrange(1, 8))] for _ in range(12)]


@pytest.fixture(scope="module")
def plain(model, prompts):
    cfg = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    return [r.token_ids for r in Engine(model).generate(prompts, cfg)]


def run_shuffled(model, prompts, drafter, width, seed, cfg=None):
    cfg = cfg or GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    out = [None] * len(prompts)
    for j, r in Engine(model).stream([prompts[i] for i in order], cfg, drafter, max_batch=width):
        out[order[j]] = r
    return out


@pytest.mark.parametrize("width", [1, 3, 8])
def test_greedy_with_a_warm_index_equals_plain_decoding(model, prompts, plain, width):
    index = SuffixIndex(depth=16)
    for p, o in zip(prompts, plain):  # earlier outputs of the same prompts (prompt + output)
        index.add(p + o)
    drafter = CorpusDrafter(index, learn_finished=False)
    results = run_shuffled(model, prompts, drafter, width, seed=width)
    assert [r.token_ids for r in results] == plain
    drafted = sum(r.stats.drafted for r in results)
    accepted = sum(r.stats.accepted for r in results)
    assert drafted > 0 and accepted > 0
    assert drafter.picked["corpus"] > 0
    assert all(1 + r.stats.steps + r.stats.accepted == N_NEW for r in results)


def test_finished_rows_teach_the_index_and_a_second_run_drafts_more(model, prompts, plain):
    drafter = CorpusDrafter(SuffixIndex(depth=16), learn_prompts=True)
    cold = run_shuffled(model, prompts, drafter, 4, seed=1)
    assert [r.token_ids for r in cold] == plain
    assert len(drafter.index.outputs) == len(prompts)  # every row was learned once, prompt + output
    assert sorted(map(list, drafter.index.outputs)) == sorted(p + o for p, o in zip(prompts, plain))
    warm = run_shuffled(model, prompts, drafter, 4, seed=2)
    assert [r.token_ids for r in warm] == plain
    assert sum(r.stats.accepted for r in warm) > sum(r.stats.accepted for r in cold)


def test_rows_ending_on_a_stop_token_are_learned_without_passing_it(model, prompts, plain):
    stop = plain[0][4]
    cfg = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=(stop,))
    drafter = CorpusDrafter(SuffixIndex(depth=16))
    results = run_shuffled(model, prompts, drafter, 3, seed=0, cfg=cfg)
    for o, r in zip(plain, results):
        assert r.token_ids == (o[: o.index(stop) + 1] if stop in o else o)
    learned = sorted(map(list, drafter.index.outputs))
    # rows that finished on their first token are never drafted for: only the others are learned
    assert learned == sorted(r.token_ids for r in results if r.stats.steps > 0)


def test_a_tie_goes_to_the_rows_own_ngram_draft():
    index = SuffixIndex(depth=8, slack=8)
    index.add([1, 2, 3, 40, 41, 42])
    d = CorpusDrafter(index, max_tokens=3, learn_finished=False)
    # the row's own text says 1 2 3 -> 7 8 9; the corpus says 1 2 3 -> 40 41 42: equal length, own wins
    assert d.candidates([[1, 2, 3, 7, 8, 9, 5, 1, 2, 3]], [3]) == [[7, 8, 9]]
    # a longer corpus draft wins over a shorter own draft (own: 3 -> 6 3, at the row's end)
    assert d.candidates([[5, 3, 6, 3]], [3]) == [[40, 41, 42]]
    assert d.candidates([[60, 61]], [3]) == [[]]


def test_corpus_drafts_keep_the_full_models_distribution():
    from .test_sampling_distribution import assert_samples_the_full_model

    def drafter(model):
        index = SuffixIndex(depth=4, min_prob=0.0)
        for o in ([1, 2, 3, 0, 4], [2, 3, 1, 1], [3, 4, 4, 2], [3, 2, 0, 1]):
            index.add(o)
        return CorpusDrafter(index, max_tokens=2, learn_finished=False)

    assert_samples_the_full_model([1, 2, 3], SamplingParams(temperature=1.0), seed=13, drafter=drafter)
