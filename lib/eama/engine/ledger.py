"""The ledger: which input rows a job's output already accounts for, and the commit protocol.

An input row is a *position* (source file, row group, row). Every commit accounts for a set of
positions, each as an output row (or rows, for jobs that emit several per input) or an error row.
Layout of an output directory (readable as one Parquet dataset by pyarrow, DuckDB or Spark, which
skip names starting with '_' or '.', such as a write in flight):

    OUTPUT/part-<digest>.parquet           output rows of one commit (thousands of rows)
    OUTPUT/_errors/part-<digest>.parquet   its error rows (sample_id, source_file, stage, reason, ...)
    OUTPUT/_ledger/commits/part-<digest>.json   the commit's record: positions, counts, errors
    OUTPUT/_ledger/index.json              compacted records + what is known of each input file
    OUTPUT/_manifests/<run_id>.json        one manifest per run, written last
    OUTPUT/_lease.json                     the running job's lease (lease.py)

Commit protocol: the digest names the positions a commit holds, so a retried task rewrites the
same objects. The record is written first, then the error file, then the data file, each as one
atomic object; a commit counts once its last object exists, so a crash between them leaves a
record that the next run discards (with its objects) and redoes. At the end of a run the records
are compacted into the index: per input file its size and row groups and the positions done, per
commit only its counts and error entries. Planning a re-run therefore reads one small index and
lists the output, and never reads committed data, except the sample ids of committed files when
new rows must be checked for duplicates (in parallel, one column).

Error entries have a kind: 'permanent' (bad data), 'retryable' (a transient fault outlived its
retries: the next run redoes it), 'duplicate' (the sample id is already taken; never marks the id
done). An entry is superseded once a newer commit accounts for the same position; compaction drops
superseded error rows from their files, so OUTPUT/_errors always holds the current ones.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from eama.engine import schema, storage

log = logging.getLogger("eama.ledger")

ERRORS_DIR = "_errors"
MANIFESTS_DIR = "_manifests"
LEDGER_DIR = "_ledger"
COMMITS_DIR = f"{LEDGER_DIR}/commits"
INDEX_FILE = f"{LEDGER_DIR}/index.json"
FILE_ROW_GROUP = -1  # the position of an error about a whole input file

PERMANENT, RETRYABLE, DUPLICATE = "permanent", "retryable", "duplicate"

Ranges = list[list[int]]  # sorted, disjoint [start, end) pairs


# ---------------------------------------------------------------- ranges of row offsets


def to_ranges(rows: Iterable[int]) -> Ranges:
    out: Ranges = []
    for r in sorted(set(rows)):
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return out


def union(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def subtract(a: Ranges, rows: Iterable[int]) -> Ranges:
    """`a` without the given row offsets."""
    out = [list(r) for r in a]
    for row in sorted(set(rows)):
        for k, (s, e) in enumerate(out):
            if s <= row < e:
                out[k:k + 1] = [p for p in ([s, row], [row + 1, e]) if p[0] < p[1]]
                break
    return out


def missing(a: Ranges, n: int) -> list[int]:
    """The offsets of [0, n) that `a` does not cover (cost: the ranges plus what is missing)."""
    out, at = [], 0
    for s, e in a:
        out += range(at, min(s, n))
        at = max(at, e)
    out += range(at, n)
    return out


def contains(a: Ranges, row: int) -> bool:
    return any(s <= row < e for s, e in a)


def count(a: Ranges) -> int:
    return sum(e - s for s, e in a)


def digest(keys: Iterable[str]) -> str:
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(key.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def commit_name(run_id: str, positions: Iterable[tuple[str, int, int]]) -> str:
    """part-<digest of the run and the positions>: a retried task of the same run rewrites the same
    objects; a later run redoing the same positions writes new ones, which supersede the old."""
    return "part-" + digest([run_id] + [f"{f}\0{g}\0{i}" for f, g, i in positions])


# ---------------------------------------------------------------- records


@dataclasses.dataclass
class Record:
    """One commit: the positions it accounts for and what became of them."""

    name: str  # part-<digest>
    run_id: str
    written: int  # output rows in OUTPUT/<name>.parquet
    error_rows: int  # rows in OUTPUT/_errors/<name>.parquet
    data: bool  # whether the data file exists
    errors: list[list[Any]] = dataclasses.field(default_factory=list)  # [file, row_group, row, kind]
    rows: dict[str, dict[str, Ranges]] = dataclasses.field(default_factory=dict)  # file -> group -> ranges

    def positions(self) -> Iterator[tuple[str, int, Ranges]]:
        for path, groups in self.rows.items():
            for group, ranges in groups.items():
                yield path, int(group), ranges

    def last_object(self) -> str | None:
        """Which object's existence completes the commit: 'data', 'errors' or None (record only)."""
        return "data" if self.data else ("errors" if self.error_rows else None)


