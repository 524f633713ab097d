"""Corpus drafts: a token suffix index over a dataset's finished outputs, and a drafter that uses it.

``SuffixIndex`` answers "which tokens followed the longest suffix of this row's recent tokens in the
outputs finished so far, and how often?" (SuffixDecoding's global tree, arXiv 2411.04975). It is a
**suffix automaton** over the retained outputs joined by a separator (``SEP``, never a token; a
query holds no separator, so no match crosses two outputs). Why an automaton and not a
bounded-depth suffix trie: the trie holds every distinct substring up to its depth (up to
``depth`` nodes per token, far past 64 bytes a token in Python), the automaton at most 2 states and
3 transitions per token, each appended token costs amortised O(1) to add, and matching a row's
recent tokens costs O(tokens read).

Counts: ``occ[v]`` is the number of places the strings of state ``v`` occur. It is kept exact, as
tokens are appended, for the states whose shortest string has at most ``depth`` tokens (the ones a
query can reach: matches are cut to ``depth - 1`` tokens, continuations add one); an appended
token adds one to the states on the suffix-link path of its last ``depth`` tokens, at most
``depth`` states. So ``add`` costs O(len(tokens) * depth) at worst, O(len(tokens)) amortised
with the depth fixed, and memory is O(tokens).

Draft rule (``propose``): match the longest suffix ``s`` of the context (at most ``depth - 1``
tokens) that some output continues; then walk greedily: the next token is the one that most often
followed ``s`` (ties: the smallest token id), its share is its count over all occurrences of ``s``
(an occurrence at an output's end counts as "no continuation"); keep it while the product of the
shares along the path (an estimate that the whole draft is right) stays >= ``min_prob``; ``s``
becomes ``s + token`` (its first token dropped past ``depth - 1``). At most ``match length +
slack`` tokens (a long match predicts a long copy; copies are bimodal), nor ``max_tokens``; a match
shorter than ``min_match`` drafts nothing.

Bound: at most ``max_tokens_indexed`` tokens (separators included). An add that would pass it
evicts the oldest outputs until at most half the cap is kept with the new one, and rebuilds the
automaton from them: a rebuild of <= cap/2 tokens happens at most once per cap/2 tokens added, so
updates stay amortised O(new tokens). An output longer than the cap keeps its first cap - 1 tokens.

``to_bytes``/``from_bytes`` store a version, a model/tokenizer ``key`` and the retained outputs
(with a CRC); loading rebuilds the automaton. Another key or a damaged payload is a ``ValueError``.

Saved indexes (the job's ``pipeline.corpus``, local or S3, and the command line's ``--corpus-index``
directory keep them alike): one file per dataset and model/tokenizer, ``index_name(dataset,
index_key(model_identity, tokenizer))``; ``load_saved`` reads one (a damaged or foreign file is a
warning and an empty index), ``merge_saved`` adds a run's outputs to it (the oldest dropped past the
cap). The caller brings the storage: a ``read(path) -> bytes | None`` and its own atomic write.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import sys
import zlib
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .ngram import NgramDrafter, proposal_from
from .seam import DraftContext, Proposal, StepOutcome

log = logging.getLogger(__name__)

SEP = -1  # between outputs; never a token id
_NONE, _MULTI = -2, -3  # head[v]: no transition / transitions in big[v]
BIG = 32  # edges kept in a state's list before they move to a dict
MAGIC = b"CLSX"
VERSION = 1
SUFFIX = ".clsx"  # a saved index's file
MAX_TOKENS_INDEXED = 1 << 20  # an index's default cap (the job's corpus_index.max_tokens_indexed)


class SuffixIndex:
    def __init__(self, max_tokens_indexed: int = MAX_TOKENS_INDEXED, depth: int = 32, key: str = "",
                 min_prob: float = 0.1, slack: int = 2, min_match: int = 1):
        if max_tokens_indexed < 2:
            raise ValueError(f"max_tokens_indexed must be >= 2, got {max_tokens_indexed!r}")
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth!r}")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob!r}")
        self.cap, self.depth, self.key = int(max_tokens_indexed), int(depth), str(key)
        self.min_prob, self.slack, self.min_match = float(min_prob), int(slack), int(min_match)
        self.outputs: deque[array] = deque()  # retained outputs, oldest first
        self.tokens_indexed = 0  # retained tokens + one separator per output
        self.rebuilds = 0
        self._reset()

    # -- the automaton ------------------------------------------------------------------------
    # Transitions: a state's edges are a linked list in three flat int arrays (12 bytes an edge);
    # a state with more than BIG edges (the root, frequent tokens) moves them to two sorted int
    # arrays, keys and targets (8 bytes an edge, binary search; a dict would cost ~100 bytes an edge).
    def _reset(self) -> None:
        self.len = array("i", [0])
        self.link = array("i", [-1])
        self.occ = array("i", [0])
        self.head = array("i", [_NONE])  # first edge of a state's list, _NONE, or _MULTI (in self.big)
        self.e_tok, self.e_to, self.e_next = array("i"), array("i"), array("i")
        self.big: dict[int, tuple[array, array]] = {}  # state -> (sorted tokens, their targets)
        self.last = 0
        self.win, self.win_len = 0, 0  # the state of the text's last min(len, depth) tokens

    def _new(self, length: int, link: int, occ: int = 0) -> int:
        self.len.append(length)
        self.link.append(link)
        self.occ.append(occ)
        self.head.append(_NONE)
        return len(self.len) - 1

    def _next(self, v: int, c: int) -> int:
        h = self.head[v]
        if h == _MULTI:
            keys, vals = self.big[v]
            i = bisect_left(keys, c)
            return vals[i] if i < len(keys) and keys[i] == c else -1
        e_tok, e_next = self.e_tok, self.e_next
        while h >= 0:
            if e_tok[h] == c:
                return self.e_to[h]
            h = e_next[h]
        return -1

    def _set(self, v: int, c: int, u: int) -> None:
        h = self.head[v]
        if h == _MULTI:
            keys, vals = self.big[v]
            i = bisect_left(keys, c)
            if i < len(keys) and keys[i] == c:
                vals[i] = u
            else:
                keys.insert(i, c)
                vals.insert(i, u)
            return
        n = 0
        while h >= 0:
            if self.e_tok[h] == c:
                self.e_to[h] = u
                return
            n += 1
            h = self.e_next[h]
        if n >= BIG:
            d = self._edges(v)
            d[c] = u
            keys = sorted(d)
            self.big[v] = (array("i", keys), array("i", [d[k] for k in keys]))
            self.head[v] = _MULTI
            return
        self.e_tok.append(c)
        self.e_to.append(u)
        self.e_next.append(self.head[v])
        self.head[v] = len(self.e_tok) - 1

    def _edges(self, v: int) -> dict[int, int]:
        h = self.head[v]
        if h == _MULTI:
            return dict(zip(*self.big[v]))
        out = {}
        while h >= 0:
            out[self.e_tok[h]] = self.e_to[h]
            h = self.e_next[h]
        return out

    def _copy_edges(self, q: int, clone: int) -> None:
        if self.head[q] == _MULTI:
            keys, vals = self.big[q]
            self.big[clone] = (array("i", keys), array("i", vals))
            self.head[clone] = _MULTI
            return
        h = self.head[q]
        while h >= 0:
            self.e_tok.append(self.e_tok[h])
            self.e_to.append(self.e_to[h])
            self.e_next.append(self.head[clone])
            self.head[clone] = len(self.e_tok) - 1
            h = self.e_next[h]

    def _append(self, c: int) -> None:
        ln, link = self.len, self.link
        cur = self._new(ln[self.last] + 1, -1)
        p = self.last
        while p != -1 and self._next(p, c) == -1:
            self._set(p, c, cur)
            p = link[p]
        if p == -1:
            link[cur] = 0
        else:
            q = self._next(p, c)
            if ln[p] + 1 == ln[q]:
                link[cur] = q
            else:
                clone = self._new(ln[p] + 1, link[q], self.occ[q])
                self._copy_edges(q, clone)
                while p != -1 and self._next(p, c) == q:
                    self._set(p, c, clone)
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur
        # the window: the state of the last min(len, depth) tokens (re-found after a split), then
        # one more occurrence for every state on its suffix-link path (all counted states ending here)
        w, wl = self.win, self.win_len
        if wl == self.depth:
            wl -= 1
        while w and ln[link[w]] >= wl:
            w = link[w]
        w, wl = self._next(w, c), wl + 1
        self.win, self.win_len = w, wl
        occ = self.occ
        while w > 0:
            occ[w] += 1
            w = link[w]

    def _index(self, tokens) -> None:
        for c in tokens:
            self._append(c)
        self._append(SEP)

    # -- updates ------------------------------------------------------------------------------
    def add(self, tokens: Sequence[int]) -> None:
        """Index one finished output (amortised O(len(tokens)))."""
        out = array("i", tokens[: self.cap - 1])
        if not out:
            return
        if min(out) < 0:
            raise ValueError(f"token ids must be >= 0, got {min(out)}")
        need = len(out) + 1
        if self.tokens_indexed + need > self.cap:
            while self.outputs and self.tokens_indexed + need > self.cap // 2:
                self.tokens_indexed -= len(self.outputs.popleft()) + 1
            self._reset()
            self.rebuilds += 1
            for o in self.outputs:
                self._index(o)
        self.outputs.append(out)
        self.tokens_indexed += need
        self._index(out)

    # -- queries ------------------------------------------------------------------------------
    def _step(self, v: int, l: int, c: int) -> tuple[int, int]:
        """Extend the match (state ``v``, length ``l``) of a text by one token ``c``: the longest
        suffix (at most ``depth - 1`` tokens) of the text + ``c`` that occurs in the index."""
        ln, link = self.len, self.link
        while v and self._next(v, c) == -1:
            v = link[v]
            l = ln[v]
        u = self._next(v, c)
        if u == -1:
            return 0, 0
        v, l = u, l + 1
        if l > self.depth - 1:
            l = self.depth - 1
            while ln[link[v]] >= l:
                v = link[v]
        return v, l

    def _continued(self, v: int, l: int) -> tuple[int, int]:
        """The longest suffix of the match that some output continues (not only ends)."""
        while v and not self._counts(v):
            v = self.link[v]
            l = self.len[v]
        return v, l

    def _match(self, context: Sequence[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of ``context`` (<= depth - 1 tokens) that some
        output continues; (0, 0) if none."""
        v = l = 0
        for c in context[-(self.depth - 1):]:
            v, l = self._step(v, l, c)
        return self._continued(v, l)

    def _counts(self, v: int) -> dict[int, int]:
        return {t: self.occ[u] for t, u in self._edges(v).items() if t != SEP}

    def longest_match(self, context: Sequence[int]) -> tuple[int, dict[int, int]]:
        """The length of the longest continued suffix of ``context`` and {next token: count}."""
        v, l = self._match(context)
        return l, (self._counts(v) if l else {})

    def propose(self, context: Sequence[int], max_tokens: int) -> list[int]:
        """The most frequent continuation of the longest matched suffix (the rule in the module doc)."""
        if max_tokens <= 0 or self.tokens_indexed == 0:
            return []
        return self._walk(*self._match(context), max_tokens)

    def _walk(self, v: int, l: int, max_tokens: int) -> list[int]:
        if l < max(self.min_match, 1):
            return []
        limit = min(max_tokens, l + self.slack)
        draft: list[int] = []
        prob = 1.0
        while len(draft) < limit:
            counts = self._counts(v)
            if not counts:
                break
            t = min(counts, key=lambda x: (-counts[x], x))
            prob *= counts[t] / self.occ[v]
            if prob < self.min_prob:
                break
            draft.append(t)
            v, l = self._next(v, t), l + 1
            if l > self.depth - 1:
                l = self.depth - 1
                while self.len[self.link[v]] >= l:
                    v = self.link[v]
        return draft

    def memory_bytes(self) -> int:
        """An estimate: the automaton's arrays, its branching states' dicts, the retained outputs."""
        arrays = sum(a.buffer_info()[1] * a.itemsize
                     for a in (self.len, self.link, self.occ, self.head, self.e_tok, self.e_to, self.e_next))
        # a branching state's two sorted arrays, their tuple and its slot in self.big
        dicts = sum(k.buffer_info()[1] * 8 + 2 * sys.getsizeof(array("i")) + 150 for k, _ in self.big.values())
        outs = sum(64 + 4 * len(o) for o in self.outputs)
        return arrays + dicts + outs

    @property
    def states(self) -> int:
        return len(self.len)

    # -- persistence --------------------------------------------------------------------------
    def params(self) -> dict:
        return {"max_tokens_indexed": self.cap, "depth": self.depth, "min_prob": self.min_prob,
                "slack": self.slack, "min_match": self.min_match}

    def to_bytes(self) -> bytes:
        return pack(self.outputs, self.key, **self.params())

    @classmethod
    def from_bytes(cls, data: bytes, key: str | None = None, max_tokens_indexed: int | None = None) -> "SuffixIndex":
        """Load an index; ``key`` (the model/tokenizer it must be for) refuses any other. Damaged
        data raises ``ValueError``. ``max_tokens_indexed`` overrides the stored cap (the oldest
        outputs past a smaller cap are dropped)."""
        found, params, outs = unpack(data, key)
        if max_tokens_indexed:
            params["max_tokens_indexed"] = max_tokens_indexed
        ix = cls(key=found, **params)
        for o in outs:
            ix.add(o)
        return ix


