"""Keeping a row's fault to that row: the guard every stage call runs behind (runner.guarded).

- Out of memory (faults.is_out_of_memory): the rows are halved and each half run again, down to
  one row; a row that does not fit alone is a permanent error naming its size (the stage's
  `row_size(row)` method, else describe_size). `isolate` applies the same rule (halve_on_oom) to
  the chunks a stage cuts its batch into.
- Another transient fault: retried `retries` times, then the rows are halved. When both halves
  fail alike, the fault is the batch's surroundings (an outage) and every row is retryable;
  otherwise the search goes on in the half that failed, so only a row that fails alone with a
  transient fault is retryable.
- A crash (the worker process dies: a segfault, the out-of-memory killer, os._exit): before each
  call the guard writes an in-flight marker naming the rows (Markers: OUTPUT/_ledger/inflight/
  <run id>/<stage>/<digest>.json) and removes it after. Ray retries the task, or restarts the
  actor and retries its tasks (bounded: worker_retries), and a marker found at entry means those
  rows killed a worker: they are split in halves, each behind its own marker, down to one row; a
  row whose marker counts `deaths_per_row` deaths becomes an error row of stage 'crash'.
- A fault that poisons the process (faults.poisons_process: a CUDA device-side assert): inside a
  Ray worker the guard ends the process, so the rows are redone in a fresh one under the crash
  rule (the marker records why).
- Any other exception: permanent error rows naming the stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from eama.engine import faults, ledger, storage

log = logging.getLogger("eama.isolation")

Row = dict[str, Any]
Position = tuple[str, int, int]
P = TypeVar("P")
R = TypeVar("R")
S = TypeVar("S", bound=Sequence)

CRASH = "crash"  # the error stage of a row that kept killing its worker
INFLIGHT_DIR = f"{ledger.LEDGER_DIR}/inflight"


def fail(row: Row, stage: str, reason: str, retryable: bool = False) -> None:
    """Mark a work row as failed in `stage`; later stages pass it through."""
    row["error_stage"], row["error_reason"], row["error_retryable"] = stage, faults.redact(reason)[:2000], retryable


def pending(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not r.get("error_stage")]


def fail_table(batch: pa.Table, stage: str, reason: str, retryable: bool = False) -> pa.Table:
    """`batch` with every pending row failed in `stage`."""
    rows = batch.to_pylist()
    for r in pending(rows):
        fail(r, stage, reason, retryable)
    return pa.Table.from_pylist(rows, schema=batch.schema)


# ---------------------------------------------------------------- sizes


def describe_size(row: Row) -> str:
    """The default `row_size`: the largest values of a row (text in characters and words, lists in
    items, bytes with an image's pixels when they decode as one)."""
    sized = []
    for key, value in row.items():
        if key == "sample_id" or key.startswith(("error_", "source_", "seconds_")) or not value:
            continue
        if isinstance(value, str):
            sized.append((len(value), f"{key}: {len(value)} characters, {len(value.split())} words"))
        elif isinstance(value, (bytes, bytearray)):
            sized.append((len(value), f"{key}: {len(value)} bytes{_pixels(value)}"))
        elif isinstance(value, list):
            sized.append((len(value), f"{key}: {len(value)} items"))
    return "; ".join(text for _, text in sorted(sized, key=lambda s: -s[0])[:3]) or "no sizable values"


def _pixels(data: bytes) -> str:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return f", {img.width}x{img.height} = {img.width * img.height} pixels"
    except Exception:  # not an image
        return ""


def row_size_of(stage: Any) -> Callable[[Row], str]:
    """The stage's `row_size(row)` (on it, or on the object a bound method belongs to), else
    describe_size."""
    owner = getattr(stage, "__self__", stage)
    return getattr(stage, "row_size", None) or getattr(owner, "row_size", None) or describe_size


def too_big_reason(row: Row, row_size: Callable[[Row], str], exc: BaseException) -> str:
    return f"out of memory on this row alone ({row_size(row)}): {faults.describe(exc, 500)}"


# ---------------------------------------------------------------- halving


def halves(piece: S) -> tuple[S, S]:
    mid = len(piece) // 2
    return piece[:mid], piece[mid:]


def halve_on_oom(piece: S, call: Callable[[S], R], too_big: Callable[[S, BaseException], R],
                 join: Callable[[list[R]], R]) -> R:
    """call(piece); when it runs out of memory, call each half in turn, down to one row; a row that
    does not fit alone gets too_big(piece, exc). The one out-of-memory rule, for a stage's batch
    (Guard) and for the chunks inside a stage (isolate)."""
    try:
        return call(piece)
    except Exception as exc:
        if not faults.is_out_of_memory(exc):
            raise
        free_accelerator_memory()
        if len(piece) <= 1:
            return too_big(piece, exc)
        log.warning("out of memory on %d rows (%s): halving", len(piece), faults.describe(exc, 200))
        return join([halve_on_oom(half, call, too_big, join) for half in halves(piece)])


def free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # no torch, or no CUDA: nothing to free
        pass


def isolate(todo: list[Row], size: int, fn: Callable[[list[Row]], None], stage: str,
            row_size: Callable[[Row], str] | None = None) -> None:
    """Call `fn` on chunks of `size` rows. A chunk that runs out of memory is halved (halve_on_oom);
    a chunk that raises a permanent error is redone row by row, so only the rows that break it
    fail (with the exception); other transient faults propagate to the stage guard."""
    sizer = row_size or row_size_of(fn)

    def too_big(chunk: list[Row], exc: BaseException) -> None:
        fail(chunk[0], stage, too_big_reason(chunk[0], sizer, exc))

    for k in range(0, len(todo), size):
        halve_on_oom(todo[k:k + size], functools.partial(_chunk_or_rows, fn=fn, stage=stage), too_big, lambda _: None)


def _chunk_or_rows(chunk: list[Row], fn: Callable[[list[Row]], None], stage: str) -> None:
    """fn(chunk); on a permanent error, fn on each row alone, failing the rows that raise one."""
    chunk = pending(chunk)  # a chunk redone after out of memory keeps the rows that failed
    if not chunk:
        return
    try:
        fn(chunk)
        return
    except Exception as exc:
        if faults.is_transient(exc) or faults.is_out_of_memory(exc):
            raise
        if len(chunk) == 1:
            fail(chunk[0], stage, faults.describe(exc))
            return
    for r in chunk:
        try:
            fn([r])
        except Exception as inner:
            if faults.is_transient(inner) or faults.is_out_of_memory(inner):
                raise
            fail(r, stage, faults.describe(inner))


# ---------------------------------------------------------------- crash markers


@dataclasses.dataclass(frozen=True)
class Markers:
    """The in-flight markers of one stage in one run (see the module docstring). Only built for
    stages running in Ray workers: with markers, a poisoned process ends itself."""

    folder: str  # OUTPUT/_ledger/inflight/<run_id>/<stage>
    deaths_per_row: int = 2

    @classmethod
    def for_stage(cls, output: str, run_id: str, stage: str, deaths_per_row: int) -> "Markers":
        return cls(storage.join(output, INFLIGHT_DIR, run_id, stage), deaths_per_row)

    def path(self, positions: Sequence[Position]) -> str:
        return storage.join(self.folder, ledger.digest(f"{f}\0{g}\0{r}" for f, g, r in positions) + ".json")

    def read(self, path: str) -> dict[str, Any]:
        """{'deaths': workers that died running these rows, 'last': why, when known}"""
        try:
            return json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            return {"deaths": 0, "last": None}
        except ValueError:  # cut short: the worker died while writing it
            return {"deaths": 1, "last": None}
        except Exception as exc:  # unreachable after storage's retries: the rows run as if new
            log.warning("in-flight marker %s unreadable (%s)", path, faults.describe(exc, 200))
            return {"deaths": 0, "last": None}

    def write(self, path: str, deaths: int, last: str | None = None) -> None:
        data = json.dumps({"deaths": deaths, "last": last}).encode()
        if storage.is_remote(path):
            _best_effort(f"write {path}", lambda: storage.write_bytes_atomic(path, data))
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:  # no fsync: it must outlive the worker process, not the machine
            fh.write(data)

    def remove(self, path: str) -> None:
        if storage.is_remote(path):
            fs = storage.filesystem(path)
            _best_effort(f"remove {path}", lambda: storage.with_retries(f"remove {path}", lambda: fs.rm_file(
                storage.strip(path))))
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _best_effort(what: str, fn: Callable[[], Any]) -> None:
    """A marker the store refuses (after storage's retries) costs isolation, not the batch: a
    missing one lets a crash go unseen once more (Ray's retries stay bounded), a stale one splits
    rows that would have run whole."""
    try:
        fn()
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.warning("in-flight marker: %s failed (%s)", what, faults.describe(exc, 200))


def behind_marker(markers: Markers | None, piece: P, positions: Sequence[Position], run: Callable[[P], R],
                  split: Callable[[P], R], crashed: Callable[[P, str], R], stage: str) -> R:
    """run(piece) behind its in-flight marker. A marker found at entry means the piece killed its
    worker before: several positions are split(piece), each half behind its own marker (the
    piece's marker stays, so a redo splits at once); one position is run again until it has killed
    `deaths_per_row` workers, then it is crashed(piece, reason)."""
    if markers is None:
        return run(piece)
    path = markers.path(positions)
    seen = markers.read(path)
    if seen["deaths"] and len(positions) > 1:
        log.warning("stage %s: %d rows killed their worker before: splitting them", stage, len(positions))
        return split(piece)
    if seen["deaths"] >= markers.deaths_per_row:
        cause = seen["last"] or "a crash: a segfault, the out-of-memory killer or an exit"
        return crashed(piece, f"the {stage} worker died {seen['deaths']} times on this row ({cause})")
    markers.write(path, seen["deaths"] + 1)
    try:
        out = run(piece)
    except BaseException as exc:
        if faults.poisons_process(exc):
            markers.write(path, seen["deaths"] + 1, faults.describe(exc, 300))
            _end_process(stage, exc)
        markers.remove(path)
        raise
    markers.remove(path)
    return out


def _end_process(stage: str, exc: BaseException) -> None:
    """End this Ray worker, so that Ray restarts the actor (or retries the task) in a new process."""
    log.error("stage %s: %s poisons this process: ending it, the rows are redone in a new one", stage,
              faults.describe(exc, 300))
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(1)


def clear_markers(output: str) -> None:
    """Remove every in-flight marker of the output (at the end of a run, under its lease; markers
    left behind are never read again, as each run has its own folder)."""
    _best_effort("clearing in-flight markers", lambda: storage.remove(storage.join(output, INFLIGHT_DIR)))


def worker_retries(batch_rows: int, deaths_per_row: int, crashing_rows: int = 4) -> int:
    """Ray retries a task needs to isolate `crashing_rows` rows that each kill its worker: per row,
    one attempt per halving of the batch and `deaths_per_row` on the row alone."""
    return crashing_rows * (math.ceil(math.log2(max(1, batch_rows))) + deaths_per_row)


def positions(batch: pa.Table) -> list[Position]:
    return list(zip(batch.column("source_file").to_pylist(), batch.column("source_row_group").to_pylist(),
                    batch.column("source_row").to_pylist()))


# ---------------------------------------------------------------- the guard


@dataclasses.dataclass
class Guard:
    """How one stage's batches are run (module docstring). `call` takes and returns a batch of
    pending rows; `markers` is None outside Ray workers (no crash isolation there)."""

    name: str
    call: Callable[[pa.Table], pa.Table]
    retries: int = 2
    row_size: Callable[[Row], str] = describe_size
    markers: Markers | None = None

    def run(self, batch: pa.Table) -> pa.Table:
        """The stage on the batch's pending rows; failed rows pass through, the order is kept."""
        todo = pc.is_null(batch.column("error_stage"))
        flags = todo.to_pylist()
        if all(flags):
            return self._fit(batch, self.retries)
        if not any(flags):
            return batch
        where = [i for i, f in enumerate(flags) if f] + [i for i, f in enumerate(flags) if not f]
        merged = pa.concat_tables([self._fit(batch.filter(todo), self.retries), batch.filter(pc.invert(todo))])
        return merged.take(pc.sort_indices(pa.array(where)))

    def _fit(self, piece: pa.Table, retries: int, settle: bool = True) -> pa.Table:
        return halve_on_oom(piece, functools.partial(self._piece, retries=retries, settle=settle), self._too_big,
                            pa.concat_tables)

    def _piece(self, piece: pa.Table, retries: int, settle: bool) -> pa.Table:
        return behind_marker(self.markers, piece, positions(piece),
                             functools.partial(self._attempt, retries=retries, settle=settle),
                             self._each_half, self._crashed, self.name)

    def _each_half(self, piece: pa.Table) -> pa.Table:
        return pa.concat_tables([self._fit(half, self.retries) for half in halves(piece)])

    def _crashed(self, piece: pa.Table, reason: str) -> pa.Table:
        return fail_table(piece, CRASH, reason)

    def _too_big(self, piece: pa.Table, exc: BaseException) -> pa.Table:
        return fail_table(piece, self.name, too_big_reason(piece.to_pylist()[0], self.row_size, exc))

    def _attempt(self, piece: pa.Table, retries: int, settle: bool) -> pa.Table:
        """The stage on `piece`, transient faults retried. Out of memory, a poisoned process and
        (unless settle) a transient fault that outlived the retries propagate; anything else is
        settled into error rows."""
        try:
            return self._call(piece, retries)
        except Exception as exc:
            if faults.is_out_of_memory(exc) or (faults.poisons_process(exc) and self.markers is not None):
                raise
            if not settle and faults.is_transient(exc):
                raise
            return self._settle(piece, exc)

    def _call(self, piece: pa.Table, retries: int) -> pa.Table:
        for attempt in range(retries + 1):
            try:
                return checked(self.call(piece), piece, self.name)
            except Exception as exc:
                if (attempt == retries or not faults.is_transient(exc) or faults.is_out_of_memory(exc)
                        or faults.poisons_process(exc)):
                    raise
                log.warning("stage %s: transient fault (%s), retry %d/%d", self.name, faults.describe(exc, 300),
                            attempt + 1, retries)
                free_accelerator_memory()
                time.sleep(min(30.0, 2.0 ** (attempt + 1)))
        raise AssertionError("unreachable")

    def _settle(self, piece: pa.Table, exc: BaseException) -> pa.Table:
        """Error rows for a fault that outlived its retries: permanent ones for the whole piece; a
        transient one is retryable only for a row that fails alone (_bisect)."""
        if not faults.is_transient(exc):
            return fail_table(piece, self.name, faults.describe(exc))
        if piece.num_rows == 1:
            return fail_table(piece, self.name, faults.describe(exc), retryable=True)
        return self._bisect(piece, exc)

    def _bisect(self, piece: pa.Table, exc: BaseException) -> pa.Table:
        """Each half once: when both fail with a transient fault it is not a row's doing (every row
        retryable); else the half that failed is searched on."""
        parts, outcomes = halves(piece), []
        for part in parts:
            try:
                outcomes.append(self._fit(part, 0, settle=False))
            except Exception as inner:  # a transient fault: _attempt settles every other kind
                outcomes.append(inner)
        if all(isinstance(o, BaseException) for o in outcomes):
            return fail_table(piece, self.name, faults.describe(exc), retryable=True)
        return pa.concat_tables([o if isinstance(o, pa.Table) else self._settle(part, o)
                                 for part, o in zip(parts, outcomes)])


def checked(out: pa.Table, piece: pa.Table, name: str) -> pa.Table:
    """A stage keeps one row per row, in order."""
    if out.num_rows != piece.num_rows or out.column("source_row") != piece.column("source_row"):
        raise RuntimeError(f"stage {name} returned {out.num_rows} rows for {piece.num_rows} "
                           f"(a stage keeps one row per row, in order)")
    return out.cast(piece.schema) if out.schema != piece.schema else out


# ---------------------------------------------------------------- the stage wrappers Ray runs


def guarded(call: Callable[[pa.Table], pa.Table], batch: pa.Table, name: str, retries: int,
            markers: Markers | None = None, row_size: Callable[[Row], str] | None = None) -> pa.Table:
    """Run one stage on a batch behind its guard (Guard: out of memory halved, transient
    faults retried then searched for, crashes isolated, the rest error rows) and record the stage's
    busy seconds on the rows it served."""
    todo = pc.is_null(batch.column("error_stage"))
    served = max(1, pc.sum(pc.cast(todo, pa.int64())).as_py() or 0)
    started = time.perf_counter()
    out = Guard(name, call, retries, row_size or row_size_of(call), markers).run(batch)
    column = f"seconds_{name}"
    if column in out.column_names:
        share = (time.perf_counter() - started) / served
        values = pc.if_else(todo, pa.scalar(share, pa.float64()), out.column(column))
        out = out.set_column(out.schema.get_field_index(column), column, values)
    return out


def task_stage(label: str) -> Callable[..., pa.Table]:
    """A guarded task-stage function named `label` (the name Ray Data's progress shows)."""

    def run_stage(batch: pa.Table, fn: Callable[..., pa.Table], kwargs: dict[str, Any], name: str,
                  retries: int, markers: Markers | None = None) -> pa.Table:
        return guarded(functools.partial(fn, **kwargs), batch, name, retries, markers, row_size_of(fn))

    run_stage.__name__ = run_stage.__qualname__ = label
    return run_stage


class ActorStage:
    """An actor-pool member: builds the stage's class once, then guards every call."""

    def __init__(self, cls: type, kwargs: dict[str, Any], name: str, retries: int,
                 markers: Markers | None = None) -> None:
        self.impl, self.name, self.retries, self.markers = cls(**kwargs), name, retries, markers

    def __call__(self, batch: pa.Table) -> pa.Table:
        return guarded(self.impl, batch, self.name, self.retries, self.markers)