def error_kind(row: dict[str, Any]) -> str:
    if row.get("stage") == "duplicate":
        return DUPLICATE
    return RETRYABLE if row.get("retryable") else PERMANENT


def commit(output: str, run_id: str, name: str, outputs: list[dict], errors: list[dict],
           positions: Iterable[tuple[str, int, int]], output_schema: pa.Schema) -> Record:
    """Commit one batch: record, then error rows, then output rows, each one atomic object.

    `positions` are the (file, row group, row) this batch accounts for; `errors` rows carry
    sample_id, source_file, row_group, row, stage, reason, retryable."""
    rows: dict[str, dict[str, Ranges]] = collections.defaultdict(dict)
    by_group: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for path, group, row in positions:
        by_group[(path, group)].append(row)
    for (path, group), offsets in by_group.items():
        rows[path][str(group)] = to_ranges(offsets)
    record = Record(name, run_id, len(outputs), len(errors), bool(outputs),
                    [[e["source_file"], e["row_group"], e["row"], error_kind(e)] for e in errors], dict(rows))
    storage.write_json_atomic(storage.join(output, COMMITS_DIR, f"{name}.json"), dataclasses.asdict(record))
    if errors:
        table = pa.Table.from_pylist([dict(e, run_id=run_id) for e in errors], schema=schema.ERROR)
        storage.write_table_atomic(table, storage.join(output, ERRORS_DIR, f"{name}.parquet"))
    if outputs:
        storage.write_table_atomic(pa.Table.from_pylist(outputs, schema=output_schema),
                                   storage.join(output, f"{name}.parquet"))
    return record


# ---------------------------------------------------------------- the ledger of one output


@dataclasses.dataclass
class FileInfo:
    """What the index knows of an input file: its size when seen, rows per row group, and the
    positions done (all of them: done=True)."""

    size: int
    row_groups: list[int]
    done: bool = False
    partial: dict[str, Ranges] = dataclasses.field(default_factory=dict)


