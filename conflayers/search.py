"""Skip-set policies: what ``LayerSkipDrafter`` asks for a skip set at every step.

A policy has two methods: ``skip_set()`` (a frozenset of layers, or ``None`` = decode plainly
this step) and ``observe(outcome)`` (what the verify step made of it). One policy object serves
a whole dataset stream: its state carries across prompts and batches.

- ``ConfLayersSearch``: the iterative confidence-guided search (ALGORITHM.md §6), with two
  objectives: ``acceptance`` (the paper's: mean accepted tokens) and ``throughput`` (default:
  committed tokens per second of decode time, compared against plain decoding measured in the
  same process; a set that does not beat plain decoding is never installed).
- ``SwiftSearch``: SWIFT's random proposals at a fixed skip ratio plus periodic Bayesian
  optimisation, scored by teacher-forced greedy agreement with the full model.
- ``PlainPolicy`` (``none``), ``FixedSkip`` (``static``), ``CachedSkip`` (``cached``).

``make_policy(name, model, **knobs)`` builds any of them.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .confidence import SkipRule, layer_confidences, skip_rule, update_lambda
from .drafters import FixedSkip, StepOutcome
from .layers import num_layers, skip_layers, validate_skip_set

log = logging.getLogger(__name__)

OBJECTIVES = ("throughput", "acceptance")
SEARCHERS = ("conflayers", "static", "swift", "none", "cached")


def recent_context(history: list[int], generated: int | None, window: int) -> list[int]:
    """The prompt plus the row's last ``window`` generated tokens (the confidence pass's input)."""
    if generated is None:
        return list(history)
    prompt = len(history) - generated
    return list(history[:prompt]) + list(history[prompt:][-window:])


def _longest_row(outcome: StepOutcome) -> int:
    gen = outcome.generated or [len(h) for h in outcome.histories]
    return int(np.argmax(gen))


def every_other_layer(n_layers: int) -> frozenset[int]:
    """Layers 1, 3, 5, … among the intermediate layers 1 … L-2."""
    return frozenset(range(1, n_layers - 1, 2))


class PlainPolicy:
    """``none``: never skips anything; every step is plain decoding."""

    name = "none"

    def skip_set(self):
        return None

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def state(self) -> dict:
        return {"searcher": self.name, "phase": "plain", "skip_set": None}


class StaticSkip(FixedSkip):
    """``static``: one fixed set (an empty set means plain decoding)."""

    name = "static"

    def skip_set(self):
        return self.layers or None

    def state(self) -> dict:
        return {"searcher": self.name, "phase": "installed" if self.layers else "plain", "skip_set": sorted(self.layers)}


# ---------------------------------------------------------------------------------------------
# ConfLayers
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchConfig:
    """Every knob of the search; defaults are the reference's published runs (§6)."""

    objective: str = "throughput"
    rho: float = 0.4  # minimum skip ratio (the λ controller's lower edge)
    interval: int = 30  # records per evaluation
    max_iter: int = 100  # proposals before the best set is installed
    max_score: float = 0.95  # acceptance rate a "good" set must exceed
    good_accept: float = 4.0  # mean accepted drafts a "good" set must exceed
    window: int = 100  # W: generated tokens per confidence pass / before records start
    min_window: int = 8  # W is scaled down for short outputs, never below this
    window_fraction: float = 0.25  # effective W = min(window, max(min_window, budget * fraction))
    lambda_step: float = 0.05
    alpha_cap: int | None = None  # cap on α (the reference uses L // 3 for Qwen)
    # throughput objective only
    plain_every: int = 6  # while searching, every n-th step decodes plainly to measure plain tokens/s
    plain_history: int = 64  # plain steps kept for the plain tokens/s estimate
    min_gain: float = 0.02  # a set must beat plain tokens/s by this fraction
    rho_decay: float = 0.75  # after a set loses to plain, the effective ρ shrinks by this factor
    recheck_every: int = 1000  # once settled, steps between re-checks of the alternative
    probe_steps: int = 16  # steps a re-check runs
    explore_budget: float = 0.1  # the search may lose at most this fraction of the stream's time to plain decoding

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {self.rho!r}")
        positive = ("interval", "max_iter", "window", "min_window", "plain_every", "plain_history", "probe_steps",
                    "recheck_every")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 < self.window_fraction <= 1.0:
            raise ValueError(f"window_fraction must be in (0, 1], got {self.window_fraction!r}")
        if not 0.0 < self.explore_budget <= 1.0:
            raise ValueError(f"explore_budget must be in (0, 1], got {self.explore_budget!r}")

    def effective_window(self, budget: int | None) -> int:
        """W for a row with this token budget: short answers get a short window."""
        if budget is None:
            return self.window
        return min(self.window, max(self.min_window, int(budget * self.window_fraction)))


