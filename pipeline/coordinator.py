"""The coordinator: one named Ray actor per run that pools each dataset's skip-set observations.

Generation actors ``report`` what they measured under a skip set (rows, tokens, seconds, steps,
accepted/drafted, plain-decoding tokens and seconds, search iterations) and ask for ``best`` when
they start a dataset, so an actor that joins late starts from the cluster-wide best set instead of
searching from scratch. Actors share the cost surface they measured per accelerator type
(``surface`` / ``put_surface``), so only the first actor on a kind of device calibrates. Actors
report each batch's rows as they finish and when the batch is committed (``batch_progress``,
keyed by the batch's file, so a retried batch replaces its earlier attempt's counts):
``progress()`` is the job's rows done, tokens and error rows.
Actors pool each dataset's finished outputs (``corpus_put`` / ``corpus_since``, ``pipeline.corpus``):
the coordinator keeps the run's outputs per dataset up to a token cap, oldest dropped first.
At the end of the run the driver takes ``summary()`` and ``corpus_pooled()`` and writes them out.

``Coordinator`` is a plain class (tested without Ray); ``start_coordinator`` makes it a named actor.
"""

from __future__ import annotations

from array import array
from collections import defaultdict, deque

_SUMMED = ("rows", "tokens", "seconds", "steps", "drafted", "accepted", "baseline_tokens", "baseline_seconds")