class Ledger:
    """The committed state of one output directory, loaded from its index and commit records."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.files: dict[str, FileInfo] = {}
        self.records: dict[str, Record] = {}  # compacted ones carry no rows
        self.fresh: set[str] = set()  # records read from _ledger/commits (not yet compacted)
        self.broken: list[Record] = []  # incomplete commits of a crashed run
        self.superseded: dict[str, set[tuple[str, int, int]]] = {}  # record -> error positions
        self.fresh_by_file: dict[str, list[tuple[str, str, int, Ranges]]] = {}
        self.folded: list[str] = []  # commit records already in the index, left by an interrupted compaction

    # ------------------------------------------------ loading

    @classmethod
    def load(cls, output: str) -> "Ledger":
        led = cls(output)
        if not storage.exists(output):
            return led
        index_path = storage.join(output, INDEX_FILE)
        if storage.exists(index_path):
            index = storage.read_json(index_path)
            led.files = {p: FileInfo(**f) for p, f in index["files"].items()}
            led.records = {r["name"]: Record(**r) for r in index["records"]}
        data = {_stem(p) for p in _listing(output)}
        errors = {_stem(p) for p in _listing(storage.join(output, ERRORS_DIR))}
        commit_files = _listing(storage.join(output, COMMITS_DIR), ".json")
        folded = {f for f in commit_files if _stem(f) in led.records}  # compaction stopped before deleting them
        led.folded = sorted(folded)
        for raw in storage.parallel_map(storage.read_json, [f for f in commit_files if f not in folded]):
            rec = Record(**raw)
            last = rec.last_object()
            if last is None or rec.name in (data if last == "data" else errors):
                led.records[rec.name] = rec
                led.fresh.add(rec.name)
            else:
                led.broken.append(rec)
        led._find_superseded()
        return led

    def _find_superseded(self) -> None:
        """Error entries whose position a newer commit accounts for (for an error about a whole
        file: any position of that file), and the fresh positions of each file."""
        self.fresh_by_file = collections.defaultdict(list)
        for name in self.fresh:
            rec = self.records[name]
            for path, group, ranges in rec.positions():
                self.fresh_by_file[path].append((rec.run_id, name, group, ranges))
        self.superseded = {}
        for rec in self.records.values():
            for path, group, row, _kind in rec.errors:
                if any(run > rec.run_id and other != rec.name
                       and (contains(ranges, row) if group == g else group == FILE_ROW_GROUP != g)
                       for run, other, g, ranges in self.fresh_by_file.get(path, ())):
                    self.superseded.setdefault(rec.name, set()).add((path, group, row))

    # ------------------------------------------------ planning

    def open_positions(self, retry_errors: bool) -> dict[tuple[str, int], set[int]]:
        """Positions accounted for but to be redone: retryable errors (every error but duplicates'
        first-occurrence checks with retry_errors), superseded entries excepted."""
        out: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
        for rec in self.records.values():
            gone = self.superseded.get(rec.name, set())
            for path, group, row, kind in rec.errors:
                if (path, group, row) not in gone and (kind == RETRYABLE or retry_errors):
                    out[(path, group)].add(row)
        return out

    def done_ranges(self, path: str, open_positions: dict[tuple[str, int], set[int]]) -> dict[int, Ranges]:
        """Row group -> settled row ranges of one input file (open_positions: to be redone)."""
        info = self.files.get(path)
        done: dict[int, Ranges] = {}
        if info is not None:
            if info.done:
                done = {g: [[0, n]] for g, n in enumerate(info.row_groups)}
                if not info.row_groups and FILE_ROW_GROUP not in done:
                    done[FILE_ROW_GROUP] = [[0, 1]]
            else:
                done = {int(g): list(r) for g, r in info.partial.items()}
        for _run, _name, group, ranges in self.fresh_by_file.get(path, ()):
            done[group] = union(done.get(group, []), ranges)
        for group in list(done):
            rows = open_positions.get((path, group))
            if rows:
                done[group] = subtract(done[group], rows)
        return done

    def known_row_groups(self, path: str, size: int) -> list[int] | None:
        """Rows per row group from the index when the file has not changed size, else None."""
        info = self.files.get(path)
        return list(info.row_groups) if info is not None and info.size == size and info.row_groups else None

    def file_failed(self, path: str, size: int, open_positions: dict[tuple[str, int], set[int]]) -> bool:
        """The whole file is already an error (unchanged since, not to be retried)."""
        if 0 in open_positions.get((path, FILE_ROW_GROUP), set()):
            return False
        info = self.files.get(path)
        if info is not None and info.size != size:
            return False  # the file changed: look at it again
        return contains(self.done_ranges(path, open_positions).get(FILE_ROW_GROUP, []), 0)

    # ------------------------------------------------ counts

    def totals(self) -> tuple[int, int]:
        """(output rows, current error rows) committed."""
        rows = sum(r.written for r in self.records.values())
        errs = sum(r.error_rows - len(self.superseded.get(r.name, ())) for r in self.records.values())
        return rows, errs

    def committed_files(self) -> tuple[list[str], list[str]]:
        """Data and error files of the complete commits."""
        data = [storage.join(self.output, f"{r.name}.parquet") for r in self.records.values() if r.data]
        errs = [storage.join(self.output, ERRORS_DIR, f"{r.name}.parquet") for r in self.records.values()
                if r.error_rows]
        return data, errs

    def taken_ids(self, candidates: set[str], count_errors: bool = True, threads: int = 32) -> set[str]:
        """The candidate sample ids that committed rows already hold as a real outcome (an output
        row, or with count_errors an error that is neither a duplicate nor retryable), read one
        column at a time in parallel; the driver holds only the candidates."""
        if not candidates or not self.records:
            return set()
        data, errs = self.committed_files()
        errs = errs if count_errors else []
        lookup = pa.array(sorted(candidates), pa.string())

        def hits(item: tuple[str, bool]) -> set[str]:
            path, is_error = item
            cols = ["sample_id", "stage", "retryable"] if is_error else ["sample_id"]
            table = storage.read_table(path, columns=cols)
            mask = pc.is_in(table.column("sample_id"), value_set=lookup)
            if is_error:
                real = pc.and_(pc.not_equal(table.column("stage"), "duplicate"),
                               pc.invert(pc.fill_null(table.column("retryable"), False)))
                mask = pc.and_(mask, pc.fill_null(real, True))
            return set(pc.filter(table.column("sample_id"), mask).to_pylist())

        found: set[str] = set()
        for part in storage.parallel_map(hits, [(p, False) for p in data] + [(p, True) for p in errs], threads):
            found |= part
        return found

    # ------------------------------------------------ maintenance

    def discard_broken(self) -> int:
        """Delete the objects of commits a crash cut short, so their positions are redone cleanly."""
        for rec in self.broken:
            storage.remove(storage.join(self.output, ERRORS_DIR, f"{rec.name}.parquet"))
            storage.remove(storage.join(self.output, COMMITS_DIR, f"{rec.name}.json"))
        n, self.broken = len(self.broken), []
        return n

    def compact(self, inspected: dict[str, tuple[int, list[int]]]) -> None:
        """Fold the fresh records into the index, drop superseded error rows from their files, and
        delete the folded commit records. `inspected`: file -> (size, rows per row group) seen by
        this run. Safe to interrupt: the index is written before records are deleted, and loading
        takes the union of both."""
        self.refresh()  # a commit written after this run planned (a retried task) must count too
        for path, (size, groups) in inspected.items():
            old = self.files.get(path)
            if old is None:
                self.files[path] = FileInfo(size, list(groups))
            elif old.size != size or old.row_groups != groups:  # changed: committed positions stay committed
                cover = {str(g): [[0, n]] for g, n in enumerate(old.row_groups)} if old.done else dict(old.partial)
                self.files[path] = FileInfo(size, list(groups), partial=cover)
        self._prune_superseded()
        for name in sorted(self.fresh):
            for path, group, ranges in self.records[name].positions():
                info = self.files.setdefault(path, FileInfo(0, []))
                if not info.done:
                    info.partial[str(group)] = union(info.partial.get(str(group), []), ranges)
        for path, info in self.files.items():
            if not info.done and self._complete(info):
                info.done, info.partial = True, {}
        index = {"version": 1, "files": {p: dataclasses.asdict(f) for p, f in sorted(self.files.items())},
                 "records": [dict(dataclasses.asdict(r), rows={}) for _, r in sorted(self.records.items())]}
        storage.write_json_atomic(storage.join(self.output, INDEX_FILE), index)
        for name in self.fresh:
            self.records[name].rows = {}
            storage.remove(storage.join(self.output, COMMITS_DIR, f"{name}.json"))
        for path in self.folded:
            storage.remove(path)
        self.fresh, self.folded = set(), []

    def refresh(self) -> None:
        """Re-read the commit records written since load (this run's)."""
        latest = Ledger.load(self.output)
        self.records.update(latest.records)
        self.fresh |= latest.fresh
        self.folded = sorted(set(self.folded) | set(latest.folded))
        self._find_superseded()

    @staticmethod
    def _complete(info: FileInfo) -> bool:
        if str(FILE_ROW_GROUP) in info.partial:
            return not info.row_groups
        return bool(info.row_groups) and all(
            count(info.partial.get(str(g), [])) >= n for g, n in enumerate(info.row_groups))

    def _prune_superseded(self) -> None:
        for name, gone in self.superseded.items():
            rec = self.records[name]
            path = storage.join(self.output, ERRORS_DIR, f"{name}.parquet")
            if storage.exists(path):
                table = storage.read_table(path)
                keep = [i for i, (f, g, r) in enumerate(zip(table.column("source_file").to_pylist(),
                                                            table.column("row_group").to_pylist(),
                                                            table.column("row").to_pylist()))
                        if (f, g, r) not in gone]
                if keep:
                    storage.write_table_atomic(table.take(keep), path)
                else:
                    storage.remove(path)
            rec.errors = [e for e in rec.errors if (e[0], e[1], e[2]) not in gone]
            rec.error_rows = len(rec.errors)
            for path_, group, row in gone:  # the newer commit holds these positions now
                ranges = rec.rows.get(path_, {}).get(str(group))
                if ranges is not None:
                    rec.rows[path_][str(group)] = subtract(ranges, [row])
                info = self.files.get(path_)
                if info is not None and not info.done and str(group) in info.partial:
                    info.partial[str(group)] = subtract(info.partial[str(group)], [row])
                    if not info.partial[str(group)]:
                        del info.partial[str(group)]
        self.superseded = {}


def _listing(directory: str, suffix: str = ".parquet") -> list[str]:
    try:
        return storage.list_files(directory, suffix)
    except FileNotFoundError:
        return []


def _stem(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0]


def write_manifest(output: str, manifest: dict) -> str:
    path = storage.join(output, MANIFESTS_DIR, f"{manifest['run_id']}.json")
    storage.write_json_atomic(path, manifest)
    return path
