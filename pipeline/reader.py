"""Reading a corpus into normalised rows: JSONL / Parquet / CSV, local or ``s3://``.

Every input record becomes exactly one row of ``ROW_FIELDS``. A record that cannot be used (a
malformed JSON line, an empty or non-text prompt, a bad ``max_tokens``) becomes an *error row*
(``error_type`` / ``error_message`` set) rather than stopping the job; the generation stage passes
error rows through to the output.

Record formats (``input.format``, chosen by config, never guessed):

- ``records``: ``prompt`` (text) or ``messages`` (chat list), optional ``id``, ``dataset``,
  ``reference``, ``max_tokens``;
- ``specbench``: Spec-Bench ``question.jsonl``: first of ``turns`` as the prompt, ``category`` as
  the dataset, ``question_id`` as the id, ``reference`` kept;
- ``gsm8k``: ``{question, answer}``: the question is the prompt, the answer the reference, the
  dataset ``gsm8k``.

A missing ``id`` is a stable hash of the file stem, the record's position and its content; a
missing ``dataset`` is the file's stem.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import posixpath

from . import io as storage_io

ROW_FIELDS = ("id", "dataset", "prompt", "messages", "reference", "max_tokens", "error_type", "error_message")


class RowError(ValueError):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def stable_id(stem: str, position: int, content: str) -> str:
    return hashlib.sha1(f"{stem}\x00{position}\x00{content}".encode()).hexdigest()[:16]


def file_stem(path: str) -> str:
    return posixpath.basename(path).split(".", 1)[0]


def file_format_of(path: str, file_format: str) -> str:
    if file_format != "auto":
        return file_format
    ext = path.rsplit(".", 1)[-1].lower()
    if ext in ("jsonl", "json"):
        return "jsonl"
    if ext in ("parquet", "csv"):
        return ext
    raise ValueError(f"input.file_format: cannot tell the format of {path} from its extension; set it")


def parse_records(data: bytes, fmt: str) -> list[tuple[object, str]]:
    """(record or exception, raw text) per input record."""
    if fmt == "jsonl":
        out = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), line))
            except json.JSONDecodeError as e:
                out.append((RowError("malformed_json", f"not valid JSON ({e.msg} at column {e.colno})"), line))
        return out
    if fmt == "parquet":
        import pyarrow.parquet as pq

        recs = pq.read_table(io.BytesIO(data)).to_pylist()
    elif fmt == "csv":
        recs = list(csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace"))))
        recs = [{k: (None if v == "" else v) for k, v in r.items()} for r in recs]
    else:
        raise ValueError(f"input.file_format: unknown format {fmt!r}")
    return [(r, json.dumps(r, sort_keys=True, default=str)) for r in recs]


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(v, what: str) -> str:
    if not isinstance(v, str):
        raise RowError("bad_prompt", f"{what} must be text, got {type(v).__name__}")
    if not v.strip():
        raise RowError("empty_prompt", f"{what} is empty")
    return v


def _messages(v) -> list[dict]:
    if isinstance(v, str):  # CSV / Parquet may carry the chat list as JSON text
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise RowError("bad_prompt", "messages is text but not a JSON chat list") from None
    if not isinstance(v, list) or not v:
        raise RowError("bad_prompt", "messages must be a non-empty list of {role, content} objects")
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RowError("bad_prompt", "messages must be a non-empty list of {role, content} objects")
        _text(m["content"], "a message's content")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _max_tokens(v, limit: int) -> int | None:
    if is_missing(v):
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise RowError("bad_max_tokens", f"max_tokens must be an integer, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise RowError("bad_max_tokens", f"max_tokens must be an integer, got {v!r}")
    v = int(v)
    if not 1 <= v <= limit:
        raise RowError("bad_max_tokens", f"max_tokens must be in [1, {limit}], got {v}")
    return v


def reference_text(v) -> str | None:
    if is_missing(v):
        return None
    if isinstance(v, list):  # Spec-Bench keeps one reference per turn
        v = v[0] if v else None
    return None if v is None else str(v)


def normalise(rec, raw: str, stem: str, position: int, fmt: str, max_tokens_limit: int) -> dict:
    """One input record -> one row of ``ROW_FIELDS`` (an error row when the record is unusable)."""
    row = dict.fromkeys(ROW_FIELDS)
    row["id"] = stable_id(stem, position, raw)
    row["dataset"] = stem
    row["prompt"] = ""
    try:
        if isinstance(rec, RowError):
            raise rec
        if not isinstance(rec, dict):
            raise RowError("bad_record", f"expected an object, got {type(rec).__name__}")
        if fmt != "specbench" and not is_missing(rec.get("id")):  # before any check: error rows keep their id
            row["id"] = str(rec["id"])
        if fmt != "specbench" and not is_missing(rec.get("dataset")):
            row["dataset"] = str(rec["dataset"])
        if fmt == "specbench":
            if not is_missing(rec.get("question_id")):
                row["id"] = str(rec["question_id"])
            if not is_missing(rec.get("category")):
                row["dataset"] = str(rec["category"])
            turns = rec.get("turns")
            if not isinstance(turns, list) or not turns:
                raise RowError("bad_prompt", "a Spec-Bench record needs a non-empty 'turns' list")
            row["prompt"] = _text(turns[0], "turns[0]")
        elif fmt == "gsm8k":
            row["dataset"] = str(rec["dataset"]) if not is_missing(rec.get("dataset")) else "gsm8k"
            row["prompt"] = _text(rec.get("question"), "question")
            row["reference"] = reference_text(rec.get("answer"))
        else:
            if not is_missing(rec.get("messages")):
                msgs = _messages(rec["messages"])
                row["messages"] = json.dumps(msgs)
                row["prompt"] = msgs[-1]["content"]
            elif "prompt" in rec and not is_missing(rec["prompt"]):
                row["prompt"] = _text(rec["prompt"], "prompt")
            else:
                raise RowError("empty_prompt", "the record has neither 'prompt' nor 'messages'")
        if fmt != "gsm8k":
            row["reference"] = reference_text(rec.get("reference"))
        row["max_tokens"] = _max_tokens(rec.get("max_tokens"), max_tokens_limit)
    except RowError as e:
        row["error_type"], row["error_message"] = e.error_type, str(e)
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            row["prompt"] = rec["prompt"]
    return row


def read_rows(path: str, storage=None, fmt: str = "records", file_format: str = "auto",
              max_tokens_limit: int = 4096) -> list[dict]:
    """All rows of one input file (local path or s3:// URI)."""
    data = storage_io.read_bytes(storage, path)
    stem = file_stem(path)
    return [
        normalise(rec, raw, stem, i, fmt, max_tokens_limit)
        for i, (rec, raw) in enumerate(parse_records(data, file_format_of(path, file_format)))
    ]