@dataclass
class Measurement:
    """What one evaluated set achieved."""

    layers: list[int]
    score: float  # the objective's score: mean accepted drafts, or committed tokens/s
    mean_accepted: float
    acceptance: float | None  # Σa / Σd
    tau: float  # mean tokens committed per step, a + 1
    tokens_per_s: float | None


class ConfLayersSearch:
    """The ConfLayers search loop (ALGORITHM.md §6) as a skip-set policy.

    Phases: ``search`` (proposing and evaluating sets), then ``installed`` (a set is used) or
    ``plain`` (nothing beat plain decoding, or the reference would have installed an empty set).
    Under the throughput objective a settled policy re-checks the alternative every
    ``recheck_every`` steps for ``probe_steps`` steps and switches if it wins (settled on plain
    with no candidate at all, it searches ``max_iter // 10`` more proposals instead).

    The throughput objective also bounds what searching costs, cumulatively over the stream: its
    regret is the time spent in confidence passes and drafting with candidate sets, minus the time
    plain decoding takes for the same tokens at the same batch width, charged step by step. While
    the regret exceeds ``explore_budget`` of all the time the stream has run (settled phases
    included), the search pauses and decodes plainly, so on a model where no set wins the stream
    as a whole runs at about ``1 - explore_budget`` of plain speed or better, and sets that win earn
    credit. ``explore_budget=1.0`` turns the bound off.

    ``confidence_fn(token_ids, window) -> c [L-2]`` replaces the model's confidence pass (tests).
    """

    name = "conflayers"

    def __init__(self, model=None, *, n_layers: int | None = None, confidence_fn=None, **knobs):
        if model is None and (n_layers is None or confidence_fn is None):
            raise ValueError("ConfLayersSearch needs a model, or n_layers and a confidence_fn")
        self.model = model
        self.cfg = SearchConfig(**knobs)
        self.L = n_layers if n_layers is not None else num_layers(model)
        if self.L < 3:
            raise ValueError(f"a {self.L}-layer model has no intermediate layers to skip")
        self.n_mid = self.L - 2
        self._confidence_fn = confidence_fn
        # search state (one dataset stream)
        self.S = every_other_layer(self.L)
        self.best: frozenset[int] | None = None
        self.best_measurement: Measurement | None = None
        self.lam = 0.0
        self.rho = self.cfg.rho  # effective ρ (the throughput objective shrinks it when sets lose)
        self.iterations = 0
        self.active = True
        self.phase = "search"
        self.last_rule: SkipRule | None = None
        self.history: list[Measurement] = []
        self._reset_records()
        # plain-decoding timing (throughput objective)
        self._plain = deque(maxlen=self.cfg.plain_history)  # (tokens, seconds) per plain step
        self._settled = deque(maxlen=self.cfg.plain_history)  # (tokens, seconds) per step under the installed set
        self._steps = 0
        self._probe_left = 0
        self._since_check = 0
        self._iter_limit = self.cfg.max_iter
        self._last: frozenset[int] | None = None
        # what searching has cost (throughput objective)
        self._elapsed = 0.0  # seconds of every step observed, plus confidence passes
        self._regret = 0.0  # seconds lost against plain decoding, charged step by step
        self._unpriced: list[tuple[int, int, float]] = []  # (tokens, rows, seconds) before plain was measured
        self._plain_rows: dict[int, deque] = {}  # rows in the batch -> recent plain step seconds
        self._paused = False
        self.paused_steps = 0

    # -- records ------------------------------------------------------------------------------
    def _reset_records(self) -> None:
        self.acc: list[int] = []
        self.rate: list[float] = []
        self._drafted = 0
        self._tokens = 0
        self._seconds = 0.0
        self._half_checked = False

    @property
    def throughput(self) -> bool:
        return self.cfg.objective == "throughput"

    @property
    def min_size(self) -> int:
        """Smallest set worth evaluating. The acceptance objective follows the reference
        (``floor((L-2)·ρ) + 1``); the throughput objective lets measurement judge small sets."""
        return 1 if self.throughput else math.floor(self.n_mid * self.cfg.rho) + 1

    def plain_tokens_per_s(self) -> float | None:
        secs = sum(s for _, s in self._plain)
        return sum(t for t, _ in self._plain) / secs if secs > 0 else None

    def _plain_step_seconds(self, rows: int) -> float | None:
        """Recent seconds of one plain step at this many rows (else at the nearest row count)."""
        if not self._plain_rows:
            return None
        d = self._plain_rows[min(self._plain_rows, key=lambda r: (abs(r - rows), -r))]
        return sum(d) / len(d)

    def _charge(self) -> None:
        """Regret of the steps under candidate sets: their time minus plain decoding's for the
        same tokens at the same batch width (tokens / rows plain steps), once plain is measured."""
        if self._unpriced and self._plain_rows:
            for t, r, sec in self._unpriced:
                self._regret += sec - t / r * self._plain_step_seconds(r)
            self._unpriced = []

    def regret_seconds(self) -> float:
        """Time the search has lost against plain decoding (negative: it has gained). Steps taken
        before plain decoding was ever measured count in full."""
        return self._regret + sum(sec for _, _, sec in self._unpriced)

    def _over_budget(self) -> bool:
        return self.throughput and self.regret_seconds() > self.cfg.explore_budget * self._elapsed

    def _beats_plain(self, tps: float | None) -> bool:
        plain = self.plain_tokens_per_s()
        return tps is not None and plain is not None and tps > plain * (1.0 + self.cfg.min_gain)

    # -- the policy interface -----------------------------------------------------------------
    def skip_set(self) -> frozenset[int] | None:
        self._steps += 1
        cfg = self.cfg
        self._paused = False
        if self.phase == "search":
            if self.throughput and self._steps % cfg.plain_every == 0:
                choice = None  # measure plain decoding in the same process, interleaved
            elif self._over_budget():
                choice, self._paused = None, True  # searching has cost its share: decode plainly
                self.paused_steps += 1
            else:
                choice = self.S or None
        elif self.phase == "installed":
            choice = None if self._probe_left > 0 else self.best
        else:  # plain
            choice = self.best if self._probe_left > 0 and self.best else None
        self._last = choice
        return choice

    def observe(self, outcome: StepOutcome) -> None:
        tokens = int(sum(outcome.committed))
        seconds = float(outcome.draft_seconds + outcome.verify_seconds)
        used = self._last
        rows = max(1, len(outcome.committed))
        self._elapsed += seconds
        if used is None and self.throughput:
            self._plain.append((tokens, seconds))
            self._plain_rows.setdefault(rows, deque(maxlen=self.cfg.plain_history)).append(seconds)
        if self.phase == "search" and used is not None:
            self._unpriced.append((tokens, rows, seconds))
        self._charge()
        if self._paused:
            return
        if self.phase == "search":
            self._observe_search(outcome, used, tokens, seconds)
        elif self.throughput:
            self._observe_settled(used, tokens, seconds)

    # -- search phase ---------------------------------------------------------------------------
    def _observe_search(self, outcome: StepOutcome, used, tokens: int, seconds: float) -> None:
        if len(self.S) < self.min_size:
            if not self._over_budget():  # a confidence pass is search time too
                self._propose(outcome)
            return
        if used is None or used != self.S:
            return  # a plain measurement step
        self._tokens += tokens
        self._seconds += seconds
        lens, acc = outcome.lens.tolist(), outcome.accepted.tolist()
        for b in range(len(lens)):
            generated = outcome.generated[b] if outcome.generated else None
            budget = outcome.budget[b] if outcome.budget else None
            if generated is not None and generated <= self.cfg.effective_window(budget):
                continue
            d, a = int(lens[b]), int(acc[b])
            self.acc.append(a)
            self.rate.append(a / d if d else 0.0)
            self._drafted += d
        n = len(self.acc)
        if n >= self.cfg.interval // 2 and not self._half_checked:
            self._half_checked = True
            if np.mean(self.acc) < 1:  # hopeless: drop the records and try another set
                self._shrink_rho()
                self._propose(outcome)
                return
        if n > self.cfg.interval:
            self._evaluate(outcome)

    def _measure(self) -> Measurement:
        ma = float(np.mean(self.acc))
        tps = self._tokens / self._seconds if self._seconds > 0 else None
        score = (tps if tps is not None else 0.0) if self.throughput else ma
        acceptance = sum(self.acc) / self._drafted if self._drafted else None
        return Measurement(sorted(self.S), score, ma, acceptance, ma + 1.0, tps)

    def _evaluate(self, outcome: StepOutcome) -> None:
        m = self._measure()
        self.history.append(m)
        good = m.mean_accepted > self.cfg.good_accept and float(np.mean(self.rate)) > self.cfg.max_score
        if self.throughput:
            good = good and self._beats_plain(m.tokens_per_s)
        if good:
            self.best, self.best_measurement = self.S, m
            self._settle()
            return
        if self.best_measurement is None or m.score > self.best_measurement.score:
            self.best, self.best_measurement = self.S, m
        if not self._beats_plain(m.tokens_per_s):
            self._shrink_rho()
        self._propose(outcome)

    def _shrink_rho(self) -> None:
        """Throughput objective: a set that loses makes the search aim at smaller sets (ρ never
        forces a losing set; the acceptance objective keeps the reference's fixed ρ)."""
        if self.throughput:
            self.rho = max(1.0 / self.n_mid, self.rho * self.cfg.rho_decay)

    def _confidences(self, outcome: StepOutcome | None) -> np.ndarray:
        """One confidence pass over the row that has generated the most (prompt as context)."""
        ids, w = [], self.cfg.window
        if outcome is not None and outcome.histories:
            b = _longest_row(outcome)
            w = self.cfg.effective_window(outcome.budget[b] if outcome.budget else None)
            ids = recent_context(outcome.histories[b], outcome.generated[b] if outcome.generated else None, w)
        if self._confidence_fn is not None:
            return np.asarray(self._confidence_fn(ids, w), dtype=float)
        return layer_confidences(self.model, ids, w)

    def _propose(self, outcome: StepOutcome | None) -> None:
        """Confidence pass (§3) → skip rule (§4) → λ controller (§5)."""
        t0 = time.perf_counter()
        c = self._confidences(outcome)
        spent = time.perf_counter() - t0
        self._elapsed += spent
        if self.throughput:
            self._regret += spent
        self.last_rule = skip_rule(c, self.lam, self.L, self.cfg.alpha_cap)
        self.S = self.last_rule.layers
        self.lam = update_lambda(self.lam, len(self.S) / self.n_mid, self.rho, self.cfg.lambda_step)
        self.iterations += 1
        self._reset_records()
        if self.iterations >= self._iter_limit:
            self._settle()

    def _settle(self) -> None:
        """Stop searching: install the best set, or decode plainly where nothing deserves it."""
        self.active = False
        best = self.best or frozenset()
        if self.throughput:
            ok = bool(best) and self.best_measurement is not None and self._beats_plain(self.best_measurement.tokens_per_s)
        else:
            ok = bool(best)  # the reference would install an empty S*: plain decoding instead
        self.phase = "installed" if ok else "plain"
        self._settled.clear()
        self._probe_left = 0
        self._since_check = 0
        if self.phase == "plain":
            log.warning("conflayers: no skip set earned its place after %d proposals; decoding plainly (%s)",
                        self.iterations, self.state())
        else:
            log.info("conflayers search settled: %s", self.state())

    # -- settled phase (throughput objective): rare re-checks -----------------------------------
    def _observe_settled(self, used, tokens: int, seconds: float) -> None:
        if used is not None and used == self.best:
            self._settled.append((tokens, seconds))
        if self._probe_left > 0:
            self._probe_left -= 1
            if self._probe_left == 0:
                self._decide()
            return
        self._since_check += 1
        if self._since_check < self.cfg.recheck_every:
            return
        self._since_check = 0
        if self.phase == "plain" and not self.best:
            # nothing to probe: search a little more (the last proposal was never evaluated)
            self.phase, self.active = "search", True
            self._iter_limit = self.iterations + max(1, self.cfg.max_iter // 10)
            self._reset_records()
            log.info("conflayers: re-checking with %d more proposals", self._iter_limit - self.iterations)
            return
        self._probe_left = self.cfg.probe_steps
        if self.phase == "plain":
            self._settled.clear()

    def _decide(self) -> None:
        secs = sum(s for _, s in self._settled)
        tps = sum(t for t, _ in self._settled) / secs if secs > 0 else None
        winning = self._beats_plain(tps)
        if self.phase == "installed" and not winning:
            self.phase = "plain"
            log.info("conflayers: skip set %s no longer beats plain decoding; decoding plainly", sorted(self.best))
        elif self.phase == "plain" and winning:
            self.phase = "installed"
            log.info("conflayers: skip set %s now beats plain decoding; installed", sorted(self.best))

    # -- reporting ------------------------------------------------------------------------------
    def state(self) -> dict:
        m = self.best_measurement
        plain = self.plain_tokens_per_s()
        current = self.S if self.phase == "search" else (self.best if self.phase == "installed" else None)
        return {
            "searcher": self.name,
            "objective": self.cfg.objective,
            "phase": self.phase,
            "active": self.active,
            "skip_set": sorted(current) if current else None,
            "best": sorted(self.best) if self.best else None,
            "lambda": round(self.lam, 6),
            "rho_effective": self.rho,
            "iterations": self.iterations,
            "score": m.score if m else None,
            "mean_accepted": m.mean_accepted if m else None,
            "acceptance": m.acceptance if m else None,
            "tau": m.tau if m else None,
            "tokens_per_s": m.tokens_per_s if m else None,
            "plain_tokens_per_s": plain,
            "speedup": (m.tokens_per_s / plain) if (m and m.tokens_per_s and plain) else None,
            "regret_seconds": self.regret_seconds() if self.throughput else None,
            "paused_steps": self.paused_steps,
        }


# ---------------------------------------------------------------------------------------------
# SWIFT baseline
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def match_rate(model, token_ids: list[int], n: int, skip=frozenset()) -> float:
    """SWIFT's matchness: the share of the last ``n`` tokens of ``token_ids`` that the draft
    (the model under ``skip``), teacher-forced over the tokens before them, predicts as its
    argmax. No full-model forward: the reference is the committed tokens themselves (under greedy
    decoding the full model's argmax with its whole context; under sampling, its samples). Callers
    pass a truncated window, so even an empty skip set may score below 1; every candidate is
    scored on the same window, so the comparison between them is fair."""
    if not 1 <= n < len(token_ids):
        raise ValueError(f"need 1 <= n < len(token_ids), got n={n} for {len(token_ids)} tokens")
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(token_ids[:-1])], dtype=torch.long, device=device)
    with skip_layers(model, skip):
        draft = model(input_ids=ids, use_cache=False, logits_to_keep=n).logits[0].argmax(-1)
    return float((draft == ids.new_tensor(token_ids[-n:])).double().mean())


