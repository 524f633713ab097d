"""The ConfLayers search state machine (ALGORITHM.md §6) driven by scripted step outcomes."""

import numpy as np
import pytest
import torch

from conflayers import Engine, GenerationConfig, LayerSkipDrafter
from conflayers.drafts.seam import StepOutcome
from conflayers.search.conflayers import ConfLayersSearch, SearchConfig
from conflayers.search.policy import make_policy

from .conftest import tiny_model

L = 10  # 8 intermediate layers


pytestmark = pytest.mark.usefixtures("one_thread")


class Curves:
    """A scripted confidence pass: a different single dip each call (so each proposal differs)."""

    def __init__(self, dips=(2, 5, 3, 6, 4, 7, 1, 8)):
        self.dips, self.calls = dips, 0

    def __call__(self, ids, window):
        c = np.ones(L - 2)
        c[self.dips[self.calls % len(self.dips)] - 1] = 0.0
        self.calls += 1
        return c


def outcome(acc, drafted=8, rows=1, generated=500, budget=1000, seconds=0.1, committed=None):
    return StepOutcome(
        lens=torch.full((rows,), drafted),
        accepted=torch.full((rows,), acc),
        committed=[acc + 1] * rows if committed is None else [committed] * rows,
        skip=frozenset(),
        draft_seconds=seconds / 2,
        verify_seconds=seconds / 2,
        histories=[[1, 2, 3]] * rows,
        generated=[generated] * rows,
        budget=[budget] * rows,
    )


def drive(policy, acc, steps, **kw):
    for _ in range(steps):
        policy.skip_set()
        policy.observe(outcome(acc, **kw))


def searcher(**knobs):
    knobs.setdefault("objective", "acceptance")
    return ConfLayersSearch(n_layers=L, confidence_fn=Curves(), **knobs)


def test_starts_with_every_other_layer_and_stops_on_success():
    s = searcher(interval=6)
    assert s.skip_set() == frozenset({1, 3, 5, 7})
    drive(s, acc=8, drafted=8, steps=7)  # mean acc 8 > 4, rate 1 > 0.95
    assert s.phase == "installed" and not s.active and s.iterations == 0
    assert s.skip_set() == frozenset({1, 3, 5, 7}) and s.best_measurement.tau == 9.0


def test_abandons_hopeless_set_after_half_an_interval():
    s = searcher(interval=10)
    drive(s, acc=0, steps=4)
    assert s.iterations == 0
    drive(s, acc=0, steps=1)  # the 5th record: mean acc 0 < 1
    assert s.iterations == 1 and s.acc == [] and s.best is None


def test_records_only_after_the_window_and_short_outputs_use_a_short_window():
    cfg = SearchConfig()
    assert cfg.effective_window(None) == 100 and cfg.effective_window(1000) == 100
    assert cfg.effective_window(64) == 16 and cfg.effective_window(10) == cfg.min_window
    s = searcher(interval=10)
    drive(s, acc=3, steps=5, generated=16, budget=64)  # not past W = 16 yet
    assert s.acc == []
    drive(s, acc=3, steps=2, generated=17, budget=64)
    assert s.acc == [3, 3]


def test_confidence_pass_sees_prompt_and_recent_window_of_the_longest_row():
    from conflayers.search.confidence import recent_context

    assert recent_context([1, 2, 3, 10, 11, 12, 13], 4, 2) == [1, 2, 3, 12, 13]
    assert recent_context([1, 2], None, 1) == [1, 2]
    seen = []
    s = ConfLayersSearch(n_layers=L, confidence_fn=lambda ids, w: seen.append((ids, w)) or np.ones(L - 2),
                         objective="acceptance", rho=0.6)
    s.skip_set()
    s.observe(StepOutcome(lens=torch.tensor([1, 1]), accepted=torch.tensor([0, 0]), committed=[1, 1], skip=frozenset(),
                          draft_seconds=0.0, verify_seconds=0.0, histories=[[7, 8, 1, 2], [9] + list(range(20, 40))],
                          generated=[2, 20], budget=[32, 32]))
    assert seen == [([9] + list(range(32, 40)), 8)]  # W = max(min_window 8, 32 // 4)


def test_batched_rows_all_record():
    s = searcher(interval=100)
    drive(s, acc=2, rows=4, steps=3)
    assert len(s.acc) == 12


def test_keeps_the_best_and_installs_it_after_max_iterations():
    s = searcher(interval=4, max_iter=4, rho=0.0)
    seen = []
    for acc in (2, 3, 1, 2):  # each evaluation ends with a proposal
        seen.append((s.S, acc))
        drive(s, acc=acc, drafted=4, steps=5)
    assert s.iterations == 4 and s.phase == "installed"
    best_set = max(seen, key=lambda x: x[1])[0]
    assert s.best == best_set and s.skip_set() == best_set
    assert s.best_measurement.mean_accepted == 3


