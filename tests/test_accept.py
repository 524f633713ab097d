"""The accept step as pure functions on hand-built logits."""

import torch

from conflayers.accept import accept_greedy, accept_sampled, commit

V = 6


def logits_for(targets):
    """Verify logits whose argmax at position i is targets[i]."""
    out = torch.zeros(len(targets), V)
    for i, t in enumerate(targets):
        out[i, t] = 5.0
    return out


def test_full_match_takes_bonus_token():
    draft = torch.tensor([[1, 2, 3]])
    a, y = accept_greedy(draft, torch.tensor([3]), logits_for([1, 2, 3, 4])[None])
    assert a.tolist() == [3] and y.tolist() == [4]


def test_first_token_mismatch_commits_only_the_correction():
    draft = torch.tensor([[1, 2, 3]])
    a, y = accept_greedy(draft, torch.tensor([3]), logits_for([5, 2, 3, 4])[None])
    assert a.tolist() == [0] and y.tolist() == [5]


def test_mismatch_in_the_middle():
    draft = torch.tensor([[1, 2, 3]])
    a, y = accept_greedy(draft, torch.tensor([3]), logits_for([1, 0, 3, 4])[None])
    assert a.tolist() == [1] and y.tolist() == [0]


def test_ragged_and_empty_drafts():
    # row 0 drafted 3 (all right), row 1 drafted 1 (right; padding after it would also "match"),
    # row 2 drafted nothing: plain decoding
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0]])
    lens = torch.tensor([3, 1, 0])
    logits = torch.stack([logits_for([1, 2, 3, 4]), logits_for([1, 2, 3, 4]), logits_for([0, 0, 0, 0])])
    a, y = accept_greedy(draft, lens, logits)
    assert a.tolist() == [3, 1, 0]
    assert y.tolist() == [4, 2, 0]


def test_zero_width_draft_is_plain_decoding():
    a, y = accept_greedy(torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 0]), torch.stack([logits_for([3]), logits_for([4])]))
    assert a.tolist() == [0, 0] and y.tolist() == [3, 4]


def test_eos_inside_a_draft_ends_the_row_there():
    eos = 5
    draft = torch.tensor([[1, eos, 3]])
    a, y = accept_greedy(draft, torch.tensor([3]), logits_for([1, eos, 3, 4])[None])
    assert a.tolist() == [3]
    toks, reason = commit(draft[0].tolist(), int(a[0]), int(y[0]), frozenset({eos}), remaining=10)
    assert toks == [1, eos] and reason == "stop"


def test_commit_respects_the_token_budget():
    toks, reason = commit([1, 2, 3], 3, 4, frozenset(), remaining=2)
    assert toks == [1, 2] and reason == "length"
    toks, reason = commit([1, 2, 3], 1, 4, frozenset(), remaining=5)
    assert toks == [1, 4] and reason is None


def test_sampled_accept_with_identical_distributions_accepts_everything():
    p = torch.softmax(torch.randn(1, 4, V, generator=torch.Generator().manual_seed(0)), -1)
    draft = torch.tensor([[2, 1, 0]])
    a, _ = accept_sampled(draft, torch.tensor([3]), p, p[:, :3].clone(), torch.Generator().manual_seed(1))
    assert a.tolist() == [3]


def test_sampled_accept_never_takes_a_token_the_target_cannot_produce():
    p = torch.zeros(1, 2, V)
    p[0, :, 4] = 1.0  # the target always says 4
    q = torch.zeros(1, 1, V)
    q[0, 0, 2] = 1.0  # the draft always says 2
    for seed in range(20):
        a, y = accept_sampled(torch.tensor([[2]]), torch.tensor([1]), p, q, torch.Generator().manual_seed(seed))
        assert a.tolist() == [0] and y.tolist() == [4]
