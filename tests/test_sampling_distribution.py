"""Speculative sampling must leave the output distribution exactly the full model's."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter, SamplingParams
from conflayers.accept import accept_sampled

from .conftest import tiny_model

V = 5


def chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    expected = probs * n
    keep = expected > 5  # pool rare cells so the chi-square approximation holds
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp).pvalue


def _first_token_counts(rule, p, q, n=40000, seed=0):
    draft = torch.multinomial(q[0].expand(n, -1), 1, generator=torch.Generator().manual_seed(seed))
    a, y = rule(draft, torch.ones(n, dtype=torch.long), p.expand(n, -1, -1), q.expand(n, -1, -1), torch.Generator().manual_seed(seed + 1))
    first = torch.where(a > 0, draft[:, 0], y)
    return np.bincount(first.numpy(), minlength=V)


def wrong_rule(draft, lens, p, q, gen):
    """A broken acceptance that takes every draft token: its output follows q, and must be caught."""
    return lens.clone(), torch.multinomial(p[:, -1], 1, generator=gen).squeeze(-1)


def test_accept_rule_reproduces_the_target_distribution_and_the_test_catches_a_wrong_one():
    p = torch.tensor([[[0.5, 0.2, 0.15, 0.1, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]]])
    q = torch.tensor([[[0.1, 0.4, 0.1, 0.3, 0.1]]])
    assert chi2_p(_first_token_counts(accept_sampled, p, q), p[0, 0].numpy()) > 1e-3
    assert chi2_p(_first_token_counts(wrong_rule, p, q), p[0, 0].numpy()) < 1e-6


def exact_sequence_probs(model, prompt, n_tokens, params):
    """Exact probability of every length-n continuation under the full model with the warp."""
    from conflayers.sampling import warp

    probs = {}
    for seq in itertools.product(range(V), repeat=n_tokens):
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        pr = warp(logits, params)
        probs[seq] = float(torch.prod(pr[torch.arange(n_tokens), torch.tensor(seq)]))
    return probs


def assert_samples_the_full_model(prompt, params, drafter, seed, n_tok=3, n=6000):
    """Sample ``n`` continuations with ``drafter`` and check them against the exact distribution."""
    model = tiny_model("llama", layers=6, vocab=V, std=0.3, seed=3)
    exact = exact_sequence_probs(model, prompt, n_tok, params)
    cfg = GenerationConfig(max_new_tokens=n_tok, sampling=params, seed=seed, stop_token_ids=())
    results = Engine(model).generate([prompt] * n, cfg, drafter(model))
    drafted = sum(r.stats.drafted for r in results)
    accepted = sum(r.stats.accepted for r in results)
    assert drafted > 0 and 0 < accepted < drafted  # the draft differs from the model and is partly accepted
    keys = list(exact)
    index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    for r in results:
        counts[index[tuple(r.token_ids)]] += 1
    assert chi2_p(counts, np.array([exact[k] for k in keys])) > 1e-3


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.5, top_k=4, top_p=0.9)])
def test_speculative_sampling_end_to_end_matches_the_full_model(params):
    assert_samples_the_full_model([1, 2, 3], params, seed=7, drafter=lambda model: LayerSkipDrafter(
        model, FixedSkip([1, 3]), stop_threshold=0.0, max_draft_len=2))


def test_ngram_drafts_keep_the_full_models_distribution():
    """A deterministic draft (prompt lookup, one-hot q) under the rejection rule samples the target."""
    from conflayers.drafts.ngram import NgramDrafter

    assert_samples_the_full_model([1, 2, 3, 4, 1, 2], SamplingParams(temperature=1.0), seed=11,
                                  drafter=lambda model: NgramDrafter(max_ngram=2, max_tokens=2))
