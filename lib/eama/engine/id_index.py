"""The ledger's compact sample-id index: which ids an output already holds, at ~13 bytes a row.

Every commit writes OUTPUT/_ledger/ids/<commit>.parquet beside its record: an 8-byte hash of the
sample id of each output row and each permanent error row (kind 0 and 1). Compaction merges the
commits' files into sorted segments (seg-<digest>.parquet: hash, kind, commit number; the commit
names in the file's metadata), at most MAX_SEGMENTS of them. Planning hashes the candidate ids,
looks them up with a binary search in each segment (reading the hash column only: 8 bytes a
committed row), and confirms each hit exactly by reading the sample ids of the few commits that
hold it, so a hash collision never marks a new id taken.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eama.engine import storage

IDS_DIR = "_ledger/ids"
MAX_SEGMENTS = 8
OUTPUT, ERROR = 0, 1
SCHEMA = pa.schema([pa.field("h", pa.uint64()), pa.field("kind", pa.uint8())])
SEGMENT_SCHEMA = pa.schema([pa.field("h", pa.uint64()), pa.field("kind", pa.uint8()), pa.field("commit", pa.uint32())])


def hashes(ids: Iterable[str]) -> np.ndarray:
    """64-bit hashes of sample ids (blake2b: stable across processes and versions)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
                       dtype=np.uint64)


def commit_file(output: str, name: str) -> str:
    return storage.join(output, IDS_DIR, f"{name}.parquet")


def write_commit_ids(output: str, name: str, output_ids: Sequence[str], error_ids: Sequence[str]) -> int:
    """The id file of one commit (written before its record); the number of ids it holds."""
    h = np.concatenate([hashes(output_ids), hashes(error_ids)])
    kind = np.concatenate([np.full(len(output_ids), OUTPUT, np.uint8), np.full(len(error_ids), ERROR, np.uint8)])
    storage.write_table_atomic(pa.table({"h": h, "kind": kind}, schema=SCHEMA), commit_file(output, name))
    return len(h)


def merge(output: str, parts: dict[str, str], segments: Sequence[str]) -> str:
    """Merge commit id files (name -> path) and existing segments into one new sorted segment;
    returns its name. The caller records it in the index, then deletes what was merged."""
    names: list[str] = []
    hs, kinds, commits = [], [], []
    for seg in segments:
        table, seg_names = read_segment(output, seg, ["h", "kind", "commit"])
        hs.append(table.column("h").to_numpy())
        kinds.append(table.column("kind").to_numpy())
        commits.append(table.column("commit").to_numpy().astype(np.uint32) + np.uint32(len(names)))
        names += seg_names
    for name, path in sorted(parts.items()):
        if not storage.exists(path):
            continue
        table = storage.read_table(path)
        hs.append(table.column("h").to_numpy())
        kinds.append(table.column("kind").to_numpy())
        commits.append(np.full(table.num_rows, len(names), np.uint32))
        names.append(name)
    h = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
    order = np.argsort(h, kind="stable")
    table = pa.table({"h": h[order], "kind": (np.concatenate(kinds) if kinds else np.zeros(0, np.uint8))[order],
                      "commit": (np.concatenate(commits) if commits else np.zeros(0, np.uint32))[order]},
                     schema=SEGMENT_SCHEMA.with_metadata({"commits": json.dumps(names)}))
    seg = "seg-" + hashlib.sha256("\0".join(names).encode()).hexdigest()[:24]
    storage.write_table_atomic(table, segment_path(output, seg), row_group_size=1 << 20)
    return seg


def segment_path(output: str, seg: str) -> str:
    return storage.join(output, IDS_DIR, f"{seg}.parquet")


def read_segment(output: str, seg: str, columns: list[str]) -> tuple[pa.Table, list[str]]:
    path = segment_path(output, seg)
    with storage.open_input(path) as fh:
        pf = pq.ParquetFile(fh)
        names = json.loads(pf.schema_arrow.metadata[b"commits"])
        return pf.read(columns=columns), names


def lookup(output: str, segments: Sequence[str], fresh: dict[str, str], wanted: np.ndarray,
           kinds: tuple[int, ...], threads: int = 32) -> set[str]:
    """The commits whose ids may hold one of the `wanted` hashes (sorted, unique), of the given
    kinds: the segments and fresh commit files are searched in parallel, one column each."""

    def in_segment(seg: str) -> set[str]:
        table, names = read_segment(output, seg, ["h"])
        found = _positions(table.column("h").to_numpy(), wanted)
        if not len(found):
            return set()
        full, _ = read_segment(output, seg, ["kind", "commit"])
        kind, commit = full.column("kind").to_numpy()[found], full.column("commit").to_numpy()[found]
        return {names[c] for c, k in zip(commit.tolist(), kind.tolist()) if k in kinds}

    def in_commit(item: tuple[str, str]) -> set[str]:
        name, path = item
        if not storage.exists(path):
            return set()
        table = storage.read_table(path)
        h, kind = table.column("h").to_numpy(), table.column("kind").to_numpy()
        hit = np.isin(h, wanted) & np.isin(kind, list(kinds))
        return {name} if hit.any() else set()

    found: set[str] = set()
    for part in storage.parallel_map(in_segment, list(segments), threads):
        found |= part
    for part in storage.parallel_map(in_commit, sorted(fresh.items()), threads):
        found |= part
    return found


def _positions(sorted_h: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Indices into `sorted_h` of every element equal to one of `wanted` (binary search)."""
    if not len(sorted_h) or not len(wanted):
        return np.zeros(0, np.int64)
    lo = np.searchsorted(sorted_h, wanted, "left")
    hi = np.searchsorted(sorted_h, wanted, "right")
    keep = hi > lo
    if not keep.any():
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a, b) for a, b in zip(lo[keep], hi[keep])])
