"""Large values stored once and read by key: e.g. each sample's image, shared by its task rows.

A job that would repeat a large value in many output rows (the three alignment tasks of one
sample all show its image) writes it once instead, as a `(key, value)` row of a blob folder beside
its output (runner.Attachment), and leaves the value null in the rows themselves. Training sorts
and shuffles the small rows only, then `BlobTable` fetches the values of each micro-batch by key.

`BlobTable` indexes the folder from its key column alone (which file and row group holds each
key); a value is read with its row group (blob folders are written in small row groups, sorted by
key) and the most recent row groups are kept. A key written twice (a commit redone after a crash)
keeps its first file's value: both copies are the same value.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import pyarrow as pa

from eama.engine import storage

ROW_GROUP_ROWS = 16  # values per row group: a random read fetches at most this many


class MissingBlob(KeyError):
    """A key the blob folder does not hold."""


def write_blobs(rows: Sequence[dict[str, Any]], schema: pa.Schema, path: str, key: str = "sample_id") -> None:
    """One blob file: `rows` deduplicated and sorted by `key`, in small row groups."""
    unique = {r[key]: r for r in reversed(rows)}  # the first of repeated keys
    table = pa.Table.from_pylist([unique[k] for k in sorted(unique)], schema=schema)
    storage.write_table_atomic(table, path, ROW_GROUP_ROWS)


class BlobTable:
    """The `column` of a blob folder, fetched by `key`."""

    def __init__(self, folder: str, key: str = "sample_id", column: str = "image", cache_groups: int = 32):
        self.folder, self.key, self.column = folder, key, column
        self.where: dict[str, tuple[str, int]] = {}
        files = storage.list_files(folder) if storage.exists(folder) else []
        for path, (keys, groups) in zip(files, storage.parallel_map(self._keys_of, files)):
            for k, g in zip(keys, groups):
                self.where.setdefault(k, (path, g))
        self.cache: collections.OrderedDict[tuple[str, int], dict[str, Any]] = collections.OrderedDict()
        self.cache_groups = cache_groups

    def _keys_of(self, path: str) -> tuple[list[str], list[int]]:
        keys = storage.read_table(path, [self.key]).column(self.key).to_pylist()
        groups = [g for g, n in enumerate(storage.row_group_rows(path)) for _ in range(n)]
        return keys, groups

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, keys: Sequence[str]) -> list[Any]:
        """The values of `keys`, in order; MissingBlob names the first key the folder lacks."""
        out = []
        for k in keys:
            if k not in self.where:
                raise MissingBlob(f"{self.folder} holds no {self.column} for {self.key}={k!r}")
            out.append(self._group(*self.where[k])[k])
        return out

    def _group(self, path: str, group: int) -> dict[str, Any]:
        if (path, group) in self.cache:
            self.cache.move_to_end((path, group))
            return self.cache[(path, group)]
        table = storage.read_row_group(path, group, [self.key, self.column])
        values = dict(zip(table.column(self.key).to_pylist(), table.column(self.column).to_pylist()))
        self.cache[(path, group)] = values
        if len(self.cache) > self.cache_groups:
            self.cache.popitem(last=False)
        return values


def fill(rows: dict[str, Any], blobs: BlobTable | None, column: str = "image", key: str = "sample_id",
         where: str = "") -> list[Any]:
    """A micro-batch's `column` with null entries fetched from `blobs` by `key` (rows written inline
    keep their own value). MissingBlob when a row has none and `blobs` cannot supply it."""
    values = list(rows[column])
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        if blobs is None:
            k = rows[key][missing[0]]
            raise MissingBlob(f"row {key}={k!r} has no {column} and there is no blob folder{where}")
        for i, v in zip(missing, blobs.get([rows[key][i] for i in missing])):
            values[i] = v
    return values
