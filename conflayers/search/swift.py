"""``SwiftSearch``: SWIFT's random proposals at a fixed skip ratio plus periodic Bayesian
optimisation, scored by teacher-forced greedy agreement with the full model (the baseline)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch

from ..drafts.seam import StepOutcome
from ..layers import num_layers, skip_layers
from .confidence import longest_row


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
        b = longest_row(outcome)
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
