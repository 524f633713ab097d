"""The corpus suffix index against a brute-force scan of its outputs, its cap, and its file format."""

import random

import pytest

from conflayers.drafts.corpus import SuffixIndex


def brute_counts(outputs, s):
    """{next token: count} after every occurrence of ``s`` in ``outputs``, and the number of occurrences."""
    counts, total, L = {}, 0, len(s)
    for o in outputs:
        for j in range(len(o) - L + 1):
            if list(o[j : j + L]) == list(s):
                total += 1
                if j + L < len(o):
                    counts[o[j + L]] = counts.get(o[j + L], 0) + 1
    return counts, total


def brute_match(outputs, context, depth):
    for L in range(min(depth - 1, len(context)), 0, -1):
        counts, _ = brute_counts(outputs, context[-L:])
        if counts:
            return L, counts
    return 0, {}


def brute_propose(outputs, context, max_tokens, ix):
    L, counts = brute_match(outputs, context, ix.depth)
    if L < max(ix.min_match, 1) or max_tokens <= 0:
        return []
    seq, draft, prob, limit = list(context), [], 1.0, min(max_tokens, L + ix.slack)
    while len(draft) < limit:
        counts, total = brute_counts(outputs, seq[len(seq) - L :])
        if not counts:
            break
        t = min(counts, key=lambda x: (-counts[x], x))
        prob *= counts[t] / total
        if prob < ix.min_prob:
            break
        draft.append(t)
        seq.append(t)
        L = min(L + 1, ix.depth - 1)
    return draft


def random_corpus(rng, n_out, vocab, max_len):
    base = [rng.randrange(vocab) for _ in range(12)]  # shared boilerplate, so long matches happen
    outs = []
    for _ in range(n_out):
        o = [rng.randrange(vocab) for _ in range(rng.randrange(1, max_len))]
        if rng.random() < 0.5:
            at = rng.randrange(len(o) + 1)
            o[at:at] = base[rng.randrange(4) :]
        if rng.random() < 0.2:
            o = [rng.randrange(2)] * rng.randrange(1, 20) + o  # long runs of one token
        outs.append(o)
    return outs


@pytest.mark.parametrize("seed", range(12))
def test_longest_match_and_counts_equal_a_brute_force_scan(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 20])
    depth = rng.choice([2, 3, 5, 8, 32])
    outs = random_corpus(rng, rng.randrange(1, 15), vocab, 30)
    ix = SuffixIndex(max_tokens_indexed=10**6, depth=depth, min_prob=rng.choice([0.0, 0.1, 0.4]),
                     slack=rng.choice([0, 2, 5]), min_match=rng.choice([1, 2]))
    for o in outs:
        ix.add(o)
    for _ in range(60):
        if rng.random() < 0.5:  # a context taken from the corpus, perturbed at its start
            o = rng.choice(outs)
            a = rng.randrange(len(o))
            ctx = [rng.randrange(vocab + 1)] + o[: a + 1]
        else:
            ctx = [rng.randrange(vocab + 1) for _ in range(rng.randrange(0, 12))]
        assert ix.longest_match(ctx) == brute_match(outs, ctx, depth), ctx
        k = rng.randrange(0, 12)
        assert ix.propose(ctx, k) == brute_propose(outs, ctx, k, ix), ctx


