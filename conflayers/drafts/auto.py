"""``drafter: auto``: each step, choose the drafter and draft length that maximise committed tokens/s.

A verify pass over ``q`` new tokens per row costs ``S(w, q)`` seconds at batch width ``w`` (the
measured ``costs.CostSurface``); a layer-skip draft pass running ``m`` of ``L`` layers costs
``D(w, m)``. A row whose drafts are accepted token by token with probability ``α`` commits
``E(α, k) = (1 - α^(k+1)) / (1 - α)`` tokens for a draft of ``k`` (ALGORITHM.md §9). Each step the
controller predicts the batch's tokens/s for

- ``none``: plain decoding, ``w / S(w, 1)``;
- ``ngram``: every row's prompt-lookup draft (``ngram.NgramDrafter``, no model cost), cut to a
  common verify width ``Q``: ``Σ_b E(α_b, min(len_b, Q - 1)) / S(w, Q)`` for each ``Q``; rows with
  longer drafts are cut to ``Q - 1`` and the best ``Q`` wins, so a row whose draft would widen the
  verify without paying for it is cut. With a ``corpus.CorpusDrafter`` each row's draft is the
  longer of its n-gram draft and its dataset's corpus draft (``corpus`` in the decisions when any
  row's is), each with its own acceptance estimate;
- ``layerskip`` for one group's rows (the group's ``LayerSkipDrafter``, its searcher's skip set),
  draft length ``γ``: ``(Σ_{b in group} E(α_g, γ) + rows outside) / (γ D(w, m) + S(w, γ + 1))``;

and runs the best one if it beats plain decoding by ``margin``, else plain decoding.

Acceptance is estimated online, as a per-token Bernoulli rate: each verified draft of length ``l``
with ``a`` accepted tokens counts ``a`` successes and one failure if ``a < l`` (a layer-skip draft
pass that proposed nothing, its first token below the stop threshold, counts one failure); older
steps weigh less (a row copies its input in one stretch and not in the next). n-gram: per row, shrunk toward
its group's pooled rate (a per-dataset prior). Corpus: per group and match length (<= 2, 3-5,
6-11, >= 12 tokens matched; priors 0.3 to 0.85): copies from other rows are bimodal, a long match
runs long, a short one fails at once, so the match length is what predicts a draft. Layer skip: per group, decayed so it
follows the searcher's changing sets, starting from an optimistic prior so a set gets tried.
Measured verify times refine the surface (``CostSurface.observe``).

ConfLayers stays the layer-skip set finder, but its searcher only gets steps when the surface says
a layer-skip draft could gain ``search_gain`` (15%: the searcher may spend up to 10% exploring,
and real acceptance is below the optimistic one) at the current width even with optimistic
acceptance (``optimistic_alpha``, half the layers skipped) over the best this step can do
without it: plain decoding, or the rows' n-gram drafts where they are predicted to pay (where
outputs copy the input, a search would only cost). Where it cannot gain over plain decoding it
does not run at all, and ``state()`` says so (on the 2-core CPU: from width 2 on).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from ..costs.surface import CostSurface, expected_tokens
from .ngram import NgramDrafter, proposal_from
from .seam import DraftContext, Drafter, Proposal, StepOutcome

DRAFTERS = ("auto", "ngram", "corpus", "layerskip", "none")
MATCH_BUCKETS = (2, 5, 11)  # corpus match lengths <= 2, 3-5, 6-11, >= 12 tokens: one acceptance rate each
MATCH_PRIORS = (0.3, 0.5, 0.7, 0.85)  # longer matches copy longer (copies run long or fail at once)


def match_bucket(match: int) -> int:
    return sum(match > b for b in MATCH_BUCKETS)


class _Rate:
    """A decayed Bernoulli rate with a prior: (successes + prior * strength) / (trials + strength)."""

    def __init__(self, prior: float, strength: float, decay: float = 1.0):
        self.prior, self.strength, self.decay = prior, strength, decay
        self.s = self.n = 0.0

    def add(self, successes: float, failures: float) -> None:
        self.s = self.s * self.decay + successes
        self.n = self.n * self.decay + successes + failures

    def forget(self, factor: float) -> None:
        """Age the evidence without adding any: the rate drifts back toward its prior."""
        self.s *= factor
        self.n *= factor

    def value(self, prior: float | None = None) -> float:
        p = self.prior if prior is None else prior
        return (self.s + p * self.strength) / (self.n + self.strength)


class AutoDrafter:
    name = "auto"

    def __init__(
        self,
        surface: CostSurface,
        ngram: NgramDrafter | None = None,
        layer_skip: dict[str, Drafter] | Drafter | None = None,
        margin: float = 1.02,
        ngram_prior: float = 0.5,
        optimistic_alpha: float = 0.9,
        assumed_skip_ratio: float = 0.5,
        max_draft_len: int = 8,
        search_gain: float = 1.15,
        corpus=None,
    ):
        if margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {margin}")
        if not 0.0 < optimistic_alpha < 1.0:
            raise ValueError(f"optimistic_alpha must be in (0, 1), got {optimistic_alpha}")
        self.surface = surface
        self.ngram = ngram
        self.layer_skip = layer_skip if isinstance(layer_skip, dict) or layer_skip is None else {"": layer_skip}
        self.margin = margin
        self.ngram_prior = ngram_prior
        self.optimistic_alpha = optimistic_alpha
        self.assumed_skip_ratio = assumed_skip_ratio
        self.max_draft_len = max_draft_len
        self.search_gain = search_gain
        self.corpus = corpus  # a conflayers.drafts.corpus.CorpusDrafter: per row the longer of n-gram and corpus drafts
        if corpus is not None:
            self.ngram = corpus.ngram
        self._cp_groups: dict[tuple[str, int], _Rate] = {}
        self._stop_ids: frozenset[int] = frozenset()
        self.ls_forget = 0.995  # per step a group's layer-skip evidence is not renewed (half-life ~140 steps)
        self._ng_rows: dict[int, _Rate] = {}
        self._ng_groups: dict[str, _Rate] = {}
        self._ls_groups: dict[str, _Rate] = {}
        self._skip_size: dict[str, int] = {}
        self._gate: dict[int, tuple[bool, float]] = {}
        self._last: dict | None = None
        self.decisions: Counter = Counter()
        self.last_decision: dict = {}

    # -- the model of a step ------------------------------------------------------------------
    def layer_skip_can_pay(self, w: int) -> tuple[bool, float]:
        """Whether a layer-skip draft could beat plain decoding at width ``w`` by ``search_gain`` with
        optimistic acceptance (a search costs time, and real acceptance is lower), and the best
        predicted speedup (cached per width)."""
        if w not in self._gate:
            s = self.surface
            m = round(s.n_layers * (1 - self.assumed_skip_ratio))
            best = max(expected_tokens(self.optimistic_alpha, g) / (g * s.draft_seconds(w, m) + s.seconds(w, g + 1))
                       for g in range(1, self.max_draft_len + 1)) * s.seconds(w, 1)
            self._gate[w] = (best >= self.search_gain, best)
        return self._gate[w]

    # acceptance estimates: a row's n-gram rate is shrunk toward its group's; layer skip is per group
    def _ng_group(self, group: str) -> _Rate:
        return self._ng_groups.setdefault(group, _Rate(self.ngram_prior, 2.0, decay=0.98))

    def _ng_row(self, hist: list[int]) -> _Rate:
        return self._ng_rows.setdefault(id(hist), _Rate(0.0, 4.0, decay=0.9))

    def _ls_group(self, group: str) -> _Rate:
        return self._ls_groups.setdefault(group, _Rate(self.optimistic_alpha, 4.0, decay=0.97))

    def _ngram_alpha(self, hist: list[int], group: str) -> float:
        return self._ng_row(hist).value(prior=self._ng_group(group).value())

    def _cp_rate(self, group: str, match: int) -> _Rate:
        b = match_bucket(match)
        return self._cp_groups.setdefault((group, b), _Rate(MATCH_PRIORS[b], 2.0, decay=0.98))

    def _copy_drafts(self, ctx: DraftContext, groups: list[str], limits: list[int]):
        """Per row: (draft, source, corpus match length, estimated per-token acceptance)."""
        if self.corpus is None:
            drafts = self.ngram.candidates(ctx.histories, limits)
            return [(d, "ngram", 0, self._ngram_alpha(h, g)) for d, h, g in zip(drafts, ctx.histories, groups)]
        items = self.corpus.drafts(ctx.histories, limits, groups)
        return [(d, src, m, self._cp_rate(g, m).value() if src == "corpus" else self._ngram_alpha(h, g))
                for (d, src, m), h, g in zip(items, ctx.histories, groups)]

    def plan(self, ctx: DraftContext) -> dict:
        """The step's decision: {"drafter", "k", "rate", "plain_rate", "speedup", ...}."""
        s = self.surface
        w = len(ctx.histories)
        groups = ctx.groups if len(ctx.groups) == w else [""] * w
        limits = ctx.max_draft.clamp(min=0).tolist()
        plain = s.plain_rate(w)
        best = {"drafter": "none", "k": 0, "rate": plain}
        if self.ngram is not None and max(limits, default=0) > 0:
            items = self._copy_drafts(ctx, groups, limits)
            drafts = [d for d, _, _, _ in items]
            for q in range(2, max(map(len, drafts)) + 2):
                tokens = sum(expected_tokens(a, min(len(d), q - 1)) for d, _, _, a in items)
                rate = tokens / s.seconds(w, q)
                if rate > best["rate"]:
                    best = {"drafter": "ngram", "k": q - 1, "rate": rate, "drafts": drafts,
                            "sources": [src for _, src, _, _ in items], "matches": [m for _, _, m, _ in items]}
        fallback = best if best["rate"] >= plain * self.margin else {"drafter": "none", "k": 0, "rate": plain}
        can_pay, optimistic = self.layer_skip_can_pay(w) if self.layer_skip else (False, 0.0)
        # the search runs only where even an optimistic layer-skip draft would beat what this step
        # can do without it (plain decoding, or the rows' n-gram drafts) by search_gain
        if can_pay and optimistic * plain >= self.search_gain * fallback["rate"]:
            for group in sorted(set(groups) & set(self.layer_skip)):
                rows = [b for b, g in enumerate(groups) if g == group and limits[b] > 0]
                if not rows:
                    continue
                alpha = self._ls_group(group).value()
                m = s.n_layers - self._skip_size.get(group, round(s.n_layers * self.assumed_skip_ratio))
                for gamma in range(1, self.max_draft_len + 1):
                    tokens = w - len(rows) + sum(expected_tokens(alpha, min(gamma, limits[b])) for b in rows)
                    rate = tokens / (gamma * s.draft_seconds(w, m) + s.seconds(w, gamma + 1))
                    if rate > best["rate"]:
                        best = {"drafter": "layerskip", "k": gamma, "rate": rate, "group": group, "rows": rows,
                                "fallback": fallback}
        if best["rate"] < plain * self.margin:
            best = {"drafter": "none", "k": 0, "rate": plain}
        best.update(plain_rate=plain, speedup=best["rate"] / plain, width=w)
        return best

    # -- the drafter seam ----------------------------------------------------------------------
    def propose(self, ctx: DraftContext) -> Proposal:
        d = self.plan(ctx)
        w = len(ctx.histories)
        device = ctx.last_tokens.device
        self._stop_ids = ctx.stop_ids
        if d["drafter"] == "ngram":
            prop = self._copy_proposal(d, device)
            if "corpus" in prop.sources:
                d = {**d, "drafter": "corpus"}
        elif d["drafter"] == "layerskip":
            mine = torch.zeros(w, dtype=torch.bool, device=device)
            mine[d["rows"]] = True
            limit = ctx.max_draft.clamp(max=d["k"]).masked_fill(~mine, 0)
            prop = self.layer_skip[d["group"]].propose(dataclasses.replace(ctx, max_draft=limit))
            if prop.skip:
                self._skip_size[d["group"]] = len(prop.skip)
            if prop.passes == 0 and d["fallback"]["drafter"] == "ngram":
                # the searcher chose plain decoding for this step (its own measurement of plain speed);
                # the n-gram drafts still ride along, and the searcher still observes the step
                prop = self._copy_proposal(d["fallback"], device)
                d = {**d, "drafter": "ngram", "k": d["fallback"]["k"], "searcher_step": True,
                     "sources": d["fallback"]["sources"], "matches": d["fallback"]["matches"]}
        else:
            prop = Proposal.empty(w, device)
        self.decisions[d["drafter"]] += 1
        self.last_decision = {k: v for k, v in d.items() if k not in ("drafts", "rows", "fallback", "sources", "matches")}
        for group, rate in self._ls_groups.items():  # not handed this step: old evidence slowly wears off,
            if d.get("group") != group:           # so a set the searcher finds later is tried again now and then
                rate.forget(self.ls_forget)
        self._last = {"decision": d, "groups": ctx.groups if len(ctx.groups) == w else [""] * w,
                      "q": prop.tokens.shape[1] + 1, "passes": prop.passes}
        live = {id(h) for h in ctx.histories}
        for k in [k for k in self._ng_rows if k not in live]:
            del self._ng_rows[k]
        return prop

    def _copy_proposal(self, d: dict, device) -> Proposal:
        """A copy decision's drafts (n-gram or corpus per row), cut to its length ``k``."""
        drafts = [dr[: d["k"]] for dr in d["drafts"]]
        sources = [src if dr else "none" for dr, src in zip(drafts, d["sources"])]
        return proposal_from(drafts, device, "corpus" if "corpus" in sources else "ngram", sources)

    def observe(self, outcome: StepOutcome) -> None:
        last, self._last = self._last, None
        if last is None:
            return
        if self.corpus is not None and self.corpus.learn_finished:
            self.corpus.learn_finished_rows(outcome, last["groups"], self._stop_ids)
        d = last["decision"]
        w = len(outcome.lens)
        self.surface.observe(w, last["q"], outcome.verify_seconds)
        lens, acc = outcome.lens.tolist(), outcome.accepted.tolist()
        if d.get("searcher_step"):  # the searcher asked for this step: it sees it (as a plain step of its own)
            self.layer_skip[d["group"]].observe(outcome.restrict(d["rows"]))
        if d["drafter"] in ("ngram", "corpus"):
            for b, (l, a) in enumerate(zip(lens, acc)):
                if l:
                    fail = float(a < l)
                    if d["sources"][b] == "corpus":
                        self._cp_rate(last["groups"][b], d["matches"][b]).add(a, fail)
                    else:
                        self._ng_row(outcome.histories[b]).add(a, fail)
                        self._ng_group(last["groups"][b]).add(a, fail)
        elif d["drafter"] == "layerskip":
            group, rows = d["group"], d["rows"]
            rate = self._ls_group(group)
            for b in rows:
                if lens[b]:
                    rate.add(acc[b], float(acc[b] < lens[b]))
                elif last["passes"]:  # a draft pass ran and proposed nothing (below the stop threshold)
                    rate.add(0.0, 1.0)
            self.layer_skip[group].observe(outcome.restrict(rows))

    def state(self) -> dict:
        """What the controller decided and why (for logs and the job's metrics)."""
        gate = {w: {"can_pay": ok, "optimistic_speedup": round(best, 3)} for w, (ok, best) in sorted(self._gate.items())}
        off = [w for w, (ok, _) in self._gate.items() if not ok]
        out = {
            "decisions": dict(self.decisions),
            "ngram_acceptance": {g: round(r.value(), 3) for g, r in self._ng_groups.items()},
            "layerskip_acceptance": {g: round(r.value(), 3) for g, r in self._ls_groups.items()},
            "corpus_acceptance": {f"{g}|match>{([0] + list(MATCH_BUCKETS))[b]}": round(r.value(), 3)
                                  for (g, b), r in sorted(self._cp_groups.items())},
            "layerskip_gate": gate,
            "surface_observations": self.surface.observations,
            "last": self.last_decision,
        }
        searchers = {g: d.policy.state() for g, d in (self.layer_skip or {}).items()
                     if hasattr(getattr(d, "policy", None), "state")}
        if searchers:
            out["searchers"] = searchers
        if self.layer_skip and off:
            out["layerskip"] = (f"off at width {', '.join(map(str, sorted(off)))}: even with acceptance "
                                f"{self.optimistic_alpha} a layer-skip draft would gain less than "
                                f"{self.search_gain - 1:.0%} over plain decoding there (the skip-set search does not run)")
        return out


