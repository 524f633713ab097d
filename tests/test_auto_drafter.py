"""The n-gram drafter, the cost surface and the per-step controller (``drafter: auto``)."""

import json
import random
from pathlib import Path

import pytest
import torch

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter, Proposal, Request
from conflayers.costs.calibrate import calibrate, load_or_calibrate
from conflayers.costs.surface import CostSurface, expected_tokens
from conflayers.drafts.auto import AutoDrafter
from conflayers.drafts.ngram import NgramDrafter
from conflayers.drafts.seam import DraftContext, StepOutcome

from .conftest import tiny_model
from .test_continuous import alone

CPU_COSTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "kernels" / "forward_costs.json"


def brute_force(hist, max_n, min_n, limit):
    """The tokens after the latest earlier occurrence of the longest matching suffix n-gram."""
    for n in range(min(max_n, len(hist) - 1), min_n - 1, -1):
        suffix = hist[-n:]
        for p in range(len(hist) - 1, n - 1, -1):  # n-gram hist[p-n:p] with a token after it
            if hist[p - n : p] == suffix:
                return hist[p : p + limit]
    return []


def test_ngram_lookup_matches_a_brute_force_search_as_histories_grow():
    rng = random.Random(0)
    d = NgramDrafter(max_ngram=3, min_ngram=1, max_tokens=5)
    hists = [[rng.randrange(6) for _ in range(rng.randint(1, 5))] for _ in range(4)]
    found = 0
    for _ in range(40):
        limits = [rng.randint(0, 6) for _ in hists]
        got = d.candidates(hists, limits)
        want = [brute_force(h, 3, 1, min(lim, 5)) if lim > 0 else [] for h, lim in zip(hists, limits)]
        assert got == want
        found += sum(map(bool, got))
        for h in hists:  # the engine extends each row's history in place
            h += [rng.randrange(6) for _ in range(rng.randint(1, 3))]
    assert found > 20
    hists[0] = [1, 2, 3, 9, 1, 2]  # a new row in the same place: its own index, not the old one's
    assert d.candidates(hists[:1], [4]) == [[3, 9, 1, 2]]
    assert len(d._rows) == 1  # finished rows' indexes are dropped
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)


def gpu_like(layers: int, widths=(1, 2, 4, 8, 16)) -> CostSurface:
    """Verify of q <= 9 tokens costs at most 1.1x a step; a draft pass costs its share of the layers."""
    return CostSurface({w: {q: 0.01 * (1 + 0.1 * (q - 1) / 8) for q in (1, 2, 5, 9)} for w in widths}, layers,
                       {w: 0.0 for w in widths})


def cpu_surface(layers: int = 30) -> CostSurface:
    data = json.loads(CPU_COSTS.read_text())
    return CostSurface(data["seconds"]["onednn"], layers)  # fixed share: the default (LM head ~20%)