class Coordinator:
    def __init__(self, min_tokens: int = 1, corpus_cap: int = 1 << 20):
        self.min_tokens = min_tokens
        self.corpus_cap = corpus_cap
        # dataset -> deque of (sequence number, actor id, tokens), oldest first; the model/tokenizer key
        self.corpus: dict[str, deque] = defaultdict(deque)
        self.corpus_tokens: dict[str, int] = defaultdict(int)
        self.corpus_key: dict[str, str] = {}
        self.corpus_seq = 0
        # dataset -> skip set (tuple) -> summed observation
        self.stats: dict[str, dict[tuple, dict]] = defaultdict(dict)
        self.iterations: dict[str, int] = defaultdict(int)
        self.settled: dict[str, set] = defaultdict(set)  # sets an actor stood by (not candidates under test)
        self.model: dict = {}
        self.latest: dict[str, list[int]] = {}  # the set each dataset's policy stood on at its last report
        self.surfaces: dict[str, dict] = {}  # cost surface per model x accelerator x dtype x kernels x threads
        self.actors: dict[str, dict] = {}  # actor id -> accelerator, width, threads, init_seconds, ready_at
        # batch (its output file's name) -> (rows done, tokens, errors); a retry replaces its earlier attempt
        self.running: dict[str, tuple[int, int, int]] = {}
        self.finished: dict[str, tuple[int, int, int]] = {}

    def batch_progress(self, batch: str, rows: int, tokens: int, errors: int, committed: bool = False) -> None:
        """An actor's counts for a batch: while it runs, and once more when it is committed."""
        if committed:
            self.running.pop(batch, None)
            self.finished[batch] = (rows, tokens, errors)
        elif batch not in self.finished:
            self.running[batch] = (rows, tokens, errors)

    def progress(self) -> tuple[int, int, int]:
        """(rows done, tokens, errors) over the committed batches and those running now."""
        both = list(self.finished.values()) + list(self.running.values())
        return tuple(sum(v[i] for v in both) for i in range(3))

    def corpus_put(self, dataset: str, key: str, actor_id: str, outputs: list) -> None:
        """An actor's finished outputs for ``dataset`` (token id arrays), indexed by the model/tokenizer ``key``."""
        if self.corpus_key.setdefault(dataset, key) != key:
            return  # another model's tokens: not this dataset's index (one model per run)
        log, cap = self.corpus[dataset], self.corpus_cap
        for o in outputs:
            o = array("i", o[: cap - 1])
            if not o:
                continue
            self.corpus_seq += 1
            log.append((self.corpus_seq, actor_id, o))
            self.corpus_tokens[dataset] += len(o) + 1
        while self.corpus_tokens[dataset] > cap:
            self.corpus_tokens[dataset] -= len(log.popleft()[2]) + 1

    def corpus_since(self, dataset: str, after: int, actor_id: str, max_tokens: int) -> tuple[int, list]:
        """(last sequence number read, outputs other actors sent after ``after``), at most ``max_tokens``
        tokens (at least one output); ask again with the returned number until the list is empty."""
        out, tokens, last = [], 0, after
        for seq, who, o in self.corpus.get(dataset, ()):
            if seq <= after:
                continue
            if out and tokens + len(o) > max_tokens:
                break
            last = seq
            if who != actor_id:
                out.append(o)
                tokens += len(o)
        return last, out

    def corpus_pooled(self) -> dict[str, tuple[str, list]]:
        """{dataset: (key, this run's outputs, oldest first)} for the driver to save."""
        return {d: (self.corpus_key[d], [o for _, _, o in log]) for d, log in self.corpus.items()}

    def surface(self, key: str) -> dict | None:
        """A cost surface another actor measured on the same kind of accelerator (``drafter: auto``)."""
        return self.surfaces.get(key)

    def put_surface(self, key: str, surface: dict) -> None:
        self.surfaces.setdefault(key, surface)

    def actor_ready(self, actor_id: str, info: dict) -> None:
        """An actor finished starting (model loaded, width chosen, cost surface in hand)."""
        self.actors[actor_id] = dict(info)

    def actors_info(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.actors.items()}

    def report(self, dataset: str, obs: dict) -> None:
        key = tuple(sorted(obs.get("skip_set") or ()))
        acc = self.stats[dataset].setdefault(key, dict.fromkeys(_SUMMED, 0))
        for k in _SUMMED:
            acc[k] += obs.get(k) or 0
        self.latest[dataset] = list(key)
        if obs.get("settled", True):
            self.settled[dataset].add(key)
        self.iterations[dataset] = max(self.iterations[dataset], int(obs.get("search_iterations") or 0))
        if obs.get("model_id"):
            self.model = {"model_id": obs["model_id"], "n_layers": obs.get("n_layers")}

    @staticmethod
    def _score(acc: dict) -> float:
        return acc["tokens"] / acc["seconds"] if acc["seconds"] else 0.0

    def best(self, dataset: str) -> list[int] | None:
        """The skip set with the highest measured tokens/s on this dataset so far (None: no data yet)."""
        cands = [(self._score(a), k) for k, a in self.stats.get(dataset, {}).items()
                 if a["tokens"] >= self.min_tokens and k in self.settled[dataset]]
        return list(max(cands)[1]) if cands else None

    def summary(self) -> dict[str, dict]:
        out = {}
        for dataset, sets in self.stats.items():
            best = self.best(dataset)
            # the settled best set, else (no actor settled yet) the set that produced the most tokens
            key = tuple(best) if best is not None else max(sets, key=lambda k: sets[k]["tokens"])
            acc = sets[key]
            tot = {k: sum(a[k] for a in sets.values()) for k in _SUMMED}
            out[dataset] = {
                "skip_set": list(key),
                "tokens_per_s": self._score(acc),
                "tau": (acc["accepted"] + acc["steps"]) / acc["steps"] if acc["steps"] else None,
                "acceptance_rate": acc["accepted"] / acc["drafted"] if acc["drafted"] else None,
                "baseline_tokens_per_s": tot["baseline_tokens"] / tot["baseline_seconds"] if tot["baseline_seconds"] else None,
                "search_iterations": self.iterations[dataset],
                "sets_tried": len(sets),
                "rows": tot["rows"],
                "settled": best is not None,
            }
        return out

    def current(self, datasets: list[str]) -> dict[str, list[int]]:
        return {d: self.latest[d] for d in datasets if d in self.latest}

    def model_info(self) -> dict:
        return dict(self.model)


def start_coordinator(name: str, namespace: str | None = None, corpus_cap: int = 1 << 20):
    """The run's coordinator as a named actor on the driver's own node (no CPU taken). A node's loss
    that takes the coordinator with it takes the driver too, which no Ray job survives; every other
    node can go (an actor on a worker node would fail every generation actor that asks it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(Coordinator).options(name=name, namespace=namespace, get_if_exists=True,
                                                       scheduling_strategy=here).remote(corpus_cap=corpus_cap)