def test_plain_decoding_fallback_when_no_set_was_ever_best():
    s = searcher(interval=4, max_iter=3)
    drive(s, acc=0, steps=50)  # every set hopeless: the reference would install an empty S*
    assert s.iterations == 3 and s.phase == "plain" and s.best is None
    assert s.skip_set() is None and s.state()["skip_set"] is None


def test_too_small_sets_are_replaced_at_once():
    s = searcher(interval=4, max_iter=50, rho=0.6)  # min size floor(8*0.6)+1 = 5 > |start set|; the curves give 1-layer sets
    drive(s, acc=3, steps=3)
    assert s.iterations == 3  # one proposal per observed step; λ is pushed down each time
    assert s.lam < 0


def _throughput_run(set_seconds, plain_seconds=0.1, acc=6, explore_budget=1.0):
    s = searcher(objective="throughput", interval=4, max_iter=3, plain_every=3, explore_budget=explore_budget)
    for _ in range(200):
        if s.phase != "search":
            break
        choice = s.skip_set()
        if choice is None:  # plain decoding: 1 token a step
            s.observe(outcome(0, drafted=0, seconds=plain_seconds, committed=1))
        else:
            s.observe(outcome(acc, drafted=8, seconds=set_seconds))
    return s


def test_throughput_never_installs_a_set_slower_than_plain():
    s = _throughput_run(set_seconds=2.0)  # 7 tokens / 2 s vs plain 10 tokens/s
    assert s.phase == "plain" and s.skip_set() is None
    st = s.state()
    assert st["plain_tokens_per_s"] == pytest.approx(10.0) and st["speedup"] < 1
    assert s.rho < 0.4  # losing sets shrink the effective ρ


def test_throughput_installs_a_set_that_beats_plain():
    s = _throughput_run(set_seconds=0.2)  # 7 tokens / 0.2 s = 35 tokens/s vs 10
    assert s.phase == "installed" and s.skip_set() == s.best
    assert s.state()["speedup"] == pytest.approx(3.5)


def _stream(s, steps, set_seconds, plain_seconds=0.1, acc=0):
    """Scripted decoding: plain steps commit 1 token, set steps acc + 1; returns the stream's tokens/s."""
    tokens = seconds = 0.0
    for _ in range(steps):
        if s.skip_set() is None:
            s.observe(outcome(0, drafted=0, seconds=plain_seconds, committed=1))
            tokens, seconds = tokens + 1, seconds + plain_seconds
        else:
            s.observe(outcome(acc, drafted=4, seconds=set_seconds))
            tokens, seconds = tokens + acc + 1, seconds + set_seconds
    return tokens / seconds


def test_throughput_search_costs_at_most_its_explore_budget():
    # every set loses: a step under it commits 1 token in 0.3 s, plain 1 token in 0.1 s
    knobs = dict(objective="throughput", interval=1000, max_iter=1000)
    bounded = searcher(explore_budget=0.1, **knobs)
    tps = _stream(bounded, 2000, set_seconds=0.3)
    assert bounded.phase == "search" and bounded.paused_steps > 1000
    assert tps >= 0.89 * 10.0  # within the 10% budget of plain's 10 tokens/s
    assert bounded.state()["regret_seconds"] <= 0.1 * bounded._elapsed + 0.2  # one set step loses 0.2 s
    unbounded = searcher(explore_budget=1.0, **knobs)
    assert _stream(unbounded, 2000, set_seconds=0.3) < 0.5 * 10.0  # the same search without the budget
    assert unbounded.paused_steps == 0


def test_throughput_budget_never_pauses_a_winning_search():
    s = searcher(objective="throughput", interval=1000, max_iter=1000, explore_budget=0.05)
    tps = _stream(s, 300, set_seconds=0.1, acc=2)  # 3 tokens per 0.1 s under every set
    # one pause at most: the search's second step, before plain decoding was ever measured
    assert s.paused_steps <= 1 and s.regret_seconds() < 0 and tps > 25.0
    with pytest.raises(ValueError, match="explore_budget must be in"):
        searcher(objective="throughput", explore_budget=0.0)
    with pytest.raises(ValueError, match="min_tokens"):
        make_policy("swift", tiny_model(layers=4), context=4, min_tokens=8)


def test_throughput_regret_is_priced_at_the_batch_width_of_each_step():
    # plain decoding: 8 rows commit 8 tokens in 0.1 s; 1 row commits 1 token in 0.08 s
    s = searcher(objective="throughput", interval=1000, max_iter=1000, plain_every=2, explore_budget=0.05)
    for rows, plain_s in ((8, 0.1), (1, 0.08)):
        for _ in range(40):
            if s.skip_set() is None:
                s.observe(outcome(0, drafted=0, rows=rows, seconds=plain_s, committed=1))
            else:  # a break-even set: as fast as plain at the same width
                s.observe(outcome(0, drafted=4, rows=rows, seconds=plain_s, committed=1))
    # priced at one blended plain rate, the 1-row tail would look 6x slower than plain (regret
    # ~1.3 s) and pause; here only the first 1-row set step, before a 1-row plain step was seen,
    # is priced at the nearest width (8 rows): -0.02 s
    assert s.paused_steps == 0 and abs(s.regret_seconds()) <= 0.02 + 1e-9


