"""Speculative greedy == plain greedy == transformers generate, token for token (float64)."""

import pytest
import torch

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter, Proposal

from .conftest import RAGGED

N_NEW = 24


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def references(tiny):
    return {tuple(p): hf_greedy(tiny, p, N_NEW) for p in RAGGED}


@pytest.mark.parametrize("batch", [1, 4])
def test_plain_greedy_equals_transformers_generate(tiny, references, batch):
    engine = Engine(tiny)
    cfg = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    for start in range(0, len(RAGGED), batch):
        prompts = RAGGED[start : start + batch]
        for p, r in zip(prompts, engine.generate(prompts, cfg)):
            assert r.token_ids == references[tuple(p)]
            assert r.stats.new_tokens == N_NEW and r.finish_reason == "length"
            assert r.stats.steps == N_NEW - 1 and r.stats.drafted == 0 and r.stats.tau == 1.0


def every_other(model):
    return list(range(1, model.config.num_hidden_layers - 1, 2))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("skip_kind", ["empty", "every_other"])
def test_speculative_greedy_equals_plain(tiny, references, batch, skip_kind):
    skip = [] if skip_kind == "empty" else every_other(tiny)
    engine = Engine(tiny)
    drafter = LayerSkipDrafter(tiny, FixedSkip(skip), stop_threshold=0.0, max_draft_len=4)
    cfg = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    for start in range(0, len(RAGGED), batch):
        prompts = RAGGED[start : start + batch]
        for p, r in zip(prompts, engine.generate(prompts, cfg, drafter)):
            assert r.token_ids == references[tuple(p)]
            st = r.stats
            assert st.new_tokens == N_NEW and st.drafted > 0
            assert 1 + st.steps + st.accepted == N_NEW  # prefill token + one per step + accepted drafts
            if skip_kind == "empty":  # the draft is the full model: everything is accepted
                assert st.accepted == st.drafted and st.tau > 4
                assert st.skip_set == []
            else:
                assert st.skip_set == skip


class ScriptedDrafter:
    """Proposes the known greedy continuation, k tokens at a time, with the token at draft index
    ``wrong_at[step]`` replaced by a wrong one; so step s must accept exactly ``wrong_at[s]`` (or k)."""

    def __init__(self, references, prompts, k, wrong_at, vocab):
        self.refs = [references[tuple(p)] for p in prompts]
        self.prompts = [list(p) for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.k, self.wrong_at, self.vocab = k, wrong_at, vocab
        self.step = 0
        self.expected, self.seen = [], []

    def propose(self, ctx):
        rows = []
        for hist in ctx.histories:
            i = next(j for j, p in enumerate(self.prompts) if hist[: len(p)] == p)
            done = len(hist) - self.prompt_lens[i]
            rows.append(self.refs[i][done : done + self.k])
        k = max(len(r) for r in rows)
        lens = torch.tensor([min(len(r), int(m)) for r, m in zip(rows, ctx.max_draft)])
        tokens = torch.zeros(len(rows), k, dtype=torch.long)
        w = self.wrong_at[self.step % len(self.wrong_at)]
        exp = []
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            if w < lens[b]:
                tokens[b, w] = (tokens[b, w] + 1) % self.vocab
            exp.append(min(w, int(lens[b])))
        self.expected.append(exp)
        self.step += 1
        return Proposal(tokens, lens)

    def observe(self, outcome):
        self.seen.append(outcome.accepted.tolist())


def test_scripted_wrong_tokens_give_the_expected_partial_acceptance(tiny, references):
    engine = Engine(tiny)
    drafter = ScriptedDrafter(references, RAGGED, k=4, wrong_at=[2, 0, 4, 1, 3], vocab=tiny.config.vocab_size)
    results = engine.generate(RAGGED, GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=()), drafter)
    for p, r in zip(RAGGED, results):
        assert r.token_ids == references[tuple(p)]
    assert drafter.seen == drafter.expected
    assert any(0 < a < 4 for step in drafter.seen for a in step)  # partial acceptance really happened


def test_stop_token_ends_each_row_at_its_first_occurrence(tiny, references):
    engine = Engine(tiny)
    prompt = RAGGED[0]
    ref = references[tuple(prompt)]
    stop = ref[5]
    drafter = LayerSkipDrafter(tiny, FixedSkip([]), stop_threshold=0.0, max_draft_len=4)
    for d in (None, drafter):
        (r,) = engine.generate([prompt], GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=(stop,)), d)
        assert r.token_ids == ref[: ref.index(stop) + 1] and r.finish_reason == "stop"


def test_max_new_tokens_is_exact_under_speculation(tiny):
    engine = Engine(tiny)
    drafter = LayerSkipDrafter(tiny, FixedSkip([]), stop_threshold=0.0, max_draft_len=8)
    for n in (1, 2, 5, 9):
        res = engine.generate(RAGGED, GenerationConfig(max_new_tokens=n, stop_token_ids=()), drafter)
        assert [len(r.token_ids) for r in res] == [n] * len(RAGGED)


def test_eager_attention_with_an_additive_mask_is_lossless_too():
    from .conftest import tiny_model

    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    engine = Engine(model)
    drafter = LayerSkipDrafter(model, FixedSkip(every_other(model)), stop_threshold=0.0, max_draft_len=4)
    cfg = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    ref = {tuple(p): hf_greedy(model, p, N_NEW) for p in RAGGED}
    for d in (None, drafter):
        for p, r in zip(RAGGED, engine.generate(RAGGED, cfg, d)):
            assert r.token_ids == ref[tuple(p)]
