"""The ledger: which input rows a job's output already accounts for, and the commit protocol.

An input row is a *position* (source file version, row group, row). Every commit accounts for a
set of positions, each as an output row (or rows, for jobs that emit several per input) or an
error row. Layout of an output directory (readable as one Parquet dataset by pyarrow, DuckDB or
Spark, which skip names starting with '_' or '.', such as a write in flight):

    OUTPUT/part-<digest>.parquet              output rows of one commit (thousands of rows)
    OUTPUT/_errors/part-<digest>.parquet      its error rows (sample_id, source_file, stage, reason, ...)
    OUTPUT/_ledger/commits/part-<digest>.json the commit's record: positions, counts, lease generation
    OUTPUT/_ledger/ids/part-<digest>.parquet  its sample ids as 8-byte hashes (id_index.py)
    OUTPUT/_ledger/ids/seg-<digest>.parquet   compacted id hashes, sorted
    OUTPUT/_ledger/index.json                 compacted records + what is known of each input file
    OUTPUT/_ledger/fence.json                 the lease generation that sealed the output last
    OUTPUT/_manifests/<run_id>.json           one manifest per run, written last
    OUTPUT/_lease/gen-<N>.json                the lease's claims (lease.py)

Commit protocol: the digest names the positions a commit holds, so a retried task rewrites the
same objects. The id file is written first, then the record, the error file and the data file,
each as one atomic object; a commit counts once its last object exists, so a crash between them
leaves a record that the next run discards (with its objects) and redoes. A record carries its
run's lease generation: one older than the fence (written after a newer run took the lease) is
void, and compaction removes it with its data. At the end of a run the records are compacted into
the index: per input file its version, row groups and the positions done; per commit its counts
and only the error entries a later run must redo (retryable ones); the rest stay in the error
files. Planning therefore reads one small index, lists the output, and looks new sample ids up in
the id index (8 bytes a committed row), reading committed sample ids only to confirm a hit.

A rewritten input file (another size, mtime or ETag) is planned afresh by sample id: ids it still
holds stay done, new ids are processed, and ids it no longer holds are reported.

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
import time
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from eama.engine import id_index, schema, storage

log = logging.getLogger("eama.ledger")

ERRORS_DIR = "_errors"
MANIFESTS_DIR = "_manifests"
LEDGER_DIR = "_ledger"
COMMITS_DIR = f"{LEDGER_DIR}/commits"
INDEX_FILE = f"{LEDGER_DIR}/index.json"
FENCE_FILE = f"{LEDGER_DIR}/fence.json"
MAX_SEGMENTS = id_index.MAX_SEGMENTS
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
    generation: int = 0  # the lease generation of the run that wrote it (the fencing token)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> the version its positions index
    ids: int = -1  # ids in its id-index file (-1: written before the id index existed)
    errors_in_file: bool = False  # only retryable entries are listed; the rest live in its error file

    def positions(self) -> Iterator[tuple[str, int, Ranges]]:
        for path, groups in self.rows.items():
            for group, ranges in groups.items():
                yield path, int(group), ranges

    def last_object(self) -> str | None:
        """Which object's existence completes the commit: 'data', 'errors' or None (record only)."""
        return "data" if self.data else ("errors" if self.error_rows else None)

    def indexes(self, path: str, version: str | None) -> bool:
        """Whether this record's positions in `path` refer to that version of the file."""
        mine = self.versions.get(path)
        return mine is None or version is None or mine == version


def error_kind(row: dict[str, Any]) -> str:
    if row.get("stage") == "duplicate":
        return DUPLICATE
    return RETRYABLE if row.get("retryable") else PERMANENT