class SwiftSearch:
    """SWIFT-style search (arXiv 2410.06916): while optimising, every ``eval_every`` steps one
    candidate set of fixed size (``skip_ratio`` of the intermediate layers) is scored by its
    match rate on the longest row's last ``context`` generated tokens (at least ``min_tokens``),
    against the current best on the same tokens; every ``bo_every``-th candidate comes from
    Bayesian optimisation (``bayes_opt``) over per-layer scores, the rest are random. After
    ``max_iter`` candidates the best set stays."""

    name = "swift"

    def __init__(self, model, *, skip_ratio: float = 0.45, context: int = 32, max_iter: int = 50, bo_every: int = 4,
                 eval_every: int = 2, min_tokens: int = 4, seed: int = 0):
        if not 0.0 < skip_ratio < 1.0:
            raise ValueError(f"skip_ratio must be in (0, 1), got {skip_ratio!r}")
        for name, v in (("context", context), ("max_iter", max_iter), ("bo_every", bo_every), ("eval_every", eval_every),
                        ("min_tokens", min_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.model = model
        self.L = num_layers(model)
        self.mid = list(range(1, self.L - 1))
        self.k = max(1, round(skip_ratio * len(self.mid)))
        self.context, self.max_iter, self.bo_every, self.eval_every = context, max_iter, bo_every, eval_every
        if min_tokens > context:
            raise ValueError(f"min_tokens ({min_tokens}) must be <= context ({context}): no window would ever be scored")
        self.min_tokens = min_tokens
        self.rng = random.Random(seed)
        self.best = self._random_set()
        self.best_score: float | None = None
        self.iterations = 0
        self.active = True
        self._steps = 0
        self._seed = seed
        self._bo = None
        self._registered: set[frozenset[int]] = set()

    def _random_set(self) -> frozenset[int]:
        return frozenset(self.rng.sample(self.mid, self.k))

    def _top_k(self, params: dict) -> frozenset[int]:
        scores = [params[f"l{i}"] for i in self.mid]
        order = np.argsort(scores)[::-1][: self.k]
        return frozenset(self.mid[j] for j in order)

    def _optimizer(self):
        if self._bo is None:
            from bayes_opt import BayesianOptimization
            from bayes_opt.acquisition import UpperConfidenceBound

            class LightUCB(UpperConfidenceBound):
                """UCB maximised over 2000 random points, without the default 10 L-BFGS-B starts
                from 10000: the candidate is the top-k of the per-layer scores, so polishing the
                maximiser buys nothing, and each start costs about half a second on two CPU cores."""

                def suggest(self, gp, target_space, n_random=2000, n_smart=0, fit_gp=True, random_state=None):
                    return super().suggest(gp, target_space, n_random=n_random, n_smart=n_smart, fit_gp=fit_gp,
                                           random_state=random_state)

            self._bo = BayesianOptimization(
                f=None, pbounds={f"l{i}": (0.0, 1.0) for i in self.mid}, acquisition_function=LightUCB(random_state=self._seed),
                random_state=self._seed, verbose=0, allow_duplicate_points=True,
            )
            # one GP hyper-parameter fit per suggestion instead of six: the default restarts cost
            # about a second per suggestion on two CPU cores, more than the scoring itself
            self._bo.set_gp_params(n_restarts_optimizer=0)
        return self._bo

    def _candidate(self) -> frozenset[int]:
        if self.iterations % self.bo_every == self.bo_every - 1 and self._bo is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._top_k(self._optimizer().suggest())
        return self._random_set()

    def _register(self, layers: frozenset[int], score: float) -> None:
        if layers in self._registered:  # bayes_opt wants each point once
            return
        self._registered.add(layers)
        params = {f"l{i}": (1.0 if i in layers else 0.0) for i in self.mid}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._optimizer().register(params=params, target=score)

    def skip_set(self):
        return self.best

    def observe(self, outcome: StepOutcome) -> None:
        self._steps += 1
        if not self.active or self._steps % self.eval_every or not outcome.histories:
            return
        b = _longest_row(outcome)
        n = min(self.context, outcome.generated[b] if outcome.generated else self.context)
        if n < self.min_tokens:
            return
        # score the last n generated tokens, with `context` tokens before them as their context:
        # a bounded forward, not the whole prompt every step, and no full-model forward at all
        ids = outcome.histories[b][-(n + self.context) :]
        cand = self._candidate()
        best_score = match_rate(self.model, ids, n, self.best)
        score = match_rate(self.model, ids, n, cand)
        self._register(self.best, best_score)
        self._register(cand, score)
        if score > best_score:
            self.best, best_score = cand, score
        self.best_score = best_score
        self.iterations += 1
        if self.iterations >= self.max_iter:
            self.active = False

    def state(self) -> dict:
        return {
            "searcher": self.name,
            "phase": "search" if self.active else "installed",
            "active": self.active,
            "skip_set": sorted(self.best),
            "iterations": self.iterations,
            "score": self.best_score,
            "objective": "agreement",
        }


# ---------------------------------------------------------------------------------------------
# the factory
# ---------------------------------------------------------------------------------------------


class CachedSkip(StaticSkip):
    """``cached``: a set loaded from the skip-set registry (no search)."""

    name = "cached"

    def __init__(self, entry):
        super().__init__(entry.layers)
        self.entry = entry

    def state(self) -> dict:
        return {**super().state(), "searcher": self.name, "cache": asdict(self.entry)}


def make_policy(name: str, model, **knobs):
    """A skip-set policy by name: conflayers | static | swift | none | cached.

    Knobs: ``conflayers`` takes ``SearchConfig`` fields (``objective``, ``rho``, ``interval``, …);
    ``static`` takes ``layers`` (default every other intermediate layer); ``swift`` takes
    ``skip_ratio``, ``context``, ``max_iter``, ``bo_every``, ``eval_every``, ``min_tokens``, ``seed``;
    ``cached`` takes ``registry`` (path), ``dataset`` and optionally ``model_id``.
    Knobs that are ``None`` are ignored (they mean "the default").
    """
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if name not in SEARCHERS:
        raise ValueError(f"unknown searcher {name!r}: choose one of {', '.join(SEARCHERS)}")
    L = num_layers(model)
    if name == "none":
        _no_knobs(name, knobs)
        return PlainPolicy()
    if name == "static":
        layers = knobs.pop("layers", None)
        _no_knobs(name, knobs)
        return StaticSkip(validate_skip_set(every_other_layer(L) if layers is None else layers, L))
    if name == "swift":
        try:
            return SwiftSearch(model, **knobs)
        except TypeError as e:
            raise ValueError(f"swift: {e}") from None
    if name == "cached":
        from .registry import load_entry, model_identity

        try:
            path, dataset = knobs.pop("registry"), knobs.pop("dataset")
        except KeyError as e:
            raise ValueError(f"the cached searcher needs a {e.args[0]!r} knob") from None
        model_id = knobs.pop("model_id", None) or model_identity(model)
        _no_knobs(name, knobs)
        return CachedSkip(load_entry(path, model_id, dataset, L))
    valid = {f.name for f in fields(SearchConfig)}
    unknown = set(knobs) - valid
    if unknown:
        raise ValueError(f"conflayers: unknown knob(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return ConfLayersSearch(model, **knobs)


def _no_knobs(name: str, knobs: dict) -> None:
    if knobs:
        raise ValueError(f"the {name} searcher takes no knob(s) {sorted(knobs)}")
