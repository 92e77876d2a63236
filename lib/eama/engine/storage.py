"""Local paths and s3:// URIs behind one small API (fsspec / s3fs), with atomic writes.

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL[_S3],
AWS_ACCESS_KEY_ID, instance roles, ...); they are never logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_SECONDS = float(os.environ.get("EAMA_STORAGE_RETRY_SECONDS", "120"))


def with_retries(what: str, fn: Callable[[], T], budget: float | None = None) -> T:
    """Run fn, retrying transient I/O failures (connection refused or reset, timeouts, throttling,
    5xx) with exponential backoff for up to `budget` seconds; other errors raise at once."""
    budget = RETRY_SECONDS if budget is None else budget
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except Exception as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, str(exc)[:200], delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("connect", "timeout", "timed out", "reset", "throttl", "slow down", "slowdown",
               "internalerror", "serviceunavailable", "503", "500", "502", "504", "broken pipe")
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(m in text for m in markers)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `path`; S3 gets botocore's adaptive retries."""
    if path.startswith("s3://"):
        import s3fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        return s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            config_kwargs={"retries": {"max_attempts": 8, "mode": "adaptive"}},
            skip_instance_cache=True,
        )
    if is_remote(path):
        return fsspec.filesystem(path.split("://", 1)[0])
    return fsspec.filesystem("file")


def strip(path: str) -> str:
    return path.split("://", 1)[1] if is_remote(path) else os.path.abspath(path.removeprefix("file://"))


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory);
    URIs unchanged."""
    return path if not path or is_remote(path) else os.path.abspath(path.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _with_scheme(path: str, like: str) -> str:
    return f"{like.split('://', 1)[0]}://{path}" if is_remote(like) else path


def exists(path: str) -> bool:
    return filesystem(path).exists(strip(path))


def list_files(path: str, suffix: str = ".parquet") -> list[str]:
    """Files under a directory (recursive), a glob, or a single file; sorted, hidden files skipped."""
    fs, raw = filesystem(path), strip(path)
    if any(ch in raw for ch in "*?["):
        found = fs.glob(raw)
    elif fs.isfile(raw):
        found = [raw]
    elif fs.exists(raw):
        found = fs.find(raw)
    else:
        raise FileNotFoundError(f"input path does not exist: {path}")
    keep = [
        f for f in found
        if f.endswith(suffix) and not any(p.startswith(("_", ".")) for p in posixpath.relpath(f, raw).split("/") if p != ".")
    ]
    return sorted(_with_scheme(f, path) for f in keep)


def read_bytes(path: str) -> bytes:
    def read() -> bytes:
        with filesystem(path).open(strip(path), "rb") as fh:
            return fh.read()

    return with_retries(f"read {path}", read) if is_remote(path) else read()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Readers see the whole object or nothing: a temp file renamed locally, one PUT on S3."""
    fs, raw = filesystem(path), strip(path)
    if is_remote(path):
        # an S3 object becomes visible only once complete: a failed PUT leaves nothing behind
        with_retries(f"write {path}", lambda: fs.pipe_file(raw, data))
        return
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    # hidden ('.' prefix) so Parquet readers of the directory (pyarrow, Spark, Ray) skip a write in
    # flight or one a crash left behind
    tmp = os.path.join(os.path.dirname(raw), f".{os.path.basename(raw)}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, raw)


ROW_GROUP_ROWS = 32  # the unit caption_corpus reads in parallel


def write_table_atomic(table: pa.Table, path: str, row_group_size: int | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes_atomic(path, buf.getvalue())


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    if columns is None:
        return pq.read_table(io.BytesIO(read_bytes(path)))
    with filesystem(path).open(strip(path), "rb") as fh:
        return pq.read_table(fh, columns=columns)


def read_schema(path: str) -> pa.Schema:
    with filesystem(path).open(strip(path), "rb") as fh:
        return pq.read_schema(fh)


def parquet_num_rows(path: str) -> int:
    return sum(row_group_rows(path))


def row_group_rows(path: str) -> list[int]:
    """Rows in each row group of a Parquet file (footer only)."""
    with filesystem(path).open(strip(path), "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def read_row_group(path: str, index: int) -> pa.Table:
    def read() -> pa.Table:
        with filesystem(path).open(strip(path), "rb") as fh:
            return pq.ParquetFile(fh).read_row_group(index)

    return with_retries(f"read {path} row group {index}", read) if is_remote(path) else read()


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def remove(path: str) -> None:
    fs, raw = filesystem(path), strip(path)
    if fs.exists(raw):
        fs.rm(raw, recursive=True)