def test_settled_policy_rechecks_rarely_and_switches_to_plain_when_it_loses():
    s = _throughput_run(set_seconds=0.2)
    s.cfg.recheck_every, s.cfg.probe_steps = 10, 3
    s._plain.clear()
    calls = []
    for _ in range(30):
        choice = s.skip_set()
        calls.append(choice)
        if choice is None:  # plain is now much faster
            s.observe(outcome(0, drafted=0, seconds=0.001, committed=1))
        else:
            s.observe(outcome(6, seconds=0.2))
    assert calls[:10] == [s.best] * 10 and None in calls
    assert s.phase == "plain"


def test_settled_on_plain_without_a_candidate_searches_again_rarely():
    s = searcher(objective="throughput", interval=4, max_iter=10, recheck_every=20)
    while s.phase == "search":
        choice = s.skip_set()
        s.observe(outcome(0, drafted=0 if choice is None else 8, committed=1))  # every set hopeless
    assert s.phase == "plain" and s.iterations == 10 and s.rho < 0.4
    for _ in range(19):
        assert s.skip_set() is None
        s.observe(outcome(0, drafted=0, committed=1))
    assert s.phase == "plain"
    s.skip_set()
    s.observe(outcome(0, drafted=0, committed=1))
    assert s.phase == "search" and s._iter_limit == 11


def test_state_survives_across_prompts_and_batches():
    model = tiny_model(layers=8)
    engine = Engine(model)
    policy = make_policy("conflayers", model, objective="acceptance", interval=4, max_iter=1000, window=8, min_window=2)
    drafter = LayerSkipDrafter(model, policy, stop_threshold=0.0, max_draft_len=3)
    config = GenerationConfig(max_new_tokens=12)
    for prompts in ([[1, 2, 3], [4, 5]], [[6, 7, 8, 9]]):
        before = policy.iterations + len(policy.acc)
        plain = engine.generate(prompts, config)
        spec = engine.generate(prompts, config, drafter)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        assert policy.iterations + len(policy.acc) > before  # the same state keeps learning
    assert policy.iterations >= 1 and policy.last_rule is not None


def test_bad_knobs_are_rejected():
    model = tiny_model(layers=4)
    with pytest.raises(ValueError, match="objective must be one of"):
        make_policy("conflayers", model, objective="speed")
    with pytest.raises(ValueError, match="unknown knob"):
        make_policy("conflayers", model, nonsense=1)
    with pytest.raises(ValueError, match="unknown searcher"):
        make_policy("magic", model)
    with pytest.raises(ValueError, match="interval must be an integer"):
        make_policy("conflayers", model, interval=0)


def test_swift_match_rate_scores_the_draft_against_committed_greedy_tokens():
    from conflayers.layers import skip_layers
    from conflayers.search.swift import match_rate

    model = tiny_model(layers=6, std=0.2)
    prompt = [5, 9, 2, 7]
    gen = Engine(model).generate([prompt], GenerationConfig(max_new_tokens=10))[0].token_ids
    seq = prompt + gen
    # the full model agrees with its own greedy tokens everywhere
    assert match_rate(model, seq, len(gen)) == 1.0
    # a draft is scored position by position against the committed tokens
    skip = frozenset({1, 2, 3})
    with skip_layers(model, skip), torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq[:-1]])).logits[0]
    want = (logits[-6:].argmax(-1) == torch.tensor(seq[-6:])).double().mean().item()
    assert match_rate(model, seq, 6, skip) == pytest.approx(want)
    assert want < 1.0  # the check can fail: this draft disagrees somewhere
    with pytest.raises(ValueError, match="need 1 <= n"):
        match_rate(model, seq, len(seq), skip)


def test_swift_scores_nothing_before_min_tokens_then_iterates():
    model = tiny_model(layers=8, std=0.2)
    policy = make_policy("swift", model, context=8, max_iter=3, eval_every=1, min_tokens=5)
    drafter = LayerSkipDrafter(model, policy, stop_threshold=0.0, max_draft_len=2)
    Engine(model).generate([[3, 1, 4]], GenerationConfig(max_new_tokens=4), drafter)
    assert policy.iterations == 0  # fewer than 5 generated tokens: nothing to score yet
    Engine(model).generate([[3, 1, 4]], GenerationConfig(max_new_tokens=24), drafter)
    state = policy.state()
    assert policy.iterations == 3 and state["phase"] == "installed" and 0.0 <= state["score"] <= 1.0
    assert len(state["skip_set"]) == policy.k