_HEAD = "<IIdiiI"


def pack(outputs, key: str = "", max_tokens_indexed: int = MAX_TOKENS_INDEXED, depth: int = 32, min_prob: float = 0.1,
         slack: int = 2, min_match: int = 1) -> bytes:
    """Outputs (token lists, oldest first) and an index's parameters as bytes: magic, version,
    ``key``, the body, its CRC. The coordinator pools outputs in this form without an automaton."""
    k = key.encode()
    body = bytearray(struct.pack(_HEAD, max_tokens_indexed, depth, min_prob, slack, min_match, len(outputs)))
    for o in outputs:
        o = o if isinstance(o, array) else array("i", o)
        body += struct.pack("<I", len(o))
        body += o.tobytes() if _LITTLE else _swap(o).tobytes()
    head = MAGIC + struct.pack("<HH", VERSION, len(k)) + k
    return head + bytes(body) + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes, key: str | None = None) -> tuple[str, dict, list[array]]:
    """(key, parameters, outputs) from ``pack``'s bytes; ``key`` refuses any other. A damaged,
    truncated or foreign payload raises ``ValueError`` naming what is wrong."""
    try:
        data = bytes(data)
    except TypeError as e:
        raise ValueError(f"corpus index payload must be bytes, got {type(data).__name__}") from e
    if data[:4] != MAGIC:
        raise ValueError("not a corpus index (bad magic bytes)")
    if len(data) < 8:
        raise ValueError("corpus index is truncated (no header)")
    version, klen = struct.unpack_from("<HH", data, 4)
    if version != VERSION:
        raise ValueError(f"corpus index has version {version}; this code reads version {VERSION}")
    if len(data) < 8 + klen + 4:
        raise ValueError("corpus index is truncated (header)")
    try:
        found = data[8 : 8 + klen].decode()
    except UnicodeDecodeError as e:
        raise ValueError("corpus index is damaged (its key is not text)") from e
    if key is not None and found != key:
        raise ValueError(f"corpus index was built for {found!r}, not for {key!r}: refusing it")
    body, crc = data[8 + klen : -4], data[-4:]
    if struct.unpack("<I", crc)[0] != zlib.crc32(body):
        raise ValueError("corpus index is damaged (checksum mismatch)")
    try:
        cap, depth, min_prob, slack, min_match, n = struct.unpack_from(_HEAD, body, 0)
        pos, outs = struct.calcsize(_HEAD), []
        for _ in range(n):
            (m,) = struct.unpack_from("<I", body, pos)
            pos += 4
            if pos + 4 * m > len(body):
                raise ValueError("an output runs past the end")
            o = array("i")
            o.frombytes(body[pos : pos + 4 * m])
            outs.append(o if _LITTLE else _swap(o))
            pos += 4 * m
        if pos != len(body):
            raise ValueError("trailing bytes")
        if cap < 2 or depth < 2 or not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"bad parameters (cap {cap}, depth {depth}, min_prob {min_prob})")
    except (struct.error, ValueError, OverflowError) as e:
        raise ValueError(f"corpus index is damaged ({e})") from e
    return found, {"max_tokens_indexed": cap, "depth": depth, "min_prob": min_prob, "slack": slack,
                   "min_match": min_match}, outs