def test_a_copy_is_drafted_and_its_length_follows_the_match():
    ix = SuffixIndex(depth=16, slack=2)
    ix.add([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert ix.propose([9, 9, 1, 2, 3], 20) == [4, 5, 6, 7, 8]  # 3 matched + 2 slack
    assert ix.propose([9, 9, 1, 2, 3], 2) == [4, 5]
    assert ix.propose([50, 51], 8) == []  # no match, no draft
    ix.add([3, 99])
    ix.add([3, 99])  # 3 is now followed by 99 twice, by 4 once
    assert ix.longest_match([0, 3]) == (1, {4: 1, 99: 2})
    assert ix.propose([0, 3], 8)[0] == 99


def test_the_cap_is_never_exceeded_and_eviction_keeps_the_recent_outputs():
    rng = random.Random(0)
    cap = 500
    ix = SuffixIndex(max_tokens_indexed=cap, depth=8)
    added = []
    peak_states = 0
    for i in range(400):
        o = [rng.randrange(50) for _ in range(rng.randrange(1, 60))]
        ix.add(o)
        added.append(o)
        assert ix.tokens_indexed <= cap
        assert ix.tokens_indexed == sum(len(x) + 1 for x in ix.outputs)
        peak_states = max(peak_states, ix.states)
    assert peak_states <= 2 * cap + 1
    kept = [list(x) for x in ix.outputs]
    assert kept == added[len(added) - len(kept) :]  # the newest, in order
    assert ix.rebuilds > 10
    # the rebuilt index answers as an index of the kept outputs
    for o in kept[-5:]:
        ctx = o[: max(1, len(o) // 2)]
        assert ix.longest_match(ctx) == brute_match(kept, ctx, ix.depth)
    too_long = list(range(2 * cap))
    ix.add(too_long)
    assert ix.tokens_indexed <= cap and list(ix.outputs[-1]) == too_long[: cap - 1]


def test_updates_are_linear_even_on_a_run_of_one_token():
    ix = SuffixIndex(max_tokens_indexed=10**6, depth=32)
    ix.add([7] * 20000)
    assert ix.states <= 2 * 20001
    assert ix.propose([7, 7, 7], 8) == [7] * 5


def test_round_trip_keeps_every_answer():
    rng = random.Random(3)
    ix = SuffixIndex(max_tokens_indexed=4000, depth=6, key="llama-tiny@v97", min_prob=0.15, slack=3, min_match=2)
    outs = random_corpus(rng, 40, 6, 40)
    for o in outs:
        ix.add(o)
    data = ix.to_bytes()
    back = SuffixIndex.from_bytes(data, key="llama-tiny@v97")
    assert (back.cap, back.depth, back.key, back.min_prob, back.slack, back.min_match) == (
        4000, 6, "llama-tiny@v97", 0.15, 3, 2)
    assert [list(o) for o in back.outputs] == [list(o) for o in ix.outputs]
    for _ in range(50):
        ctx = [rng.randrange(6) for _ in range(rng.randrange(1, 10))]
        assert back.longest_match(ctx) == ix.longest_match(ctx)
        assert back.propose(ctx, 8) == ix.propose(ctx, 8)
    assert SuffixIndex.from_bytes(SuffixIndex(key="k").to_bytes(), key="k").tokens_indexed == 0
    small = SuffixIndex.from_bytes(data, key="llama-tiny@v97", max_tokens_indexed=200)
    assert small.tokens_indexed <= 200


def test_an_index_for_another_model_is_refused_by_name():
    data = SuffixIndex(key="SmolLM2-135M@49152").to_bytes()
    with pytest.raises(ValueError, match=r"built for 'SmolLM2-135M@49152', not for 'Qwen2-0.5B@151936'"):
        SuffixIndex.from_bytes(data, key="Qwen2-0.5B@151936")


def test_damaged_bytes_are_a_clear_value_error():
    ix = SuffixIndex(key="m")
    ix.add([1, 2, 3, 4])
    ix.add([5, 6])
    data = ix.to_bytes()
    bad = [b"", b"CLS", b"junk" * 10, data[:-1], data[:10], data[:-9] + data[-8:], data + b"x"]
    bad += [data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :] for i in range(len(data))]
    for b in bad:
        try:
            ix2 = SuffixIndex.from_bytes(b, key="m")
        except ValueError as e:
            assert "corpus index" in str(e) or "token ids" in str(e)
        else:  # a flip that still decodes must be caught by the checksum: never here
            raise AssertionError(f"accepted damaged bytes {b!r}: {list(ix2.outputs)}")
    with pytest.raises(ValueError, match="version"):
        SuffixIndex.from_bytes(data[:4] + b"\x09\x00" + data[6:], key="m")


def test_memory_estimate_grows_with_the_tokens_and_is_bounded_by_the_cap():
    rng = random.Random(1)
    ix = SuffixIndex(max_tokens_indexed=20000, depth=32)
    sizes = []
    for _ in range(300):
        ix.add([rng.randrange(2000) for _ in range(200)])
        sizes.append(ix.memory_bytes())
    assert 0 < sizes[0] < sizes[50]
    assert max(sizes) < 20000 * 64  # under 64 bytes a token on random tokens (the cap holds it)
