"""Exactly-once output for caption_corpus: the committed files themselves are the ledger.

Layout of an output directory (readable as one Parquet dataset by pyarrow, DuckDB or Spark,
which skip names starting with '_' or '.', such as a write in flight):

    OUTPUT/part-<digest>.parquet          captioned rows
    OUTPUT/_errors/part-<digest>.parquet  error rows (sample_id, source_file, stage, reason)
    OUTPUT/_manifests/<run_id>.json       one manifest per run, written last

Protocol: every batch is committed as an atomic object (rename locally, one PUT on S3) named by a
digest of the sample ids it holds, so a retried task rewrites the same name. A run starts by
reading (sample_id, source_file) of everything committed: input files whose rows are all
committed are skipped without being read, and in the others the committed sample ids are
filtered out. A crash therefore loses at most uncommitted batches, which the next run redoes, and
no sample is ever written twice.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Iterable

import pyarrow as pa

from eama.engine import schema, storage

ERRORS_DIR = "_errors"
MANIFESTS_DIR = "_manifests"


def digest(keys: Iterable[str]) -> str:
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(key.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def committed(output: str) -> tuple[dict[str, set[str]], collections.Counter]:
    """(source_file -> sample ids, source_file -> rows) already committed (captioned or errored)."""
    done: dict[str, set[str]] = collections.defaultdict(set)
    rows: collections.Counter = collections.Counter()
    if not storage.exists(output):
        return done, rows
    files = storage.list_files(output)
    errors_dir = storage.join(output, ERRORS_DIR)
    if storage.exists(errors_dir):
        files += storage.list_files(errors_dir)
    for path in files:
        table = storage.read_table(path, columns=["sample_id", "source_file"])
        for sid, src in zip(table.column("sample_id").to_pylist(), table.column("source_file").to_pylist()):
            rows[src or ""] += 1
            if sid is not None:
                done[src or ""].add(sid)
    return done, rows


def commit_batch(table: pa.Table, output: str, run_id: str, model: str, mode: str) -> dict[str, int]:
    """Atomically write one pipeline batch: good rows to OUTPUT, error rows to OUTPUT/_errors."""
    rows = table.to_pylist()
    keys = [r["sample_id"] or f"{r['source_file']}:{r['error_reason']}" for r in rows]
    name = f"part-{digest(keys)}.parquet"
    good = [r for r in rows if not r["error_stage"]]
    bad = [r for r in rows if r["error_stage"]]
    write_errors([{"sample_id": r["sample_id"], "source_file": r["source_file"], "stage": r["error_stage"],
                   "reason": r["error_reason"]} for r in bad], output, name, run_id)
    if good:
        for r in good:
            r.update(model=model, mode=mode, run_id=run_id)
        out = pa.Table.from_pylist(good, schema=schema.CAPTION_OUTPUT)
        storage.write_table_atomic(out, storage.join(output, name))
    return {"written": len(good), "errors": len(bad)}


def write_errors(errors: list[dict], output: str, name: str, run_id: str) -> None:
    """Atomically write error rows (sample_id, source_file, stage, reason) as OUTPUT/_errors/<name>."""
    if errors:
        table = pa.Table.from_pylist([dict(e, run_id=run_id) for e in errors], schema=schema.ERROR)
        storage.write_table_atomic(table, storage.join(output, ERRORS_DIR, name))


def write_file_errors(errors: list[dict], output: str, run_id: str) -> None:
    """Commit errors about whole input files (not Parquet, missing column, ...)."""
    if errors:
        write_errors(errors, output, f"part-{digest(e['source_file'] + e['reason'] for e in errors)}.parquet", run_id)


def count_committed(output: str) -> tuple[int, int]:
    """(captioned rows, error rows) committed under `output`."""
    rows = sum(storage.parquet_num_rows(p) for p in storage.list_files(output)) if storage.exists(output) else 0
    err_dir = storage.join(output, ERRORS_DIR)
    errs = sum(storage.parquet_num_rows(p) for p in storage.list_files(err_dir)) if storage.exists(err_dir) else 0
    return rows, errs


def write_manifest(output: str, manifest: dict) -> str:
    path = storage.join(output, MANIFESTS_DIR, f"{manifest['run_id']}.json")
    storage.write_json_atomic(path, manifest)
    return path