def commit(output: str, run_id: str, name: str, outputs: list[dict], errors: list[dict],
           positions: Iterable[tuple[str, int, int]], output_schema: pa.Schema, generation: int = 0,
           versions: dict[str, str] | None = None) -> Record:
    """Commit one batch: id index, record, then error rows, then output rows, each one atomic object.

    `positions` are the (file, row group, row) this batch accounts for; `errors` rows carry
    sample_id, source_file, row_group, row, stage, reason, retryable. `generation` is the lease's
    fencing token; `versions` the version of each input file the positions refer to."""
    rows: dict[str, dict[str, Ranges]] = collections.defaultdict(dict)
    by_group: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for path, group, row in positions:
        by_group[(path, group)].append(row)
    for (path, group), offsets in by_group.items():
        rows[path][str(group)] = to_ranges(offsets)
    out_ids = [r["sample_id"] for r in outputs if r.get("sample_id")]
    err_ids = [e["sample_id"] for e in errors if e.get("sample_id") and error_kind(e) == PERMANENT]
    n_ids = id_index.write_commit_ids(output, name, out_ids, err_ids) if out_ids or err_ids else 0
    record = Record(name, run_id, len(outputs), len(errors), bool(outputs),
                    [[e["source_file"], e["row_group"], e["row"], error_kind(e)] for e in errors], dict(rows),
                    generation, {p: v for p, v in (versions or {}).items() if p in rows}, n_ids)
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
    """What the index knows of an input file: its version (size + mtime or ETag) and size when
    seen, rows per row group, and the positions done (all of them: done=True)."""

    size: int
    row_groups: list[int]
    done: bool = False
    partial: dict[str, Ranges] = dataclasses.field(default_factory=dict)
    version: str | None = None  # None: indexed before versions were kept (compared by size)
    failed: bool | None = None  # the whole file is an error (None: an index older than this field)

    def same(self, size: int, version: str | None) -> bool:
        """Whether the listed file is the version this entry describes."""
        if self.version is not None and version is not None:
            return self.version == version
        return self.size in (-1, size)  # -1: only known from commit records so far


