"""Corpus indexes across actors and runs: where a dataset's index is kept, how it is loaded and saved.

Each actor keeps one ``conflayers.drafts.corpus.SuffixIndex`` per dataset (a ``CorpusDrafter``'s). They
are shared and kept like this:

- **in a run**: after each batch an actor sends that batch's finished outputs per dataset to the
  coordinator (``Coordinator.corpus_put``); before each batch it takes the outputs other actors
  sent since it last asked (``corpus_since``, at most ``corpus_index.share_tokens`` tokens a message)
  and indexes them. The coordinator keeps the run's outputs per dataset, oldest dropped past
  ``corpus_index.max_tokens_indexed``.
- **across runs**: an actor starting a dataset loads ``<corpus_index.path>/<dataset>-<key hash>.clsx``
  (the file names the model and tokenizer it was built for: another model's index is another
  file); at the end of the run the driver merges the run's pooled outputs into that file (oldest
  dropped past the cap) and writes it atomically. ``corpus_index.path`` defaults to ``corpus/`` next to
  ``search.registry`` (the summarization job: its state directory); with neither, nothing is saved.
  A damaged or foreign file is ignored with a warning: the dataset starts cold, and the end of the
  run writes a good file in its place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

from . import io as storage_io

log = logging.getLogger(__name__)
SUFFIX = ".clsx"


def corpus_dir(cfg) -> str | None:
    """Where the indexes are saved: ``corpus_index.path``, else ``corpus/`` next to the registry, else None."""
    if cfg.corpus_index.path:
        return cfg.corpus_index.path
    if cfg.search.registry:
        return os.path.join(os.path.dirname(os.path.abspath(cfg.search.registry)), "corpus")
    return None


def index_file(directory: str, dataset: str, key: str) -> str:
    """``<dataset, made filename-safe>-<hash of dataset and key>.clsx``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)[:64] or "_"
    digest = hashlib.sha1(f"{key}\n{dataset}".encode()).hexdigest()[:12]
    return storage_io.join(directory, f"{safe}-{digest}{SUFFIX}")


def index_key(model_id: str, tokenizer) -> str:
    """The model and tokenizer an index is for: the model's identity and a hash of the vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha1("\n".join(f"{i}\t{t}" for t, i in vocab).encode()).hexdigest()[:12]
    return f"{model_id}|vocab{len(vocab)}-{digest}"


def uses_corpus(cfg) -> bool:
    return cfg.search.drafter == "corpus" or (cfg.search.drafter == "auto" and cfg.corpus_index.enabled)


def load_index(cfg, dataset: str, key: str):
    """The dataset's saved index for this model/tokenizer ``key``, or an empty one (no file, or a
    file that cannot be used: a warning says why)."""
    from conflayers.drafts.corpus import SuffixIndex

    cap = cfg.corpus_index.max_tokens_indexed
    directory = corpus_dir(cfg)
    if directory:
        path = index_file(directory, dataset, key)
        try:
            if storage_io.exists(cfg.storage, path):
                ix = SuffixIndex.from_bytes(storage_io.read_bytes(cfg.storage, path), key=key, max_tokens_indexed=cap)
                log.info("corpus index for %r: %d outputs (%d tokens) from %s", dataset, len(ix.outputs),
                         ix.tokens_indexed, path)
                return ix
        except (ValueError, OSError) as e:
            log.warning("corpus index %s ignored (%s): dataset %r starts with an empty index", path, e, dataset)
    return SuffixIndex(max_tokens_indexed=cap, key=key)


def save_pooled(cfg, pooled: dict[str, tuple[str, list]]) -> int:
    """Merge each dataset's pooled outputs of this run ({dataset: (key, outputs oldest first)}) into
    its saved index; returns the files written."""
    from conflayers.drafts.corpus import pack, unpack

    directory = corpus_dir(cfg)
    if not directory:
        return 0
    cap, n = cfg.corpus_index.max_tokens_indexed, 0
    for dataset, (key, outputs) in sorted(pooled.items()):
        if not outputs:
            continue
        path = index_file(directory, dataset, key)
        old: list = []
        try:
            if storage_io.exists(cfg.storage, path):
                old = unpack(storage_io.read_bytes(cfg.storage, path), key=key)[2]
        except (ValueError, OSError) as e:
            log.warning("corpus index %s could not be read (%s): it is replaced by this run's outputs", path, e)
        merged = keep_newest(old + list(outputs), cap)
        storage_io.write_bytes_atomic(cfg.storage, path, pack(merged, key, max_tokens_indexed=cap))
        n += 1
    return n


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
