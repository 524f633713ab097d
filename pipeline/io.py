"""Storage: local paths and ``s3://`` URIs through fsspec, built from config where it is used.

A filesystem object is never pickled into Ray tasks; workers call ``filesystem(storage, path)``
with the (plain) storage config and build their own.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from dataclasses import asdict, is_dataclass

import pyarrow as pa
import pyarrow.parquet as pq


def _storage_dict(storage) -> dict:
    if storage is None:
        return {}
    return asdict(storage) if is_dataclass(storage) else dict(storage)


def is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://"))


def filesystem(storage, path: str):
    """(fsspec filesystem, path without scheme for s3 / absolute local path)."""
    import fsspec

    if is_s3(path):
        import s3fs

        st = _storage_dict(storage)
        kwargs = {"anon": bool(st.get("anonymous"))}
        if not kwargs["anon"]:
            if st.get("key"):
                kwargs["key"] = st["key"]
            if st.get("secret"):
                kwargs["secret"] = st["secret"]
        client = {}
        if st.get("endpoint_url"):
            client["endpoint_url"] = st["endpoint_url"]
        if st.get("region"):
            client["region_name"] = st["region"]
        fs = s3fs.S3FileSystem(client_kwargs=client, skip_instance_cache=True, **kwargs)
        return fs, path.split("://", 1)[1].rstrip("/")
    import os

    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def list_input_files(storage, path: str) -> list[str]:
    """The input files under ``path`` (a file or a directory), as URIs/paths usable with ``filesystem``."""
    fs, p = filesystem(storage, path)
    if not fs.exists(p):
        raise FileNotFoundError(f"input.path: {path} does not exist")
    if fs.isdir(p):
        files = sorted(f for f in fs.find(p) if f.rsplit(".", 1)[-1].lower() in ("jsonl", "json", "parquet", "csv"))
        if not files:
            raise FileNotFoundError(f"input.path: {path} holds no .jsonl/.json/.parquet/.csv files")
    else:
        files = [p]
    return [("s3://" + f if is_s3(path) else f) for f in files]


def read_bytes(storage, path: str) -> bytes:
    fs, p = filesystem(storage, path)
    with fs.open(p, "rb") as f:
        return f.read()


def write_bytes_atomic(storage, path: str, data: bytes) -> None:
    """Write a whole file so that readers see it complete or not at all.

    Local: a temporary name in the same directory, then a rename. S3: one PUT is atomic already.
    """
    fs, p = filesystem(storage, path)
    if is_s3(path):
        with fs.open(p, "wb") as f:
            f.write(data)
        return
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, p)


def write_parquet(storage, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(storage, path, buf.getvalue())


def read_parquet_dir(storage, path: str, columns: list[str] | None = None) -> pa.Table | None:
    """All complete ``*.parquet`` files under a directory as one table (None if there are none)."""
    fs, p = filesystem(storage, path)
    if not fs.exists(p):
        return None
    files = sorted(f for f in fs.find(p) if f.endswith(".parquet"))
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def exists(storage, path: str) -> bool:
    fs, p = filesystem(storage, path)
    return fs.exists(p)


def write_run_config(cfg, directory: str) -> None:
    """``cfg`` (a config dataclass) resolved as ``<directory>/run_config.yaml``, credentials masked."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.structured(cfg)
    for key in ("key", "secret"):  # never write credentials next to the outputs
        if resolved.storage[key]:
            resolved.storage[key] = "***"
    write_bytes_atomic(cfg.storage, join(directory, "run_config.yaml"), OmegaConf.to_yaml(resolved).encode())
