"""Rows of several groups in one decode batch, each group under its own drafter (float64)."""

import pytest

from conflayers import Engine, FixedSkip, GenerationConfig, GroupRouter, LayerSkipDrafter, NoDrafter, Request

from .conftest import tiny_model
from .test_continuous import alone, mixed_requests


class RecordingSkip(FixedSkip):
    """A fixed skip set that keeps what each of its steps reported back."""

    def __init__(self, layers):
        super().__init__(layers)
        self.asked = 0
        self.seen: list[tuple[int, list[int]]] = []  # (rows, their budgets) per observed step

    def skip_set(self):
        self.asked += 1
        return super().skip_set()

    def observe(self, outcome):
        assert len(outcome.lens) == len(outcome.accepted) == len(outcome.committed) == len(outcome.histories)
        self.seen.append((len(outcome.committed), list(outcome.budget)))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_mixed_groups_decode_losslessly_and_each_drafter_sees_only_its_rows(model):
    engine = Engine(model)
    base = mixed_requests(seed=7, n=9)
    # group a gets odd budgets' rows, b the others; budgets tell the groups' rows apart in the outcomes
    reqs = [Request(r.token_ids, r.max_new_tokens, group="a" if i % 3 else "b") for i, r in enumerate(base)]
    budgets = {g: {r.max_new_tokens for r in reqs if r.group == g} for g in "ab"}
    pa, pb = RecordingSkip([1, 3]), RecordingSkip([2])
    router = GroupRouter({"a": LayerSkipDrafter(model, pa, 0.0, 3), "b": LayerSkipDrafter(model, pb, 0.0, 2)})
    cfg = GenerationConfig(max_new_tokens=99, stop_token_ids=())
    got = engine.generate(reqs, cfg, router, max_batch=4)
    assert [r.token_ids for r in got] == alone(engine, reqs)
    for policy, g in ((pa, "a"), (pb, "b")):
        assert policy.seen and policy.asked == len(policy.seen)  # skip_set / observe stay paired
        assert all(set(b) <= budgets[g] for _, b in policy.seen)  # only its own rows
        assert sum(n for n, _ in policy.seen) > 0
    drafted = {g: sum(r.stats.drafted for r, q in zip(got, reqs) if q.group == g) for g in "ab"}
    assert drafted["a"] > 0 and drafted["b"] > 0
    assert {frozenset(r.stats.skip_set) for r, q in zip(got, reqs) if q.group == "b" and r.stats.drafted} == {frozenset([2])}


def test_one_group_is_exactly_its_drafter(model):
    engine = Engine(model)
    reqs = [Request(r.token_ids, r.max_new_tokens, group="only") for r in mixed_requests(seed=2, n=5)]
    cfg = GenerationConfig(max_new_tokens=99, stop_token_ids=())
    direct = engine.generate(reqs, cfg, LayerSkipDrafter(model, FixedSkip([1, 3]), 0.0, 3), max_batch=3)
    routed = engine.generate(reqs, cfg, GroupRouter({"only": LayerSkipDrafter(model, FixedSkip([1, 3]), 0.0, 3)}),
                             max_batch=3)
    assert [r.token_ids for r in routed] == [r.token_ids for r in direct]
    assert [r.stats.accept_hist for r in routed] == [r.stats.accept_hist for r in direct]


def test_a_row_of_an_unknown_group_is_an_error(model):
    router = GroupRouter({"a": NoDrafter()})
    with pytest.raises(ValueError, match=r"no drafter for group\(s\) \['z'\]"):
        Engine(model).generate([Request([1, 2], 3, group="z")], GenerationConfig(), router)
    with pytest.raises(ValueError, match="at least one group"):
        GroupRouter({})