def repetitive_requests(seed=0, n=9):
    """Prompts that repeat themselves (so prompt lookup finds drafts), mixed lengths and budgets."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        unit = [rng.randrange(1, 97) for _ in range(rng.randint(2, 12))]
        reqs.append(Request(unit * rng.randint(1, 3), rng.randint(1, 20)))
    return reqs


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("width", [1, 3, 8])
@pytest.mark.parametrize("which", ["ngram", "auto-gpu", "auto-cpu"])
def test_greedy_output_equals_plain_for_ngram_and_auto(model, which, width):
    engine = Engine(model)
    reqs = repetitive_requests(seed=width)
    random.Random(width).shuffle(reqs)
    if which == "ngram":
        drafter = NgramDrafter()
    else:
        surface = gpu_like(6) if which == "auto-gpu" else cpu_surface(6)
        drafter = AutoDrafter(surface, NgramDrafter(), LayerSkipDrafter(model, FixedSkip([1, 3]), 0.0, 8))
    got = engine.generate(reqs, GenerationConfig(max_new_tokens=99, stop_token_ids=()), drafter, max_batch=width)
    assert [r.token_ids for r in got] == alone(engine, reqs)
    for r in got:
        assert sum(r.stats.drafter_steps.values()) == r.stats.steps
        assert set(r.stats.drafter_steps) <= {"none", "ngram", "layerskip"}
    drafted = sum(r.stats.drafted for r in got)
    if which != "auto-cpu":
        assert drafted > 0 and sum(r.stats.accepted for r in got) > 0
    if which == "auto-gpu":
        assert drafter.decisions["ngram"] + drafter.decisions["layerskip"] > 0


# -- the cost surface ---------------------------------------------------------------------------
def test_surface_interpolates_extrapolates_and_refines():
    s = CostSurface({1: {1: 1.0, 3: 2.0}, 4: {1: 2.0, 3: 6.0}}, n_layers=10, fixed={1: 0.2, 4: 0.4})
    assert s.seconds(1, 1) == 1.0 and s.seconds(4, 3) == 6.0
    assert s.seconds(1, 2) == pytest.approx(1.5)  # linear in q
    assert s.seconds(1, 5) == pytest.approx(3.0)  # extrapolated along the last segment
    assert s.seconds(2, 1) == pytest.approx(1.5)  # halfway in log2 w
    assert s.seconds(8, 1) == pytest.approx(4.0)  # wider than measured: scales with the rows
    assert s.draft_seconds(1, 5) == pytest.approx(1.0 * (0.2 + 0.8 * 0.5))
    assert s.draft_seconds(4, 10) == pytest.approx(2.0)
    for _ in range(60):  # the device turns out twice as slow at width 4: the surface follows
        s.observe(4, 3, 12.0)
    assert s.seconds(4, 3) == pytest.approx(12.0, rel=0.02)
    assert s.seconds(4, 1) == pytest.approx(4.0, rel=0.02)  # cells not observed yet follow their width
    assert s.seconds(1, 1) == 1.0  # other widths keep their own correction
    for _ in range(60):  # ... until observed: then each cell has its own (a q=1 step is as calibrated)
        s.observe(4, 1, 2.0)
    assert s.seconds(4, 1) == pytest.approx(2.0, rel=0.02) and s.seconds(4, 3) == pytest.approx(12.0, rel=0.02)
    again = CostSurface.from_dict(json.loads(json.dumps(s.as_dict())))
    assert again.table == s.table and again.fixed == s.fixed
    with pytest.raises(ValueError, match="q=1"):
        CostSurface({1: {2: 1.0}}, n_layers=4)
    with pytest.raises(ValueError, match="bad cells"):
        CostSurface({1: {1: 0.0}}, n_layers=4)


def test_calibration_measures_and_is_cached(tmp_path):
    engine = Engine(tiny_model("llama", dtype=torch.float32))
    s = calibrate(engine, widths=(1, 4), qs=(1, 3), context=32, reps=1)
    assert set(s.table) == {1, 4} and all(set(r) == {1, 3} and min(r.values()) > 0 for r in s.table.values())
    assert all(0.0 <= f <= 1.0 for f in s.fixed.values()) and s.n_layers == 6
    cache = tmp_path / "costs.json"
    first, cached = load_or_calibrate(engine, (1, 2), (1, 2), 32, cache)
    assert not cached and cache.exists()
    second, cached = load_or_calibrate(engine, (1, 2), (1, 2), 32, cache)
    assert cached and second.table == first.table
    _, cached = load_or_calibrate(engine, (1, 2, 8), (1, 2), 32, cache)  # a width it lacks: measured anew
    assert not cached


def test_verify_passes_dearer_than_calibrated_make_unobserved_verify_cells_dearer_too():
    s = CostSurface({1: {1: 1.0, 3: 2.0, 5: 3.0}, 4: {1: 2.0, 3: 6.0, 5: 8.0}}, n_layers=10)
    for _ in range(60):  # plain steps at width 4 as calibrated, its 3-token verifies twice as dear (a long context)
        s.observe(4, 1, 2.0)
        s.observe(4, 3, 12.0)
    assert s.seconds(4, 1) == pytest.approx(2.0, rel=0.05) and s.seconds(4, 3) == pytest.approx(12.0, rel=0.05)
    assert s.seconds(4, 5) == pytest.approx(16.0, rel=0.1)  # not observed: the width's verify factor
    assert s.seconds(1, 1) == 1.0 and s.seconds(1, 3) == pytest.approx(4.0, rel=0.1)  # other widths: the pooled one


# -- the controller against a scripted environment -----------------------------------------------
class ScriptedLayerSkip:
    """The environment of a simulation: a layer-skip drafter whose drafts are accepted token by token
    with probability ``alpha`` (drawn by ``simulate``), skipping half of ``layers``."""

    name = "layerskip"

    def __init__(self, layers: int):
        self.skip = frozenset(range(1, layers, 2))
        self.observed = 0

    def propose(self, ctx):
        lens = ctx.max_draft.clamp(min=0)
        k = int(lens.max())
        return Proposal(torch.zeros(len(lens), k, dtype=torch.long), lens, skip=self.skip, passes=k, drafter=self.name)

    def observe(self, outcome):
        self.observed += 1


def simulate(controller, width, alpha, steps=300, seed=0):
    """Run the controller's propose/observe loop with rows that never match an n-gram and drafts
    accepted with probability ``alpha`` per token; returns the decisions of the last 50 steps."""
    rng = random.Random(seed)
    hists = [list(range(b * 1000, b * 1000 + 50)) for b in range(width)]  # no repeats: no n-gram drafts
    tail = []
    for step in range(steps):
        ctx = DraftContext(None, torch.zeros(width, dtype=torch.long), hists, torch.full((width,), 50), None, None,
                           frozenset(), [""] * width)
        prop = controller.propose(ctx)
        acc = []
        for l in prop.lens.tolist():
            a = 0
            while a < l and rng.random() < alpha:
                a += 1
            acc.append(a)
        controller.observe(StepOutcome(prop.lens, torch.tensor(acc), [a + 1 for a in acc], prop.skip, 0.0, 0.0,
                                       hists, [0] * width, [99] * width))
        if step >= steps - 50:
            tail.append(dict(controller.last_decision))
    return tail


def section9(alpha, gamma, surface, w):
    """ALGORITHM.md §9: E[tokens] / (γ c + v), c and v relative to a plain step at width w."""
    c = surface.draft_seconds(w, surface.n_layers // 2) / surface.seconds(w, 1)
    v = surface.seconds(w, gamma + 1) / surface.seconds(w, 1)
    return expected_tokens(alpha, gamma) / (gamma * c + v)


@pytest.mark.parametrize("alpha", [0.8, 0.9])
def test_controller_on_a_gpu_like_surface_picks_the_section9_draft_length(alpha):
    surface, w = gpu_like(30), 4
    env = ScriptedLayerSkip(30)
    ctl = AutoDrafter(surface, NgramDrafter(), env)
    tail = simulate(ctl, w, alpha)
    assert all(d["drafter"] == "layerskip" for d in tail)
    best = max(range(1, 9), key=lambda g: section9(alpha, g, surface, w))
    chosen = max(set(d["k"] for d in tail), key=[d["k"] for d in tail].count)
    assert abs(chosen - best) <= 1
    predicted = sum(d["speedup"] for d in tail) / len(tail)
    assert predicted == pytest.approx(section9(alpha, best, surface, w), rel=0.05)
    assert env.observed == ctl.decisions["layerskip"]  # the searcher sees exactly the steps it drafted


class DudSearcher(ScriptedLayerSkip):
    """A searcher whose sets never reach the draft confidence: each draft pass proposes nothing."""

    def propose(self, ctx):
        w = len(ctx.histories)
        return Proposal(torch.zeros(w, 0, dtype=torch.long), torch.zeros(w, dtype=torch.long), skip=self.skip,
                        passes=1, drafter=self.name)


def test_draft_passes_that_propose_nothing_count_as_rejections_and_the_search_backs_off():
    env = DudSearcher(30)
    ctl = AutoDrafter(gpu_like(30), NgramDrafter(), env)
    simulate(ctl, 4, alpha=0.9, steps=600)
    # the optimistic prior hands it the first steps; its empty drafts then pull the estimate down,
    # and the evidence wears off slowly enough that it is only asked again now and then
    assert 3 <= env.observed <= 40, env.observed
    assert ctl.decisions["none"] >= 550


@pytest.mark.parametrize("w", [8, 32, 64])
def test_controller_on_the_measured_cpu_surface_never_runs_layer_skip_at_width(w):
    env = ScriptedLayerSkip(30)
    ctl = AutoDrafter(cpu_surface(), NgramDrafter(), env)
    tail = simulate(ctl, w, alpha=0.9, steps=60)
    assert all(d["drafter"] == "none" for d in tail)
    assert env.observed == 0 and ctl.decisions["layerskip"] == 0  # the skip-set search does not run at all
    assert f"off at width {w}" in ctl.state()["layerskip"]
    assert ctl.layer_skip_can_pay(w)[1] < ctl.search_gain  # not even the optimistic prediction gains 15%


def test_controller_drafts_ngrams_where_outputs_copy_and_goes_plain_where_they_miss():
    surface = cpu_surface()
    ctl = AutoDrafter(surface, NgramDrafter(), None)
    hist = [[5, 6, 7, 8, 9, 10, 11, 12] * 4]
    ctx = DraftContext(None, torch.zeros(1, dtype=torch.long), hist, torch.full((1,), 20), None, None, frozenset(), [""])
    for _ in range(10):  # every draft accepted in full
        prop = ctl.propose(ctx)
        assert prop.drafter == "ngram" and int(prop.lens[0]) > 0
        n = int(prop.lens[0])
        ctl.observe(StepOutcome(prop.lens, prop.lens.clone(), [n + 1], frozenset(), 0.0, 0.0, hist, [0], [99]))
    assert ctl.last_decision["speedup"] > 1.5
    speedups = []
    for _ in range(100):  # now every draft is rejected at once: the row's estimate falls, drafting stops
        prop = ctl.propose(ctx)
        speedups.append(ctl.last_decision["speedup"])
        ctl.observe(StepOutcome(prop.lens, torch.zeros(1, dtype=torch.long), [1], frozenset(), 0.0, 0.0, hist, [0],
                                [99]))
    assert ctl.last_decision["drafter"] == "none" and speedups[0] > speedups[10] > speedups[-1] == 1.0
