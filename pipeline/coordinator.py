"""The coordinator: one named Ray actor per run that pools advice between generation actors.

Everything it holds only makes the job faster (``docs/reliability.md``, "The coordinator is advice"):
its loss or slowness costs speed, never rows or the job. Actors talk to it through
``pipeline.advice`` (every read bounded by a timeout, every write fire-and-forget), and it rebuilds
itself after a restart from what the actors re-send: each message is an actor's whole state for
that key, never an increment, so a message repeated, or re-sent to a restarted coordinator, counts once.

- **skip sets**: each actor ``report``s, per dataset, its cumulative observations per skip set (rows,
  tokens, seconds, steps, accepted/drafted, plain-decoding tokens and seconds), the sets it stood by
  and its search iterations; ``best`` is the set with the highest pooled tokens/s, which an actor
  that starts a dataset late begins from;
- **cost surfaces** per accelerator type (``surface`` / ``put_surface``), so only the first actor on a
  kind of device calibrates;
- **progress**: each batch's rows as they finish and once committed (``batch_progress``, keyed by
  the batch's file, so a retried batch replaces its earlier attempt's counts); ``progress()``;
- **the corpus pool**: each batch's finished outputs are written by its actor to storage
  (``pipeline.corpus_pool``); the coordinator holds only their addresses and token counts per dataset
  (``corpus_put`` / ``corpus_since``), oldest dropped past the cap, so no output crosses its mailbox
  and ``corpus_since`` costs what is new (a bisection, then the entries after it).

``advice`` is the one read an actor makes per batch (best sets, new pool entries, the epoch that
tells it the coordinator restarted) and ``batch_done`` the one write when it commits one (counts,
reports, pooled file); in between, a progress message every 5 s. Per actor and 10 s batch that is
about 4 messages (``benchmarks/coordinator_scale.py`` measures what one coordinator carries). ``Coordinator`` is a plain class (tested without Ray);
``start_coordinator`` makes it a named, restartable actor.
"""

from __future__ import annotations

import bisect
import os
import time
import uuid
from collections import defaultdict

_SUMMED = ("rows", "tokens", "seconds", "steps", "drafted", "accepted", "baseline_tokens", "baseline_seconds")


def add_obs(acc: dict, obs: dict, sign: int = 1) -> None:
    for k in _SUMMED:
        acc[k] = acc.get(k, 0) + sign * (obs.get(k) or 0)