class Ledger:
    """The committed state of one output directory, loaded from its index and commit records."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.files: dict[str, FileInfo] = {}
        self.records: dict[str, Record] = {}  # compacted ones carry no rows
        self.fresh: set[str] = set()  # records read from _ledger/commits (not yet compacted)
        self.broken: list[Record] = []  # incomplete commits of a crashed run
        self.void: list[Record] = []  # commits of a run that had lost its lease (older than the fence)
        self.orphans: list[str] = []  # data / error files no commit record names
        self.superseded: dict[str, set[tuple[str, int, int]]] = {}  # record -> error positions
        self.fresh_by_file: dict[str, list[tuple[tuple[int, str], str, int, Ranges]]] = {}
        self.folded: list[str] = []  # commit records already in the index, left by an interrupted compaction
        self.segments: list[str] = []  # id-index segments (id_index.py)
        self.fence = 0  # records of an older lease generation written after this one sealed are void
        self.versions: dict[str, str] = {}  # the input files' versions of the run planning (set_versions)
        self._loaded_errors = False

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
            led.segments = list(index.get("id_segments", []))
        if storage.exists(fence_path := storage.join(output, FENCE_FILE)):
            led.fence = int(storage.read_json(fence_path)["generation"])
        data = {_stem(p) for p in _listing(output)}
        errors = {_stem(p) for p in _listing(storage.join(output, ERRORS_DIR))}
        commit_files = _listing(storage.join(output, COMMITS_DIR), ".json")
        folded = {f for f in commit_files if _stem(f) in led.records}  # compaction stopped before deleting them
        led.folded = sorted(folded)
        for raw in storage.parallel_map(storage.read_json, [f for f in commit_files if f not in folded]):
            rec = Record(**raw)
            last = rec.last_object()
            if rec.generation < led.fence:
                led.void.append(rec)
            elif last is None or rec.name in (data if last == "data" else errors):
                led.records[rec.name] = rec
                led.fresh.add(rec.name)
            else:
                led.broken.append(rec)
        known = set(led.records) | {r.name for r in led.broken}
        id_parts = {_stem(p) for p in _listing(storage.join(output, id_index.IDS_DIR)) if "/part-" in p}
        led.orphans = ([storage.join(output, f"{n}.parquet") for n in sorted(data - known)]
                       + [storage.join(output, ERRORS_DIR, f"{n}.parquet") for n in sorted(errors - known)]
                       + [id_index.commit_file(output, n) for n in sorted(id_parts - known - set(led.records))])
        led._find_superseded()
        return led

    def set_versions(self, versions: dict[str, str]) -> None:
        """The listed version of each input file: positions of another version no longer count."""
        self.versions = dict(versions)
        self._find_superseded()

    def changed(self, path: str, size: int, version: str | None) -> bool:
        """Whether an input file the index knows has been rewritten since."""
        info = self.files.get(path)
        return info is not None and not info.same(size, version)

    def _find_superseded(self) -> None:
        """Error entries whose position a newer commit accounts for (for an error about a whole
        file: any position of that file), and the fresh positions of each file."""
        self.fresh_by_file = collections.defaultdict(list)
        for name in self.fresh:
            rec = self.records[name]
            for path, group, ranges in rec.positions():
                if rec.indexes(path, self.versions.get(path)):
                    self.fresh_by_file[path].append(((rec.generation, rec.run_id), name, group, ranges))
        self.superseded = {}
        for rec in self.records.values():
            for path, group, row, _kind in rec.errors:
                if not rec.indexes(path, self.versions.get(path)):
                    continue
                if any(run > (rec.generation, rec.run_id) and other != rec.name
                       and (contains(ranges, row) if group == g else group == FILE_ROW_GROUP != g)
                       for run, other, g, ranges in self.fresh_by_file.get(path, ())):
                    self.superseded.setdefault(rec.name, set()).add((path, group, row))

    def load_error_entries(self, threads: int = 32) -> None:
        """Read the permanent and duplicate error entries compaction left in the error files (only
        a run with retry_errors needs them)."""
        if self._loaded_errors:
            return
        todo = [r for r in self.records.values() if r.errors_in_file and r.error_rows]
        cols = ["source_file", "row_group", "row", "stage", "retryable"]

        def entries(rec: Record) -> list[list[Any]]:
            path = storage.join(self.output, ERRORS_DIR, f"{rec.name}.parquet")
            if not storage.exists(path):
                return []
            return [[e["source_file"], e["row_group"], e["row"], error_kind(e)]
                    for e in storage.read_table(path, cols).to_pylist()]

        for rec, found in zip(todo, storage.parallel_map(entries, todo, threads)):
            rec.errors = found
            rec.errors_in_file = False
        self._loaded_errors = True
        self._find_superseded()

    @classmethod
    def open_for_run(cls, output: str, generation: int, overwrite: bool = False) -> "Ledger":
        """The ledger a run that just took the lease (`generation`) plans against: an overwrite
        asked for, or one a kill cut short, finished first; commits a crash cut short discarded;
        the output sealed at this generation."""
        if overwrite or storage.exists(storage.join(output, OVERWRITE_MARK)):
            if not overwrite:
                log.warning("an --overwrite of %s was cut short: finishing it before this run", output)
            clear_output(output)
        led = cls.load(output)
        if (broken := led.discard_broken()):
            log.info("discarded %d commits a crash cut short; their rows are redone", broken)
        led.seal(generation)
        return led

    def commit_settled(self, run_id: str, generation: int, errors: list[dict], settled: list[tuple[str, int, int]],
                       versions: dict[str, str]) -> None:
        """Commit what planning settles by itself: error rows of unusable files, and the positions
        of rewritten files whose sample ids are committed already (no new row)."""
        positions = [(e["source_file"], e["row_group"], e["row"]) for e in errors] + list(settled)
        if positions:
            commit(self.output, run_id, commit_name(run_id, positions), [], errors, positions, schema.ERROR,
                   generation, versions)

    # ------------------------------------------------ planning

    def open_positions(self, retry_errors: bool) -> dict[tuple[str, int], set[int]]:
        """Positions accounted for but to be redone: retryable errors (every error but duplicates'
        first-occurrence checks with retry_errors), superseded entries excepted."""
        if retry_errors:
            self.load_error_entries()
        out: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
        for rec in self.records.values():
            gone = self.superseded.get(rec.name, set())
            for path, group, row, kind in rec.errors:
                if (path, group, row) not in gone and (kind == RETRYABLE or retry_errors) \
                        and rec.indexes(path, self.versions.get(path)):
                    out[(path, group)].add(row)
        return out

    def done_ranges(self, path: str, open_positions: dict[tuple[str, int], set[int]]) -> dict[int, Ranges]:
        """Row group -> settled row ranges of one input file (open_positions: to be redone). A file
        whose listed version differs from the indexed one starts from nothing."""
        info = self.files.get(path)
        version = self.versions.get(path)
        done: dict[int, Ranges] = {}
        if info is not None and (version is None or info.version is None or info.version == version):
            if info.done:
                done = {g: [[0, n]] for g, n in enumerate(info.row_groups)}
                if not info.row_groups and info.failed is not False:
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

    def known_row_groups(self, path: str, size: int, version: str | None = None) -> list[int] | None:
        """Rows per row group from the index when the file is unchanged (an empty file: []), else None."""
        info = self.files.get(path)
        if info is None or not info.same(size, version):
            return None
        if not info.row_groups and (not info.done or info.failed is not False):
            return None  # a file that failed as a whole (file_failed decides), or not seen whole
        return list(info.row_groups)

    def file_failed(self, path: str, size: int, open_positions: dict[tuple[str, int], set[int]],
                    version: str | None = None) -> bool:
        """The whole file is already an error (unchanged since, not to be retried)."""
        if 0 in open_positions.get((path, FILE_ROW_GROUP), set()):
            return False
        info = self.files.get(path)
        if info is not None and not info.same(size, version):
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

    def taken_ids(self, candidates: set[str], count_errors: bool = True, threads: int = 32) -> dict[str, str | None]:
        """The candidate sample ids that committed rows already hold as a real outcome (an output
        row, or with count_errors an error that is neither a duplicate nor retryable), each with
        the input file it came from (None where the output does not say). The id index names the
        few commits that may hold a candidate; only their sample ids are read, to confirm."""
        if not candidates or not self.records:
            return {}
        kinds = (id_index.OUTPUT, id_index.ERROR) if count_errors else (id_index.OUTPUT,)
        wanted = np.unique(id_index.hashes(candidates))
        fresh = {n: id_index.commit_file(self.output, n) for n in self.fresh if self.records[n].ids > 0}
        names = id_index.lookup(self.output, self.segments, fresh, wanted, kinds, threads)
        names |= {n for n, r in self.records.items() if r.ids < 0}  # written before the id index
        lookup = pa.array(sorted(candidates), pa.string())
        items = [(storage.join(self.output, f"{n}.parquet"), False) for n in sorted(names) if self.records[n].data]
        if count_errors:
            items += [(storage.join(self.output, ERRORS_DIR, f"{n}.parquet"), True)
                      for n in sorted(names) if self.records[n].error_rows]

        def hits(item: tuple[str, bool]) -> dict[str, str | None]:
            path, is_error = item
            names_ = storage.read_schema(path).names
            cols = ["sample_id"] + [c for c in ("source_file", "stage", "retryable") if c in names_]
            table = storage.read_table(path, columns=cols)
            mask = pc.is_in(table.column("sample_id"), value_set=lookup)
            if is_error:
                real = pc.and_(pc.not_equal(table.column("stage"), "duplicate"),
                               pc.invert(pc.fill_null(table.column("retryable"), False)))
                mask = pc.and_(mask, pc.fill_null(real, True))
            found = table.filter(mask)
            src = found.column("source_file").to_pylist() if "source_file" in cols else [None] * found.num_rows
            return dict(zip(found.column("sample_id").to_pylist(), src))

        taken: dict[str, str | None] = {}
        for part in storage.parallel_map(hits, items, threads):
            for sid, src in part.items():
                taken.setdefault(sid, src)
        return taken

    def ids_from(self, path: str, threads: int = 32) -> set[str]:
        """Every sample id committed (output or error row) from input file `path`: read only when
        that file changed, to report the ids its new version no longer holds."""
        data, errs = self.committed_files()

        def ids(file: str) -> set[str]:
            if not storage.exists(file) or "source_file" not in storage.read_schema(file).names:
                return set()
            table = storage.read_table(file, columns=["sample_id", "source_file"])
            return set(table.filter(pc.equal(table.column("source_file"), path)).column("sample_id").to_pylist())

        out: set[str] = set()
        for part in storage.parallel_map(ids, data + errs, threads):
            out |= part
        out.discard(None)
        return out

    # ------------------------------------------------ maintenance

    def discard_broken(self) -> int:
        """Delete the objects of commits a crash cut short, so their positions are redone cleanly."""
        for rec in self.broken:
            self._remove_commit(rec.name, data=False)
        n, self.broken = len(self.broken), []
        return n

    def _remove_commit(self, name: str, data: bool) -> None:
        if data:
            storage.remove(storage.join(self.output, f"{name}.parquet"))
        storage.remove(storage.join(self.output, ERRORS_DIR, f"{name}.parquet"))
        storage.remove(id_index.commit_file(self.output, name))
        storage.remove(storage.join(self.output, COMMITS_DIR, f"{name}.json"))

    def seal(self, generation: int) -> None:
        """Called by a run that just took the lease (generation N): fold what older runs committed
        into the index, then write the fence, so a commit an older run makes from now on is void."""
        if any(self.records[n].generation < generation for n in self.fresh):
            self.compact({})
        storage.write_json_atomic(storage.join(self.output, FENCE_FILE), {"generation": generation})
        self.fence = generation

    def compact(self, inspected: dict[str, tuple[int, list[int], str | None]]) -> None:
        """Fold the fresh records into the index, drop superseded error rows from their files,
        merge the commits' id files into a segment, remove void commits and orphan files, and
        delete the folded commit records. `inspected`: file -> (size, rows per row group, version)
        seen by this run. Safe to interrupt: the index is written before anything is deleted, and
        loading takes the union of both."""
        self.refresh()  # a commit written after this run planned (a retried task) must count too
        for path, (size, groups, version) in inspected.items():
            old = self.files.get(path)
            if old is None or not old.same(size, version):  # new, or rewritten: its old positions are void
                self.files[path] = FileInfo(size, list(groups), version=version)
            else:
                old.size, old.version, old.row_groups = size, version, list(groups)
        self._prune_superseded()
        for name in sorted(self.fresh):
            rec = self.records[name]
            for path, group, ranges in rec.positions():
                info = self.files.setdefault(path, FileInfo(-1, [], version=rec.versions.get(path)))
                if not info.done and rec.indexes(path, info.version):
                    info.partial[str(group)] = union(info.partial.get(str(group), []), ranges)
        for path, info in self.files.items():
            if info.version is None and path in self.versions:
                info.version = self.versions[path]
            if not info.done and self._complete(info):
                info.failed = str(FILE_ROW_GROUP) in info.partial
                info.done, info.partial = True, {}
        merged_segments = self.segments if len(self.segments) >= MAX_SEGMENTS else []
        parts = {n: id_index.commit_file(self.output, n) for n in self.fresh if self.records[n].ids > 0}
        if parts or merged_segments:
            new_segment = id_index.merge(self.output, parts, merged_segments)
            self.segments = [s for s in self.segments if s not in merged_segments] + [new_segment]
        for name in self.fresh if not self._loaded_errors else ():  # keep only what a run must redo
            rec = self.records[name]
            rec.errors = [e for e in rec.errors if e[3] == RETRYABLE]
            rec.errors_in_file = rec.error_rows > len(rec.errors)
        index = {"version": 2, "files": {p: dataclasses.asdict(f) for p, f in sorted(self.files.items())},
                 "records": [dict(dataclasses.asdict(r), rows={}) for _, r in sorted(self.records.items())],
                 "id_segments": self.segments}
        storage.write_json_atomic(storage.join(self.output, INDEX_FILE), index)
        for seg in merged_segments:
            storage.remove(id_index.segment_path(self.output, seg))
        for name in self.fresh:
            self.records[name].rows = {}
            storage.remove(id_index.commit_file(self.output, name))
            storage.remove(storage.join(self.output, COMMITS_DIR, f"{name}.json"))
        for path in self.folded:
            storage.remove(path)
        for rec in self.void:
            log.warning("removed commit %s of run %s: written after that run lost the output's lease", rec.name,
                        rec.run_id)
            self._remove_commit(rec.name, data=True)
        for path in self.orphans:
            log.warning("removed %s: no commit names it (written by a run that lost its lease or crashed)", path)
            storage.remove(path)
        self.fresh, self.folded, self.void, self.orphans = set(), [], [], []

    def refresh(self) -> None:
        """Re-read the commit records written since load (this run's)."""
        latest = Ledger.load(self.output)
        self.records.update({n: latest.records[n] for n in latest.fresh})  # compacted ones stay as loaded
        self.fresh |= latest.fresh
        self.folded = sorted(set(self.folded) | set(latest.folded))
        self.void, self.orphans = latest.void, latest.orphans
        self._find_superseded()

    @staticmethod
    def _complete(info: FileInfo) -> bool:
        if str(FILE_ROW_GROUP) in info.partial:
            return not info.row_groups
        if not info.row_groups:
            return info.size >= 0 and info.version is not None  # an empty file, seen whole (-1: known from commits only)
        return all(count(info.partial.get(str(g), [])) >= n for g, n in enumerate(info.row_groups))

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
            rec.error_rows -= len(gone)
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


OVERWRITE_MARK = "_overwrite.json"  # written before an overwrite deletes anything, removed last
LEASE_DIR = "_lease"  # lease.py's claims, which an overwrite keeps


def clear_output(output: str) -> None:
    """Remove everything under `output` but the lease: first a tombstone, then the data, the
    ledger last, then the tombstone. A run that finds a tombstone (an overwrite killed part-way)
    finishes the clearing before it plans, so no committed position is ever left without its rows."""
    if not storage.exists(output):
        return
    mark = storage.join(output, OVERWRITE_MARK)
    storage.write_json_atomic(mark, {"overwrite_started": time.time()})
    fs, raw = storage.filesystem(output), storage.strip(output)
    keep = {LEASE_DIR, OVERWRITE_MARK, LEDGER_DIR}
    for entry in fs.ls(raw, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
            fs.rm(entry, recursive=True)
    storage.remove(storage.join(output, LEDGER_DIR))
    storage.remove(mark)


def _listing(directory: str, suffix: str = ".parquet") -> list[str]:
    try:
        return storage.list_files(directory, suffix, literal=True)
    except FileNotFoundError:
        return []


def _stem(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0]


def write_manifest(output: str, manifest: dict) -> str:
    path = storage.join(output, MANIFESTS_DIR, f"{manifest['run_id']}.json")
    storage.write_json_atomic(path, manifest)
    return path
