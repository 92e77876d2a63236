"""Local paths and s3:// URIs behind one small API (fsspec / s3fs), with atomic writes.

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL[_S3],
AWS_ACCESS_KEY_ID, instance roles, ...); they are never logged.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import posixpath
import time
import uuid
from typing import Any, Callable, Sequence, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from eama.engine import faults

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_SECONDS = float(os.environ.get("EAMA_STORAGE_RETRY_SECONDS", "120"))


def with_retries(what: str, fn: Callable[[], T], budget: float | None = None) -> T:
    """Run fn, retrying transient I/O failures (faults.is_transient: connection refused or reset,
    timeouts, throttling, 5xx) with exponential backoff for up to `budget` seconds; other errors raise at once."""
    budget = RETRY_SECONDS if budget is None else budget
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError):
            raise
        except Exception as exc:
            if not faults.is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, str(exc)[:200], delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `path`, one per process and endpoint (an S3 client is costly to
    build: connection pool, credential chain); S3 gets botocore's adaptive retries."""
    protocol = path.split("://", 1)[0] if is_remote(path) else "file"
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")) if protocol == "s3" else None
    return _filesystem(protocol, endpoint, os.getpid())


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, endpoint: str | None, pid: int) -> fsspec.AbstractFileSystem:
    """Cached by (protocol, endpoint, process): a forked worker builds its own client."""
    if protocol == "s3":
        import s3fs

        # no listing cache: other processes rewrite objects (metrics, leases). No read-ahead cache:
        # a read fetches the byte range asked for (Parquet readers ask for footers and column
        # chunks), not a 50 MB block around it.
        return s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": endpoint} if endpoint else {},
            config_kwargs={"retries": {"max_attempts": 8, "mode": "adaptive"}},
            skip_instance_cache=True, use_listings_cache=False,
            default_cache_type="none", default_fill_cache=False,
        )
    return fsspec.filesystem(protocol)


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


def isdir(path: str) -> bool:
    return filesystem(path).isdir(strip(path))


GLOB_CHARS = "*?["


def list_files(path: str, suffix: str = ".parquet", literal: bool = False) -> list[str]:
    """Files under a directory (recursive), a glob, or a single file; sorted, hidden files skipped.
    literal: `path` is a name, never a glob (an output directory called out[1])."""
    return [f for f, _, _ in list_file_versions(path, suffix, literal)]


def list_files_with_sizes(path: str, suffix: str = ".parquet", literal: bool = False) -> list[tuple[str, int]]:
    """(file, size in bytes) for list_files, from the one listing (no extra request per file)."""
    return [(f, size) for f, size, _ in list_file_versions(path, suffix, literal)]


def version_of(info: dict[str, Any]) -> str:
    """What the store says identifies one version of a file: size and ETag on S3, size and mtime
    (nanoseconds) locally. A rewrite changes it, even one of the same size."""
    size = int(info.get("size") or 0)
    tag = info.get("ETag") or info.get("etag")
    if tag:
        return f"{size}:{str(tag).strip(chr(34))}"
    return f"{size}:{int(modified(info) * 1e9)}"


def modified(info: dict[str, Any]) -> float:
    """Last-modified time (seconds since the epoch) from a filesystem listing entry, local or S3."""
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def list_file_versions(path: str, suffix: str = ".parquet", literal: bool = False) -> list[tuple[str, int, str]]:
    """(file, size, version) for list_files, from the one listing."""
    fs, raw = filesystem(path), strip(path)
    base = raw
    if not literal and any(ch in raw for ch in GLOB_CHARS) and not fs.exists(raw):
        found = fs.glob(raw, detail=True)
        base = raw[: min(raw.index(ch) for ch in GLOB_CHARS if ch in raw)].rsplit("/", 1)[0] or "/"
    elif fs.isfile(raw):
        found = {raw: fs.info(raw)}
    elif fs.exists(raw):
        found = fs.find(raw, detail=True)
    else:
        raise FileNotFoundError(f"input path does not exist: {path}")
    keep = [
        (f, int(info.get("size") or 0), version_of(info)) for f, info in found.items()
        if f.endswith(suffix) and info.get("type", "file") != "directory"
        and not any(p.startswith(("_", ".")) for p in posixpath.relpath(f, base).split("/") if p != ".")
    ]
    return sorted((_with_scheme(f, path), size, version) for f, size, version in keep)


def parallel_map(fn: Callable[[Any], T], items: Sequence[Any], threads: int = 32) -> list[T]:
    """fn over items on a thread pool (footers and small objects: I/O-bound, the GIL released)."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def read_bytes(path: str) -> bytes:
    """A whole object: one GET on S3 (no ETag pinning, so an object rewritten between a listing and
    the read, such as a lease claim being renewed, reads as its newest version)."""
    if is_remote(path):
        return with_retries(f"read {path}", lambda: filesystem(path).cat_file(strip(path)))
    with open(strip(path), "rb") as fh:
        return fh.read()


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


def create_exclusive(path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist yet (O_EXCL locally, a conditional PUT with
    If-None-Match on S3); False when it already exists."""
    fs, raw = filesystem(path), strip(path)
    try:
        if is_remote(path):
            with_retries(f"create {path}", lambda: fs.pipe_file(raw, data, mode="create"))
        else:  # written whole to a hidden temp file, then linked into place: never seen half-written
            os.makedirs(os.path.dirname(raw), exist_ok=True)
            tmp = os.path.join(os.path.dirname(raw), f".{os.path.basename(raw)}.tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, raw)
            finally:
                os.remove(tmp)
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # S3 answers 412 Precondition Failed for an existing key
        if "precondition" in str(exc).lower() or "412" in str(exc):
            return False
        raise


def write_table_atomic(table: pa.Table, path: str, row_group_size: int | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes_atomic(path, buf.getvalue())


def open_input(path: str) -> Any:
    """A file object for random access: on S3 every read is one range request of the bytes asked
    for (a Parquet reader asks for the footer, then the column chunks it needs)."""
    return filesystem(path).open(strip(path), "rb")


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A whole Parquet file, or only `columns` (then only their column chunks are fetched)."""
    if columns is None:
        return pq.read_table(io.BytesIO(read_bytes(path)))

    def read() -> pa.Table:
        with open_input(path) as fh:
            return pq.read_table(fh, columns=columns)

    return with_retries(f"read {path}", read) if is_remote(path) else read()


def read_schema(path: str) -> pa.Schema:
    with open_input(path) as fh:
        return pq.read_schema(fh)


def file_size(path: str) -> int:
    """Bytes of a local or s3:// file."""
    if is_remote(path):
        return int(filesystem(path).size(strip(path)))
    return os.path.getsize(path)


def parquet_num_rows(path: str) -> int:
    return sum(row_group_rows(path))


def row_group_rows(path: str) -> list[int]:
    """Rows in each row group of a Parquet file (footer only)."""
    with open_input(path) as fh:
        meta = pq.ParquetFile(fh).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def read_row_group(path: str, index: int, columns: list[str] | None = None) -> pa.Table:
    def read() -> pa.Table:
        with open_input(path) as fh:
            return pq.ParquetFile(fh).read_row_group(index, columns=columns)

    return with_retries(f"read {path} row group {index}", read) if is_remote(path) else read()


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def remove(path: str) -> None:
    fs, raw = filesystem(path), strip(path)
    if fs.exists(raw):
        fs.rm(raw, recursive=True)
