"""Corpus indexes across actors and runs: where a dataset's index is kept, how it is loaded and saved.

Each actor keeps one ``conflayers.drafts.corpus.SuffixIndex`` per dataset (a ``CorpusDrafter``'s). They
are shared and kept like this:

- **in a run**: after each batch an actor writes that batch's finished outputs to one file in
  storage (``pipeline.corpus_pool``) and sends its address to the coordinator
  (``Coordinator.corpus_put``); before each batch it reads the files other actors pooled since it
  last asked (``corpus_since``, at most ``corpus_index.share_tokens`` tokens an answer) and indexes
  them. The coordinator keeps only the addresses, per dataset, oldest dropped past
  ``corpus_index.max_tokens_indexed``; its loss loses no output.
- **across runs**: an actor starting a dataset loads ``<corpus_index.path>/<dataset>-<key hash>.clsx``
  (the file names the model and tokenizer it was built for: another model's index is another
  file); at the end of the run the driver merges the run's pooled outputs into that file (oldest
  dropped past the cap) and writes it atomically. ``corpus_index.path`` defaults to ``corpus/`` next to
  ``search.registry`` (the summarization job: its state directory); with neither, nothing is saved.
  A damaged or foreign file is ignored with a warning: the dataset starts cold, and the end of the
  run writes a good file in its place.

The file's name, format and key checks are ``conflayers.drafts.corpus``'s (``index_name``,
``index_key``, ``load_saved``, ``merge_saved``), shared with ``python -m conflayers --corpus-index``:
the same directory serves both. This module brings the storage (local or S3) and the config.
"""

from __future__ import annotations

import os

from conflayers.drafts.corpus import SuffixIndex, index_key, index_name, load_saved, merge_saved

from . import io as storage_io

__all__ = ["corpus_dir", "index_file", "index_key", "load_index", "save_pooled", "uses_corpus"]


def corpus_dir(cfg) -> str | None:
    """Where the indexes are saved: ``corpus_index.path``, else ``corpus/`` next to the registry, else None."""
    if cfg.corpus_index.path:
        return cfg.corpus_index.path
    if cfg.search.registry:
        return os.path.join(os.path.dirname(os.path.abspath(cfg.search.registry)), "corpus")
    return None


def index_file(directory: str, dataset: str, key: str) -> str:
    """``<directory>/<dataset, made filename-safe>-<hash of dataset and key>.clsx``
    (``conflayers.drafts.corpus.index_name``: the command line's ``--corpus-index`` names it alike)."""
    return storage_io.join(directory, index_name(dataset, key))


def uses_corpus(cfg) -> bool:
    return cfg.search.drafter == "corpus" or (cfg.search.drafter == "auto" and cfg.corpus_index.enabled)


def load_index(cfg, dataset: str, key: str) -> SuffixIndex:
    """The dataset's saved index for this model/tokenizer ``key``, or an empty one (no file, or a
    file that cannot be used: a warning says why)."""
    cap = cfg.corpus_index.max_tokens_indexed
    directory = corpus_dir(cfg)
    if not directory:
        return SuffixIndex(max_tokens_indexed=cap, key=key)
    return load_saved(lambda path: _read(cfg, path), index_file(directory, dataset, key), dataset, key, cap)


def save_pooled(cfg, pooled: dict[str, tuple[str, list]]) -> int:
    """Merge each dataset's pooled outputs of this run ({dataset: (key, outputs oldest first)}) into
    its saved index; returns the files written."""
    directory = corpus_dir(cfg)
    if not directory:
        return 0
    cap, n = cfg.corpus_index.max_tokens_indexed, 0
    for dataset, (key, outputs) in sorted(pooled.items()):
        if not outputs:
            continue
        path = index_file(directory, dataset, key)
        data = merge_saved(lambda p: _read(cfg, p), path, key, outputs, cap)
        storage_io.write_bytes_atomic(cfg.storage, path, data)
        n += 1
    return n


def _read(cfg, path: str) -> bytes | None:
    return storage_io.read_bytes(cfg.storage, path) if storage_io.exists(cfg.storage, path) else None