# -- saved indexes: the same file for the same dataset and model, wherever it is kept -------------
def index_key(model_id: str, tokenizer) -> str:
    """The model and tokenizer an index is for: the model's identity
    (``conflayers.search.registry.model_identity``) and a hash of the vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha1("\n".join(f"{i}\t{t}" for t, i in vocab).encode()).hexdigest()[:12]
    return f"{model_id}|vocab{len(vocab)}-{digest}"


def index_name(dataset: str, key: str) -> str:
    """A dataset's saved index: ``<dataset, made filename-safe>-<hash of dataset and key>.clsx``
    (another model or tokenizer: another file)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)[:64] or "_"
    digest = hashlib.sha1(f"{key}\n{dataset}".encode()).hexdigest()[:12]
    return f"{safe}-{digest}{SUFFIX}"


def keep_newest(outputs: list, cap: int) -> list:
    """The newest outputs whose tokens (plus one separator each) fit in ``cap``."""
    total, start = 0, len(outputs)
    for i in range(len(outputs) - 1, -1, -1):
        need = min(len(outputs[i]), cap - 1) + 1
        if total + need > cap:
            break
        total += need
        start = i
    return outputs[start:]


def load_saved(read, path: str, dataset: str, key: str, cap: int) -> SuffixIndex:
    """The index saved at ``path`` (``read(path)``: its bytes, None when there is none) for ``key``,
    holding at most ``cap`` tokens; an empty one when there is none or it cannot be used (damaged,
    another model's, unreadable: a warning says why, and the dataset starts cold)."""
    try:
        data = read(path)
        if data is not None:
            ix = SuffixIndex.from_bytes(data, key=key, max_tokens_indexed=cap)
            log.info("corpus index for %r: %d outputs (%d tokens) from %s", dataset, len(ix.outputs),
                     ix.tokens_indexed, path)
            return ix
    except (ValueError, OSError) as e:
        log.warning("corpus index %s ignored (%s): dataset %r starts with an empty index", path, e, dataset)
    return SuffixIndex(max_tokens_indexed=cap, key=key)


