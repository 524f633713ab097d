"""Documents to summarize: every file under a local directory or an ``s3://`` prefix.

- ``.txt`` / ``.md``: one document per file, the whole file (UTF-8);
- ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv``: one document per record, its text in
  ``text_field``, optionally its id in ``id_field`` (else its position) and a reference summary in
  ``reference_field``.

A document is identified by its source (path or URI) plus, inside a table, its row id, and
versioned by a fingerprint of its text (SHA-256): an edited file is a new version of the same
document. A document that cannot be used (an unreadable file, text that is not UTF-8 or holds NUL
bytes, an empty text, a malformed record) is returned with ``error_type`` / ``error_message`` set
and a fingerprint of what could be read, so it is reported once and retried only when it changes.
Other files (other extensions) are ignored and counted.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from .. import io as storage_io
from ..reader import RowError, file_format_of, is_missing, parse_records, reference_text

TEXT_EXTS = ("txt", "md")
TABLE_EXTS = ("jsonl", "json", "parquet", "csv")


@dataclass
class Document:
    key: str  # source, or source#row_id for a record of a table
    source: str
    row_id: str
    text: str | None
    reference: str | None
    fingerprint: str
    error_type: str | None = None
    error_message: str | None = None


def fingerprint(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:32]


def _ext(path: str) -> str:
    return posixpath.basename(path).rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else ""


def list_documents(storage, path: str) -> tuple[list[str], list[str]]:
    """(document files, ignored files) under ``path`` (a directory/prefix, or one file)."""
    fs, p = storage_io.filesystem(storage, path)
    if not fs.exists(p):
        raise FileNotFoundError(f"input.path: {path} does not exist")
    found = sorted(fs.find(p)) if fs.isdir(p) else [p]
    uri = (lambda f: "s3://" + f) if storage_io.is_s3(path) else (lambda f: f)
    use = [uri(f) for f in found if _ext(f) in TEXT_EXTS + TABLE_EXTS]
    ignored = [uri(f) for f in found if _ext(f) not in TEXT_EXTS + TABLE_EXTS]
    return use, ignored


def _check_text(text: str, what: str) -> str:
    if "\x00" in text:
        raise RowError("not_text", f"{what} holds NUL bytes (binary data, not text)")
    if not text.strip():
        raise RowError("empty_document", f"{what} is empty")
    return text


def _error(source: str, row_id: str, error: Exception, seen: bytes | str) -> Document:
    etype = getattr(error, "error_type", "unreadable")
    key = f"{source}#{row_id}" if row_id else source
    return Document(key, source, row_id, None, None, "error:" + fingerprint(seen), etype, str(error))


def read_documents(storage, source: str, text_field: str = "text", id_field: str | None = None,
                   reference_field: str | None = None) -> list[Document]:
    """The documents of one file (error documents included)."""
    try:
        data = storage_io.read_bytes(storage, source)
    except OSError as e:
        return [_error(source, "", RowError("unreadable", f"cannot read {source}: {e}"), f"unreadable {e}")]
    if _ext(source) in TEXT_EXTS:
        try:
            text = _check_text(data.decode("utf-8"), source)
        except UnicodeDecodeError as e:
            return [_error(source, "", RowError("not_text", f"{source} is not UTF-8 text ({e.reason} at byte {e.start})"),
                           data)]
        except RowError as e:
            return [_error(source, "", e, data)]
        return [Document(source, source, "", text, None, fingerprint(text))]
    try:
        records = parse_records(data, file_format_of(source, "auto"))
    except Exception as e:  # a table that does not parse at all (e.g. a truncated Parquet file)
        return [_error(source, "", RowError("unreadable", f"cannot parse {source}: {e}"), data)]
    docs, seen_ids = [], set()
    for i, (rec, raw) in enumerate(records):
        row_id = str(i)
        if isinstance(rec, dict) and id_field and not is_missing(rec.get(id_field)):
            row_id = str(rec[id_field])
        if row_id in seen_ids:
            row_id = f"{row_id}@{i}"  # a repeated id stays two documents, told apart by position
        seen_ids.add(row_id)
        try:
            if isinstance(rec, RowError):
                raise rec
            if not isinstance(rec, dict):
                raise RowError("bad_record", f"expected an object, got {type(rec).__name__}")
            text = rec.get(text_field)
            if is_missing(text):
                raise RowError("empty_document", f"the record has no {text_field!r} (input.text_field)")
            if not isinstance(text, str):
                raise RowError("not_text", f"{text_field!r} must be text, got {type(text).__name__}")
            text = _check_text(text, f"{text_field!r}")
        except RowError as e:
            docs.append(_error(source, row_id, e, raw))
            continue
        ref = reference_text(rec.get(reference_field)) if reference_field else None
        docs.append(Document(f"{source}#{row_id}", source, row_id, text, ref, fingerprint(text)))
    return docs
