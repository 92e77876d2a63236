"""The read stage: planned items -> work rows, reading the rows of a row group in slices of
bounded bytes.

A planned item is (file, row group, pending rows). The planner cuts an item larger than
`read_slice_bytes` into slices (split_items, by the file's bytes per row: its size over its rows);
the read stage streams a slice's row group with ParquetFile.iter_batches (no pre-buffering, a
small read buffer) in batches of about READ_BATCH_BYTES by the footer's uncompressed bytes per
row, keeps the slice's rows and stops after its last one. A read therefore holds one slice and
one batch, never a whole row group (except a row group written as one huge data page: Parquet
reads a page whole). The price: each slice of a row group decodes the rows before it again.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from eama.engine import faults, isolation, schema, storage
from eama.engine.isolation import fail

Row = dict[str, Any]


class BatchJob(Protocol):
    """What the read stage needs of a job (runner.BatchJob has it)."""

    input_schema: pa.Schema
    work_schema: pa.Schema
    check_table: Callable[[pa.Table, str], None] | None
    prepare: Callable[[Row], str | None] | None

READ_BATCH_BYTES = 16 << 20
READ_BUFFER_BYTES = 1 << 20


def bytes_per_row(listing: list[tuple[str, int]], groups: dict[str, list[int]]) -> dict[str, float]:
    """Stored bytes per row of each planned file (its size over its rows: no footer read)."""
    return {path: size / max(1, sum(groups[path])) for path, size in listing if path in groups}


def sub_item(item: Row, rows: list[int]) -> Row:
    """The part of a planned item that holds `rows` (its duplicates' reasons kept)."""
    keep = set(rows)
    dups = [(r, why) for r, why in zip(item["dup_rows"], item["dup_reasons"]) if r in keep]
    return dict(item, rows=list(rows), dup_rows=[r for r, _ in dups], dup_reasons=[why for _, why in dups])


def split_items(items: list[Row], per_row: dict[str, float], slice_bytes: int) -> list[Row]:
    """Items whose rows hold more than `slice_bytes` (by `per_row`), cut into slices that do not."""
    out = []
    for item in items:
        step = max(1, int(slice_bytes // max(1.0, per_row.get(item["path"], 0.0))))
        rows = item["rows"]
        out += [item] if len(rows) <= step else [sub_item(item, rows[k:k + step]) for k in range(0, len(rows), step)]
    return out


def halve_item(item: Row) -> list[Row]:
    mid = len(item["rows"]) // 2
    return [sub_item(item, item["rows"][:mid]), sub_item(item, item["rows"][mid:])]


def read_rows(path: str, group: int, rows: list[int], columns: list[str] | None = None) -> pa.Table:
    """Rows `rows` (ascending offsets) of one row group, streamed (module docstring); retried on
    transient faults for a remote file."""
    if storage.is_remote(path):
        return storage.with_retries(f"read {path} row group {group}", lambda: _stream_rows(path, group, rows, columns))
    return _stream_rows(path, group, rows, columns)


def _stream_rows(path: str, group: int, rows: list[int], columns: list[str] | None) -> pa.Table:
    with storage.filesystem(path).open(storage.strip(path), "rb") as fh:
        reader = pq.ParquetFile(fh, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
        meta = reader.metadata.row_group(group)
        per_row = max(1, meta.total_byte_size // max(1, meta.num_rows))
        step = max(1, min(meta.num_rows, READ_BATCH_BYTES // per_row))
        parts, at, k = [], 0, 0
        for batch in reader.iter_batches(batch_size=step, row_groups=[group], columns=columns):
            end, first = at + batch.num_rows, k
            while k < len(rows) and rows[k] < end:
                k += 1
            if k > first:
                parts.append(pa.Table.from_batches([batch]).take([r - at for r in rows[first:k]]))
            at = end
            if k == len(rows):
                break
        if k < len(rows):
            raise IndexError(f"row {rows[k]} is past the end of row group {group} ({meta.num_rows} rows)")
        return pa.concat_tables(parts) if parts else reader.schema_arrow.empty_table()


# ---------------------------------------------------------------- the read stage


def read_positions(batch: pa.Table, job: BatchJob, markers: isolation.Markers | None = None) -> pa.Table:
    """Read planned (file, row group, rows) items into work rows: contract check, duplicates and the
    job's per-row check marked. An unreadable row group gives an error row per planned position;
    rows that kill the reader are isolated as in a stage (isolation.behind_marker)."""
    tables = [read_item(item, job, markers) for item in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else job.work_schema.empty_table()


def read_item(item: Row, job: BatchJob, markers: isolation.Markers | None) -> pa.Table:
    """One planned item (or part of one) behind its in-flight marker."""
    where = [(item["path"], item["row_group"], row) for row in item["rows"]]
    return isolation.behind_marker(
        markers, item, where, functools.partial(_read_item, job=job),
        lambda part: pa.concat_tables([read_item(half, job, markers) for half in halve_item(part)]),
        lambda part, why: _failed_positions(part, job, isolation.CRASH, why), "read")


def _read_item(item: Row, job: BatchJob) -> pa.Table:
    path, group, rows = item["path"], item["row_group"], sorted(item["rows"])
    try:
        table = read_rows(path, group, rows)
        if job.check_table:
            job.check_table(table, path)
        table = schema.conform(table, job.input_schema, path).select(job.input_schema.names)
    except Exception as exc:
        return _failed_positions(item, job, "read", f"row group {group}: {faults.describe(exc)}",
                                 faults.is_transient(exc))
    dups = dict(zip(item["dup_rows"], item["dup_reasons"]))
    out: list[Row] = []
    for row, r in zip(rows, table.to_pylist()):
        r.update(source_file=path, source_row_group=group, source_row=row)
        if row in dups:
            fail(r, "duplicate", dups[row])
        elif not r.get("sample_id"):
            fail(r, "read", "empty sample_id")
        elif job.prepare and (why := job.prepare(r)):
            fail(r, "read", why)
        out.append(r)
    return pa.Table.from_pylist(out, schema=job.work_schema)


def _failed_positions(item: Row, job: BatchJob, stage: str, reason: str, retryable: bool = False) -> pa.Table:
    """An error row for every planned position of an item."""
    rows = [{"source_file": item["path"], "source_row_group": item["row_group"], "source_row": row}
            for row in item["rows"]]
    for r in rows:
        fail(r, stage, reason, retryable)
    return pa.Table.from_pylist(rows, schema=job.work_schema)