class Coordinator:
    def __init__(self, min_tokens: int = 1, corpus_cap: int = 1 << 20, hang_s: float = 0.0):
        self.min_tokens = min_tokens
        self.corpus_cap = corpus_cap
        self.epoch = uuid.uuid4().hex[:12]  # a restarted coordinator has a new one: actors then re-send
        self.started = time.time()
        self.hang_s = hang_s  # tests: the first read handled sleeps this long (a hung handler)
        # dataset -> actor -> its cumulative report; dataset -> skip set -> the sum over actors
        self.reports: dict[str, dict[str, dict]] = defaultdict(dict)
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
        # the corpus pool: per dataset, entries (seq, actor id, address, tokens) oldest first, from self.pool_start
        self.pool: dict[str, list] = defaultdict(list)
        self.pool_seqs: dict[str, list[int]] = defaultdict(list)
        self.pool_start: dict[str, int] = defaultdict(int)
        self.pool_tokens: dict[str, int] = defaultdict(int)
        self.pool_paths: dict[str, set] = defaultdict(set)
        self.corpus_key: dict[str, str] = {}
        self.corpus_seq = 0

    def _hang_once(self) -> None:
        if self.hang_s:
            hang, self.hang_s = self.hang_s, 0.0
            time.sleep(hang)

    # -- liveness -----------------------------------------------------------------------------------
    def hello(self) -> dict:
        """Who answers: the epoch (new after a restart), its process and when it started."""
        return {"epoch": self.epoch, "pid": os.getpid(), "started": self.started}

    # -- progress -----------------------------------------------------------------------------------
    def batch_progress(self, batch: str, rows: int, tokens: int, errors: int, committed: bool = False) -> None:
        """An actor's counts for a batch: while it runs, and once more when it is committed."""
        if committed:
            self.running.pop(batch, None)
            self.finished[batch] = (rows, tokens, errors)
        elif batch not in self.finished:
            self.running[batch] = (rows, tokens, errors)

    def batches_committed(self, batches: dict) -> None:
        """Committed batches' counts re-sent by an actor after a restart ({batch: (rows, tokens, errors)})."""
        for b, counts in batches.items():
            self.batch_progress(b, *counts, committed=True)

    def batch_done(self, actor_id: str, batch: str, counts: tuple, reports: dict, pool: dict) -> None:
        """A committed batch in one message: its counts, the actor's cumulative reports for the batch's
        datasets ({dataset: state}, as ``report``) and its pooled file ({dataset: (key, address, tokens)})."""
        self.batch_progress(batch, *counts, committed=True)
        for d, state in reports.items():
            self.report(d, actor_id, state)
        for d, (key, address, tokens) in pool.items():
            self.corpus_put(d, key, actor_id, address, tokens)

    def progress(self) -> tuple[int, int, int]:
        """(rows done, tokens, errors) over the committed batches and those running now."""
        both = list(self.finished.values()) + list(self.running.values())
        return tuple(sum(v[i] for v in both) for i in range(3))

    # -- the corpus pool ------------------------------------------------------------------------------
    def corpus_put(self, dataset: str, key: str, actor_id: str, address: str, tokens: int) -> None:
        """A batch's outputs for ``dataset`` (``tokens`` tokens, written at ``address`` by its actor),
        indexed by the model/tokenizer ``key``. The same address again (a retried or re-sent batch) is a no-op."""
        if self.corpus_key.setdefault(dataset, key) != key:
            return  # another model's tokens: not this dataset's index (one model per run)
        if address in self.pool_paths[dataset] or tokens <= 0:
            return
        self.corpus_seq += 1
        self.pool[dataset].append((self.corpus_seq, actor_id, address, tokens))
        self.pool_seqs[dataset].append(self.corpus_seq)
        self.pool_paths[dataset].add(address)
        self.pool_tokens[dataset] += tokens
        log, start = self.pool[dataset], self.pool_start[dataset]
        while self.pool_tokens[dataset] > self.corpus_cap and start < len(log) - 1:
            _, _, old, n = log[start]
            self.pool_tokens[dataset] -= n
            self.pool_paths[dataset].discard(old)
            start += 1
        if start > 1024 and start * 2 > len(log):  # compact now and then: memory follows the live entries
            del log[:start], self.pool_seqs[dataset][:start]
            start = 0
        self.pool_start[dataset] = start

    def corpus_since(self, dataset: str, after: int, actor_id: str, max_tokens: int) -> tuple[int, list]:
        """(last sequence number read, addresses of outputs other actors pooled after ``after``), at most
        ``max_tokens`` tokens (at least one entry); ask again with the returned number until the list
        is empty. Costs a bisection plus the entries returned, whatever the pool's size."""
        log, seqs = self.pool.get(dataset, ()), self.pool_seqs.get(dataset, ())
        out, tokens, last = [], 0, after
        i = max(bisect.bisect_right(seqs, after), self.pool_start.get(dataset, 0))
        for seq, who, address, n in log[i:] if log else ():
            if out and tokens + n > max_tokens:
                break
            last = seq
            if who != actor_id:
                out.append(address)
                tokens += n
        return last, out

    def corpus_pooled(self) -> dict[str, tuple[str, list]]:
        """{dataset: (key, addresses of this run's pooled outputs, oldest first)}."""
        return {d: (self.corpus_key[d], [e[2] for e in log[self.pool_start[d]:]]) for d, log in self.pool.items()}

    # -- cost surfaces, actors ---------------------------------------------------------------------------
    def surface(self, key: str) -> dict | None:
        """A cost surface another actor measured on the same kind of accelerator (``drafter: auto``)."""
        self._hang_once()
        return self.surfaces.get(key)

    def put_surface(self, key: str, surface: dict) -> None:
        self.surfaces.setdefault(key, surface)

    def actor_ready(self, actor_id: str, info: dict) -> None:
        """An actor finished starting (model loaded, width chosen, cost surface in hand)."""
        self.actors[actor_id] = dict(info)

    def actors_info(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.actors.items()}

    # -- skip sets ------------------------------------------------------------------------------------
    def report(self, dataset: str, actor_id: str, state: dict) -> None:
        """An actor's cumulative observations on ``dataset``: ``sets`` {skip set: summed fields},
        ``latest`` (the set its policy stands on), ``settled`` (sets it stood by), ``search_iterations``,
        ``model_id`` / ``n_layers``. Replaces that actor's earlier report."""
        old = self.reports[dataset].get(actor_id)
        stats = self.stats[dataset]
        for key, obs in (old or {}).get("sets", {}).items():
            add_obs(stats[key], obs, -1)
        for key, obs in state.get("sets", {}).items():
            add_obs(stats.setdefault(tuple(key), dict.fromkeys(_SUMMED, 0)), obs)
        self.reports[dataset][actor_id] = {**state, "sets": {tuple(k): dict(v) for k, v in state.get("sets", {}).items()}}
        if state.get("latest") is not None:
            self.latest[dataset] = list(state["latest"])
        self.settled[dataset].update(tuple(s) for s in state.get("settled", ()))
        self.iterations[dataset] = max(self.iterations[dataset], int(state.get("search_iterations") or 0))
        if state.get("model_id"):
            self.model = {"model_id": state["model_id"], "n_layers": state.get("n_layers")}

    @staticmethod
    def _score(acc: dict) -> float:
        return acc["tokens"] / acc["seconds"] if acc["seconds"] else 0.0

    def best(self, dataset: str) -> list[int] | None:
        """The skip set with the highest measured tokens/s on this dataset so far (None: no data yet)."""
        cands = [(self._score(a), k) for k, a in self.stats.get(dataset, {}).items()
                 if a["tokens"] >= self.min_tokens and k in self.settled[dataset]]
        return list(max(cands)[1]) if cands else None

    def advice(self, actor_id: str, datasets: list[str], seen: dict[str, int], share_tokens: int) -> dict:
        """An actor's one read per batch: the epoch, each dataset's best set and its new pool entries."""
        self._hang_once()
        pool = {}
        for d in datasets:
            if d in self.pool:
                pool[d] = self.corpus_since(d, seen.get(d, 0), actor_id, share_tokens)
        return {"epoch": self.epoch, "best": {d: self.best(d) for d in datasets}, "pool": pool}

    def summary(self) -> dict[str, dict]:
        out = {}
        for dataset, sets in self.stats.items():
            if not sets:
                continue
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

    def final(self) -> dict:
        """What the driver writes out at the end: one call (skip sets, the model, the actors)."""
        return {"epoch": self.epoch, "summary": self.summary(), "model": self.model_info(),
                "actors": self.actors_info()}

    def current(self, datasets: list[str]) -> dict[str, list[int]]:
        return {d: self.latest[d] for d in datasets if d in self.latest}

    def model_info(self) -> dict:
        return dict(self.model)


def start_coordinator(name: str, namespace: str | None = None, corpus_cap: int = 1 << 20, hang_s: float = 0.0,
                      max_restarts: int = -1):
    """The run's coordinator as a named actor on the driver's own node (no CPU taken). A node's loss
    that takes the coordinator with it takes the driver too, which no Ray job survives; every other
    node can go. A coordinator that dies (the OOM killer, a crash in a handler, SIGKILL) is restarted
    by Ray (``max_restarts``, forever by default: it holds only advice) and a call sent meanwhile is
    retried once it is back; callers bound every wait (``pipeline.advice``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(Coordinator).options(
        name=name, namespace=namespace, get_if_exists=True, scheduling_strategy=here,
        max_restarts=max_restarts, max_task_retries=2).remote(corpus_cap=corpus_cap, hang_s=hang_s)
