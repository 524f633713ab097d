"""Corpus drafts are lossless: greedy output equals plain decoding, sampling keeps the distribution."""

import random

import pytest

from conflayers import Engine, GenerationConfig, SamplingParams
from conflayers.drafts.corpus import CorpusDrafter, SuffixIndex

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


def test_a_rows_kept_match_drafts_what_a_fresh_lookup_drafts():
    """Rows grow token by token while outputs arrive (indexed every 3 steps, two groups): each
    row's draft is always the longer of its own n-gram draft and a fresh lookup in its group's
    index, as if nothing were kept between steps."""
    rng = random.Random(11)
    d = CorpusDrafter(max_tokens=6, learn_finished=False, learn_every=3,
                      new_index=lambda group: SuffixIndex(depth=6, slack=4, max_tokens_indexed=300))
    for g in ("a", "b"):
        for _ in range(3):
            d.learn([rng.randrange(6) for _ in range(30)], g)
    hists = [[rng.randrange(6) for _ in range(rng.randrange(1, 9))] for _ in range(5)]
    groups = ["a", "b", "a", "b", "a"]
    corpus_picked = 0
    for step in range(120):
        limits = [rng.randrange(0, 7) for _ in hists]
        got = d.drafts(hists, limits, groups)
        for h, g, lim, (draft, src, _) in zip(hists, groups, limits, got):
            own = d.ngram.candidates([h], [lim])[0]
            fresh = d.indexes[g].propose(h, lim) if lim else []
            want = (fresh, "corpus") if len(fresh) > len(own) else (own, "ngram")
            assert (draft, src) == want, (step, h, g, lim)
            corpus_picked += src == "corpus"
        for h in hists:
            h.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))
        if step % 5 == 0:  # new outputs: the indexes change (and evict past their cap)
            d.learn([rng.randrange(6) for _ in range(rng.randrange(5, 40))], rng.choice("ab"))
        if step % 40 == 39:  # a row finishes, a new one takes its slot
            hists[step % 5] = [rng.randrange(6)]
    assert corpus_picked > 50
    assert all(ix.rebuilds > 0 for ix in d.indexes.values())


@pytest.mark.parametrize("width", [1, 3, 8])
def test_auto_with_corpus_drafts_is_lossless_and_uses_them(model, prompts, plain, width):
    """``auto`` on a GPU-like surface, two datasets, a warm index per dataset: greedy output equals
    plain decoding token for token, and some steps verify corpus drafts."""
    from collections import Counter

    from conflayers import Request
    from conflayers.drafts.auto import AutoDrafter
    from conflayers.drafts.ngram import NgramDrafter

    from .test_auto_drafter import gpu_like

    groups = ["a" if i % 2 else "b" for i in range(len(prompts))]
    corpus = CorpusDrafter(new_index=lambda g: SuffixIndex(depth=16))
    for p, o, g in zip(prompts, plain, groups):
        corpus.learn(p + o, g)
    ctl = AutoDrafter(gpu_like(4), NgramDrafter(), None, corpus=corpus)
    reqs = [Request(p, N_NEW, group=g) for p, g in zip(prompts, groups)]
    order = list(range(len(reqs)))
    random.Random(width).shuffle(order)
    got = [None] * len(reqs)
    cfg = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    for j, r in Engine(model).stream([reqs[i] for i in order], cfg, ctl, max_batch=width):
        got[order[j]] = r
    assert [r.token_ids for r in got] == plain
    steps = sum((r.stats.drafter_steps for r in got), start=Counter())
    assert steps["corpus"] > 0 and ctl.decisions["corpus"] > 0
    assert sum(r.stats.accepted for r in got) > 0
    assert set(ctl.state()["corpus_acceptance"]) <= {f"{g}|match>{m}" for g in "ab" for m in (0, 2, 5, 11)}


def test_controller_trusts_long_corpus_matches_and_not_short_ones():
    """Acceptance is kept per match length: short matches that fail stop being drafted while long
    matches that copy keep being drafted."""
    import torch

    from conflayers.drafts.auto import AutoDrafter
    from conflayers.drafts.ngram import NgramDrafter
    from conflayers.drafts.seam import DraftContext, StepOutcome

    from .test_auto_drafter import cpu_surface

    corpus = CorpusDrafter(SuffixIndex(depth=32, slack=8), learn_finished=False)
    long_out = list(range(100, 140))
    corpus.learn(long_out)
    corpus.learn([7, 8, 9, 10, 11, 12, 13, 14])
    ctl = AutoDrafter(cpu_surface(), NgramDrafter(), None, corpus=corpus)

    def step(hist, accept_all):
        ctx = DraftContext(None, torch.zeros(1, dtype=torch.long), [hist], torch.full((1,), 20), None, None,
                           frozenset(), [""])
        prop = ctl.propose(ctx)
        n = int(prop.lens[0])
        acc = prop.lens.clone() if accept_all else torch.zeros(1, dtype=torch.long)
        ctl.observe(StepOutcome(prop.lens, acc, [int(acc[0]) + 1], frozenset(), 0.0, 0.0, [hist], [0], [99]))
        return prop.sources[0] if prop.sources else "none", n

    for _ in range(40):  # a 1-token match (7 -> 8 9 10): drafted at first, always wrong
        src, n = step([3, 7], accept_all=False)
    assert (src, n) == ("none", 0)
    for i in range(10):  # a 20-token match into the long output: drafted and right
        src, n = step([1, 2] + long_out[i : i + 20], accept_all=True)
        assert src == "corpus" and n > 0
    short, long_ = ctl._cp_rate("", 1).value(), ctl._cp_rate("", 20).value()
    assert short < 0.2 and long_ > 0.9


def test_a_group_seen_first_gets_its_index_from_new_index():
    """A saved index (here: one made by ``new_index``) drafts for its group's rows from the first step."""
    saved = SuffixIndex(depth=8)
    saved.add([5, 6, 7, 8, 9, 10])
    made = []
    d = CorpusDrafter(learn_finished=False,
                      new_index=lambda g: made.append(g) or (saved if g == "tagged" else SuffixIndex()))
    assert d.candidates([[1, 5, 6], [1, 5, 6]], [3, 3], ["tagged", "other"]) == [[7, 8, 9], []]
    assert made == ["tagged", "other"] and d.index_for("tagged") is saved