def surface_grid(width: int, max_draft_len: int, widest: int = 32) -> tuple[list[int], list[int]]:
    """The (widths, qs) a controller running at ``width`` with drafts of up to ``max_draft_len`` needs.
    Past ``widest`` the surface scales the widest measured width (the cost ratios are what decide)."""
    width = min(width, widest)
    widths = sorted({w for w in (2**i for i in range(width.bit_length())) if w <= width} | {width})
    qs = sorted({1, 2, 3, 5, max_draft_len + 1} & set(range(1, max_draft_len + 2)))
    return widths, qs


def build_drafter(kind: str, model, layer_skip: dict[str, Drafter] | Drafter | None = None,
                  surface: CostSurface | None = None, max_draft_len: int = 8, ngram_max: int = 3,
                  ngram_min: int = 1, corpus=None) -> Drafter:
    """The drafter for ``drafter: auto | ngram | corpus | layerskip | none``. ``layer_skip``: the
    layer-skip drafter(s) (per group) that ``layerskip`` runs and ``auto`` may choose; ``auto`` needs
    ``surface``. ``corpus``: a ``CorpusDrafter`` (its own n-gram lookup is replaced by one with
    ``ngram_max``/``ngram_min``/``max_draft_len``) that ``corpus`` runs and ``auto`` may choose
    from; ``corpus`` without one gets a fresh drafter with empty indexes."""
    from .corpus import CorpusDrafter
    from .router import GroupRouter
    from .seam import NoDrafter

    if kind not in DRAFTERS:
        raise ValueError(f"drafter must be one of {DRAFTERS}, got {kind!r}")
    if kind == "none":
        return NoDrafter()
    ngram = NgramDrafter(ngram_max, ngram_min, max_draft_len)
    if kind == "corpus" and corpus is None:
        corpus = CorpusDrafter(max_tokens=max_draft_len)
    if corpus is not None:
        corpus.ngram, corpus.max_tokens = ngram, max_draft_len
    if kind == "ngram":
        return ngram
    if kind == "corpus":
        return corpus
    if kind == "layerskip":
        if not layer_skip:
            raise ValueError("drafter layerskip needs a skip-set policy (a searcher or a fixed set)")
        return GroupRouter(layer_skip) if isinstance(layer_skip, dict) else layer_skip
    if surface is None:
        raise ValueError("drafter auto needs a cost surface (conflayers.costs.calibrate.load_or_calibrate)")
    return AutoDrafter(surface, ngram, layer_skip, max_draft_len=max_draft_len, corpus=corpus)