def merge_saved(read, path: str, key: str, outputs: list, cap: int) -> bytes:
    """The file at ``path`` with ``outputs`` (oldest first) added after its own, the oldest dropped
    past ``cap``, as bytes to write in its place. A file that cannot be used is replaced (a warning)."""
    old: list = []
    try:
        data = read(path)
        if data is not None:
            old = unpack(data, key=key)[2]
    except (ValueError, OSError) as e:
        log.warning("corpus index %s could not be read (%s): it is replaced by this run's outputs", path, e)
    return pack(keep_newest(old + list(outputs), cap), key, max_tokens_indexed=cap)


_LITTLE = array("i", [1]).tobytes()[0] == 1


def _swap(a: array) -> array:
    b = array("i", a)
    b.byteswap()
    return b


@dataclass
class _Row:
    """A row's match in its group's index, extended token by token as the row grows."""

    history: list[int]
    group: str
    generation: int  # the index's ``changes`` when the match was made
    upto: int = 0  # tokens of the history read into the match
    v: int = 0
    l: int = 0


class CorpusDrafter:
    """Per-row n-gram lookup (``NgramDrafter``) combined with a ``SuffixIndex`` per group (dataset).

    Each row gets the longer of its two drafts; a tie goes to the row's own n-gram draft (it reads
    this row's text, the index only other rows'). Proposals are deterministic (``q=None``), so the
    engine's rejection rule keeps sampling exact. Each row's group is its ``Request.group``; a
    group's index is made by ``new_index(group)`` when first needed.

    Matching: each row keeps its match (state, length) in its group's index and extends it by the
    tokens it committed since the last step: O(new tokens) per row per step, not O(depth). A match
    is redone from the row's last ``depth - 1`` tokens when the index changed since.

    Learning: ``observe`` queues each row that finished this step for its group's index (its
    output; with ``learn_prompts`` its prompt + output): a row finished when it reached its budget
    or committed a stop token. Queued outputs are indexed every ``learn_every`` steps (and
    whenever an index is read through ``index_for``), so rows' matches are redone at most that
    often. The drafter cannot see rows ended by a ``Request.on_tokens`` callback (stop strings,
    aborts) nor rows that finished on their first token (never drafted): the owner of the drafter
    adds those, or outputs pooled from elsewhere, with ``learn(tokens, group)``.
    """

    name = "corpus"

    def __init__(self, index: SuffixIndex | None = None, ngram: NgramDrafter | None = None,
                 max_tokens: int = 8, learn_finished: bool = True, learn_prompts: bool = False,
                 new_index=None, learn_every: int = 16):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if learn_every < 1:
            raise ValueError(f"learn_every must be >= 1, got {learn_every}")
        self.new_index = new_index if new_index is not None else (lambda group: SuffixIndex())
        self.indexes: dict[str, SuffixIndex] = {"": index} if index is not None else {}
        self.ngram = ngram if ngram is not None else NgramDrafter(max_tokens=max_tokens)
        self.max_tokens = max_tokens
        self.learn_finished, self.learn_prompts, self.learn_every = learn_finished, learn_prompts, learn_every
        self.stop_ids: frozenset[int] = frozenset()
        self.picked = {"ngram": 0, "corpus": 0}  # rows whose draft came from each source
        self._pending: dict[str, list[list[int]]] = {}
        self._changes: dict[str, int] = {}  # per group: how often its index changed
        self._rows: dict[int, _Row] = {}
        self._groups: list[str] = []  # the rows' groups at the last proposal
        self._steps = 0

    # -- the indexes ----------------------------------------------------------------------------
    def _index(self, group: str) -> SuffixIndex:
        ix = self.indexes.get(group)
        if ix is None:
            ix = self.indexes[group] = self.new_index(group)
        return ix

    def index_for(self, group: str = "") -> SuffixIndex:
        """A group's index, with every output queued for it indexed."""
        self.flush()
        return self._index(group)

    @property
    def index(self) -> SuffixIndex:
        return self.index_for("")

    def learn(self, tokens: Sequence[int], group: str = "") -> None:
        """Queue one output for ``group``'s index (indexed at the next ``flush``)."""
        if len(tokens):
            self._pending.setdefault(group, []).append(list(tokens))

    def flush(self) -> None:
        for group, outs in self._pending.items():
            ix = self._index(group)
            for o in outs:
                ix.add(o)
            self._changes[group] = self._changes.get(group, 0) + 1
        self._pending.clear()

    # -- drafting -------------------------------------------------------------------------------
    def _row_match(self, hist: list[int], group: str, ix: SuffixIndex) -> tuple[int, int]:
        gen = self._changes.get(group, 0)
        r = self._rows.get(id(hist))
        if r is None or r.history is not hist or r.group != group or r.generation != gen or r.upto > len(hist):
            r = self._rows[id(hist)] = _Row(hist, group, gen, max(0, len(hist) - (ix.depth - 1)))
        v, l = r.v, r.l
        for c in hist[r.upto :]:
            v, l = ix._step(v, l, c)
        r.v, r.l, r.upto = v, l, len(hist)
        return ix._continued(v, l)

    def drafts(self, histories: list[list[int]], limits: list[int],
               groups: list[str] | None = None) -> list[tuple[list[int], str, int]]:
        """Per row: (draft, where it came from: "ngram" | "corpus", corpus match length)."""
        if self._steps % self.learn_every == 0:
            self.flush()
        self._steps += 1
        groups = groups if groups and len(groups) == len(histories) else [""] * len(histories)
        self._groups = groups
        limits = [min(int(m), self.max_tokens) for m in limits]
        own = self.ngram.candidates(histories, limits)
        out = []
        for hist, limit, d, group in zip(histories, limits, own, groups):
            c, match = [], 0
            ix = self._index(group)  # a group seen for the first time: new_index(group) (a saved index, say)
            if limit > 0 and ix.tokens_indexed:
                v, match = self._row_match(hist, group, ix)
                c = ix._walk(v, match, limit)
            if c and len(c) > len(d):
                out.append((c, "corpus", match))
                self.picked["corpus"] += 1
            else:
                out.append((d, "ngram", match))
                self.picked["ngram"] += bool(d)
        live = {id(h) for h in histories}
        for k in [k for k in self._rows if k not in live]:
            del self._rows[k]
        return out

    def candidates(self, histories: list[list[int]], limits: list[int], groups: list[str] | None = None) -> list[list[int]]:
        return [d for d, _, _ in self.drafts(histories, limits, groups)]

    def propose(self, ctx: DraftContext) -> Proposal:
        self.stop_ids = ctx.stop_ids
        items = self.drafts(ctx.histories, ctx.max_draft.tolist(), ctx.groups)
        return proposal_from([d for d, _, _ in items], ctx.last_tokens.device, self.name,
                             [src if d else "none" for d, src, _ in items])

    def learn_finished_rows(self, outcome: StepOutcome, groups: list[str], stop_ids: frozenset[int]) -> None:
        """Queue the rows that finished in this step (budget reached or a stop token committed)."""
        if not outcome.generated:
            return
        groups = groups if len(groups) == len(outcome.histories) else [""] * len(outcome.histories)
        for hist, n, budget, k, g in zip(outcome.histories, outcome.generated, outcome.budget, outcome.committed, groups):
            if n >= budget or (k and hist[-1] in stop_ids):
                self.learn(hist if self.learn_prompts else hist[len(hist) - n :], g)

    def observe(self, outcome: StepOutcome) -> None:
        if self.learn_finished:
            self.learn_finished_rows(outcome, self._groups, self.stop_ids)
