"""``ConfLayersSearch``: the iterative confidence-guided search (ALGORITHM.md §6), with two
objectives: ``acceptance`` (the paper's: mean accepted tokens) and ``throughput`` (default:
committed tokens per second of decode time, compared against plain decoding measured in the
same process; a set that does not beat plain decoding is never installed)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..drafts.seam import StepOutcome
from ..layers import num_layers
from .confidence import SkipRule, layer_confidences, longest_row, recent_context, skip_rule, update_lambda
from .static import every_other_layer

log = logging.getLogger(__name__)

OBJECTIVES = ("throughput", "acceptance")


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
            b = longest_row(outcome)
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
