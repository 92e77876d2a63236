"""The exactly-once batch runner: one way to write a Ray Data job over Parquet input.

A job declares a `BatchJob`: its input contract, its stages (callables run as CPU tasks or as
CPU / GPU actor pools, sized by the job's resource plan), how a finished work row becomes output
rows, and its output schema. `run` then does the rest:

1. takes the output's lease (lease.py: a second run on the same output refuses);
2. plans against the ledger (ledger.py): input files whose rows are all accounted for are skipped
   without being read; a changed or new file's footer is read (in parallel); only the pending
   positions of each row group are read; a sample id seen earlier in the input, or already
   committed as a real outcome, becomes a 'duplicate' error row;
3. streams read -> stages -> commit on Ray Data. The read holds at most `read_slice_bytes` of a
   row group at a time (reading.py). Every stage call runs behind a guard (isolation.py) that
   keeps a row's fault to that row: out of memory halves the rows down to one (a row that does
   not fit alone is a permanent error naming its size); a transient fault (faults.is_transient)
   is retried `transient_retries` times and then searched for by halving, so only a row that
   fails alone with it is retryable (the next run redoes it), unless the whole batch fails alike;
   any other exception becomes permanent error rows naming the stage. A row that kills its worker
   process (a segfault, the OOM killer, a CUDA device-side assert, after which the guard ends the
   process) is found by in-flight markers and halving over Ray's bounded retries, in the read
   and in every stage, and becomes an error row of stage 'crash' after `deaths_per_row` deaths:
   no row makes a run loop forever. Commits hold `commit_rows` rows;
4. compacts the ledger, writes the run manifest, releases the lease.

Rows in = output rows + error rows, for every run and for the output as a whole.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import time
import uuid
import warnings
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from eama.engine import blobs, faults, isolation, ledger, reading, schema, storage
from eama.engine.isolation import ActorStage, guarded, task_stage  # noqa: F401 - the stage guard
from eama.engine.isolation import fail, isolate, pending  # noqa: F401 - the stages' API (runner.fail, ...)
from eama.engine.reading import read_positions
from eama.engine import lease as output_lease
from eama.engine.training.progress import clock

log = logging.getLogger("eama.runner")
# retries are bounded through map_batches' ray_remote_args (max_retries, max_restarts, max_task_retries):
# Ray 2.60 deprecates them but offers no named parameter for these yet
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

Row = dict[str, Any]


@dataclasses.dataclass
class RunnerConfig:
    """Settings every batch job shares (each job's config extends this)."""

    input: str = ""  # Parquet file, directory or glob, local or s3://
    output: str = ""  # output directory, local or s3://
    overwrite: bool = False  # discard the committed output and redo everything
    retry_errors: bool = False  # also redo committed permanent error rows (retryable ones always are)
    commit_rows: int = 2000  # rows per committed file; a crash loses at most the uncommitted ones
    batch_size: int = 8  # rows per block between stages
    on_bad_shard: str = "continue"  # continue (an error row per unusable file) | fail
    transient_retries: int = 2  # retries of a batch hit by a transient fault before it is halved to find the row
    deaths_per_row: int = 2  # a row whose stage worker process died this often is an error row (stage 'crash')
    worker_retries: int = 0  # Ray's retries of a task whose worker died; 0: enough to isolate 4 crashing rows of a task
    actor_restarts: int = 100  # restarts of one stage actor over a run, after which the run fails
    read_slice_bytes: int = 256 << 20  # the most bytes of a row group one read holds (by the file's bytes per row)
    lease_seconds: float = 300.0  # the output lease lapses this long after its holder stops renewing it
    wait_for_resources_seconds: float = 900.0  # how long to wait for the autoscaler to add what the plan needs
    planning_threads: int = 32  # parallel footer / id reads while planning


@dataclasses.dataclass
class Stage:
    """One step of a job. A function stage runs as Ray tasks; a class stage (actors > 0) runs as an
    actor pool whose members construct the class once (load a model) and call it per batch. A GPU
    pool with min_actors < actors starts with min_actors and grows to `actors` as GPUs join
    (min_actors 0: the run decides from the GPUs up when it starts, gpu_pools). A stage takes and
    returns a pyarrow batch in the job's work schema, one row out per row in; rows whose
    error_stage is set must pass through unchanged."""

    name: str
    fn: Callable[..., pa.Table] | type
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    actors: int = 0
    cpus: float = 0.25
    gpus: float = 0.0
    batch_size: int | None = None  # None: the job's batch_size
    min_actors: int = 0  # the pool's lower bound; 0: `actors` for a CPU pool, gpu_pools decides for a GPU one

    def describe(self) -> str:
        low = f"{self.min_actors}-" if 0 < self.min_actors < self.actors else ""
        kind = f"{low}{self.actors} actors x {self.cpus} CPU" if self.actors else f"tasks x {self.cpus} CPU"
        return kind + (f" + {self.gpus} GPU" if self.gpus else "")


@dataclasses.dataclass
class Attachment:
    """A second output beside the job's rows, for values too large to repeat in them (blobs.py):
    OUTPUT/<folder>/<commit name>.parquet, written just before the commit it belongs to. A crash
    between the two leaves a file no commit names, and the redone commit writes the same rows
    again: readers keep one copy of a key (blobs.BlobTable)."""

    folder: str
    schema: pa.Schema
    emit: Callable[[Row], list[Row]]  # attachment rows of one finished work row
    key: str = "sample_id"

    def __post_init__(self) -> None:
        if not self.folder.startswith("_"):  # else Parquet readers of OUTPUT take its files for output rows
            raise ValueError(f"attachment folder {self.folder!r} must start with '_'")


@dataclasses.dataclass
class BatchJob:
    """What a job declares; `run` supplies planning, exactly-once commits, errors and the manifest."""

    name: str
    input_schema: pa.Schema  # the input contract (schema.check_schema / conform)
    required: tuple[str, ...]  # columns an input file must have
    work_schema: pa.Schema  # schema.work_schema(...): what flows between stages
    output_schema: pa.Schema
    stages: list[Stage]
    emit: Callable[[Row], list[Row]]  # output rows of one finished work row ([]: accounted, no output)
    prepare: Callable[[Row], str | None] | None = None  # per-row check after read: a reason = error row
    check_table: Callable[[pa.Table, str], None] | None = None  # extra per-row-group contract check
    stats: Callable[[list[Row]], dict[str, Any]] | None = None  # job counters summed into the manifest
    rates: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # counts derived from the summed ones (a hit rate)
    io_cpus: float = 0.25  # per read and commit task
    describe: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra manifest fields
    attachments: Sequence[Attachment] = ()


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclasses.dataclass
class ModelJobConfig(RunnerConfig):
    """A batch job that runs one trained model per actor (tag_entities, extract_keyphrases)."""

    model: str = ""  # the trained model's export folder (RUNS/NAME/export), local or s3://
    device: str = "auto"  # auto | cuda | cpu
    actors: int = 0  # model replicas; 0 = one per GPU (or one per 8 CPUs without GPUs)
    threads: int = 0  # torch threads per actor on CPU; 0 = the CPUs it reserves
    batch_size: int = 256


def validate_model_job(cfg: ModelJobConfig, job: str, trained_by: str) -> None:
    """The checks every model job needs before Ray starts (SystemExit naming what is wrong); makes
    the model path absolute, as the actors may run in another directory."""
    if not cfg.model:
        raise SystemExit(f"{job} needs --model (a {trained_by} export folder)")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"device must be auto, cuda or cpu, got {cfg.device!r}")
    check_input(cfg.input)
    cfg.model = model_folder(cfg.model)
    validate(cfg)


def check_input(path: str, error: type[SystemExit] = SystemExit) -> None:
    """`error` naming the input unless it exists (a glob is left to the listing)."""
    if not path or (not storage.exists(path) and not any(ch in path for ch in "*?[")):
        raise error(f"input not found: {path or '(none given: --input)'}")


def model_folder(path: str, key: str = "model", error: type[SystemExit] = SystemExit) -> str:
    """A model location made absolute (the actors may run in another directory); `error` naming
    `key` when a local folder is missing (s3:// and hub locations are checked when loaded)."""
    import os

    if not storage.is_remote(path) and not os.path.isdir(path):
        raise error(f"{key} not found: {path}")
    return storage.absolute(path)


def validate(cfg: RunnerConfig) -> None:
    if cfg.on_bad_shard not in ("continue", "fail"):
        raise SystemExit(f"on_bad_shard must be continue or fail, got {cfg.on_bad_shard!r}")
    if cfg.commit_rows < 1 or cfg.batch_size < 1:
        raise SystemExit("commit_rows and batch_size must be >= 1")
    if cfg.deaths_per_row < 1 or cfg.worker_retries < 0 or cfg.actor_restarts < 0 or cfg.read_slice_bytes < 1:
        raise SystemExit("deaths_per_row and read_slice_bytes must be >= 1, worker_retries and actor_restarts >= 0")
    if not cfg.output:
        raise SystemExit("an output path is needed (--output)")


# ---------------------------------------------------------------- planning


@dataclasses.dataclass
class Plan:
    items: list[Row]  # one per (file, row group) with pending rows
    file_errors: list[Row]  # error rows of unusable input files
    inspected: dict[str, tuple[int, list[int], str]]  # file -> (size, rows per row group, version) read this run
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> version listed
    changed: list[str] = dataclasses.field(default_factory=list)  # committed files rewritten since
    carried: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # rewritten files' rows already done
    vanished: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # ids a rewritten file no longer holds
    files: int = 0
    input_rows: int = 0
    pending_rows: int = 0
    files_done: int = 0
    duplicates: int = 0
    seconds: float = 0.0


def inspect_file(path: str, job: BatchJob) -> list[int]:
    """Rows per row group of an input file (footer only), after checking its columns."""
    schema.check_schema(storage.read_schema(path), job.input_schema, path, job.required)
    return storage.row_group_rows(path)


def plan_run(job: BatchJob, cfg: RunnerConfig, led: ledger.Ledger) -> Plan:
    """Which positions of the input still need work (see the module docstring)."""
    started = time.perf_counter()
    listing = storage.list_file_versions(cfg.input)
    plan = Plan([], [], {}, files=len(listing), versions={path: version for path, _, version in listing})
    led.set_versions(plan.versions)
    opened = led.open_positions(cfg.retry_errors)
    groups: dict[str, list[int]] = {}
    to_inspect = []
    for path, size, version in listing:
        known = led.known_row_groups(path, size, version)
        if known is not None:
            groups[path] = known
        elif led.file_failed(path, size, opened, version):
            plan.files_done += 1
        else:
            to_inspect.append((path, size, version))
            if led.changed(path, size, version):
                plan.changed.append(path)

    def look(item: tuple[str, int, str]) -> tuple[str, int, str, list[int] | None, BaseException | None]:
        try:
            return *item, inspect_file(item[0], job), None
        except Exception as exc:  # not Parquet, a contract column missing or mistyped, unreachable
            return *item, None, exc

    for path, size, version, sizes, exc in storage.parallel_map(look, to_inspect, cfg.planning_threads):
        if exc is None:
            groups[path] = sizes
            plan.inspected[path] = (size, sizes, version)
            if path in plan.changed:
                log.warning("input %s was rewritten since it was committed (%d -> %d bytes): planned again by "
                            "sample id (ids already done stay done, new ids are processed, ids it no longer "
                            "holds are reported)", path, led.files[path].size, size)
            continue
        if cfg.on_bad_shard == "fail" and not faults.is_transient(exc):
            raise SystemExit(f"unusable input shard: {path}: {faults.describe(exc)}")
        plan.inspected[path] = (size, [], version)
        plan.file_errors.append({"sample_id": None, "source_file": path, "row_group": ledger.FILE_ROW_GROUP,
                                 "row": 0, "stage": "read", "reason": faults.describe(exc),
                                 "retryable": faults.is_transient(exc)})

    wanted: list[tuple[str, int, list[int]]] = []  # (file, row group, pending offsets)
    for path in sorted(groups):
        done = led.done_ranges(path, opened)
        file_pending = 0
        for g, n in enumerate(groups[path]):
            plan.input_rows += n
            rows = ledger.missing(done.get(g, []), n)
            if rows:
                wanted.append((path, g, rows))
                file_pending += len(rows)
        plan.files_done += file_pending == 0
    plan.items = reading.split_items(mark_duplicates(wanted, led, cfg, plan),
                                    reading.bytes_per_row([(p, size) for p, size, _ in listing], groups),
                                    cfg.read_slice_bytes)
    plan.pending_rows = sum(len(i["rows"]) for i in plan.items)
    plan.duplicates = sum(len(i["dup_rows"]) for i in plan.items)
    plan.seconds = time.perf_counter() - started
    return plan


def read_ids(item: tuple[str, int, list[int]]) -> list[str | None]:
    path, group, rows = item
    col = storage.read_row_group(path, group, columns=["sample_id"]).column("sample_id").to_pylist()
    return [col[r] for r in rows]


def mark_duplicates(wanted: list[tuple[str, int, list[int]]], led: ledger.Ledger, cfg: RunnerConfig,
                    plan: Plan) -> list[Row]:
    """Read items for the pending positions. The first pending occurrence of a sample id (in input
    order) is processed unless the id is committed already; every other occurrence is a duplicate.
    Only a real outcome marks an id taken, so a committed duplicate error row never hides the first
    occurrence. In a rewritten file, an id committed from that same file is done already: its
    position goes to `plan.carried` (settled, no new row), and the ids the file no longer holds to
    `plan.vanished`."""
    ids = storage.parallel_map(read_ids, wanted, cfg.planning_threads) if wanted else []
    taken = led.taken_ids({i for chunk in ids for i in chunk if i is not None},
                          count_errors=not cfg.retry_errors, threads=cfg.planning_threads)
    changed = set(plan.changed)
    for path in plan.changed:
        now = {sid for (p, _, _), chunk in zip(wanted, ids) if p == path for sid in chunk}
        if gone := sorted(led.ids_from(path, cfg.planning_threads) - now):
            plan.vanished[path] = gone
            log.warning("input %s no longer holds %d sample ids committed from it earlier (e.g. %s); their rows "
                        "stay in the output", path, len(gone), ", ".join(map(repr, gone[:3])))
    first: dict[str, str] = {}
    items = []
    for (path, group, rows), chunk in zip(wanted, ids):
        dup_rows, dup_reasons, todo = [], [], []
        for row, sid in zip(rows, chunk):
            if sid and path in changed and sid in taken and taken[sid] in (path, None) and sid not in first:
                plan.carried.append((path, group, row))
                first[sid] = path
                continue
            todo.append(row)
            if not sid:
                continue  # the read stage reports it ('empty sample_id')
            if sid in taken:
                dup_rows.append(row)
                dup_reasons.append(f"duplicate sample_id {sid!r}: already committed in {led.output}")
            elif sid in first:
                dup_rows.append(row)
                dup_reasons.append(f"duplicate sample_id {sid!r}: first seen in {first[sid]}")
            else:
                first[sid] = path
        if todo:
            items.append({"path": path, "row_group": group, "rows": todo, "dup_rows": dup_rows,
                          "dup_reasons": dup_reasons})
    return items


# ---------------------------------------------------------------- commit


def emit_checked(rows: list[Row], job: BatchJob) -> list[Row]:
    """Every finished row's output rows, checked against the output schema: a row whose output
    cannot be written (a null in a non-null column, a wrong type) becomes an error row of stage
    'commit' instead of failing the whole commit on every run."""
    emitted: list[list[Row]] = []
    for r in rows:
        if r.get("error_stage"):
            emitted.append([])
            continue
        try:
            emitted.append(job.emit(r))
        except Exception as exc:
            fail(r, "commit", f"could not build its output row: {faults.describe(exc)}")
            emitted.append([])
    try:
        schema.check_writable(pa.Table.from_pylist([o for out in emitted for o in out], schema=job.output_schema))
        return [o for out in emitted for o in out]
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    outputs = []
    for r, out in zip(rows, emitted):
        try:
            schema.check_writable(pa.Table.from_pylist(out, schema=job.output_schema))
            outputs += out
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            fail(r, "commit", f"output row does not fit the output schema: {faults.describe(exc)}")
    return outputs


def commit_batch(batch: pa.Table, job: BatchJob, output: str, run_id: str, generation: int = 0,
                 versions: dict[str, str] | None = None) -> pa.Table:
    """Commit one batch of finished work rows (after checking that this run still holds the
    output's lease); return one stats row for progress and the manifest."""
    output_lease.check_generation(output, generation)
    rows = batch.to_pylist()
    positions = [(r["source_file"], r["source_row_group"], r["source_row"]) for r in rows]
    outputs = emit_checked(rows, job)
    errors = [{"sample_id": r.get("sample_id"), "source_file": r["source_file"], "row_group": r["source_row_group"],
               "row": r["source_row"], "stage": r["error_stage"], "reason": r["error_reason"] or "",
               "retryable": bool(r.get("error_retryable"))} for r in rows if r.get("error_stage")]
    name = ledger.commit_name(run_id, positions)
    for att in job.attachments:
        extra = [x for r in rows if not r.get("error_stage") for x in att.emit(r)]
        if extra:
            blobs.write_blobs(extra, att.schema, storage.join(output, att.folder, f"{name}.parquet"), att.key)
    ledger.commit(output, run_id, name, outputs, errors, positions, job.output_schema, generation, versions)
    seconds = {c: float(pc.sum(batch.column(c)).as_py() or 0.0) for c in batch.column_names if c.startswith("seconds_")}
    by_stage = collections.Counter(e["stage"] for e in errors)
    return pa.Table.from_pylist([{
        "rows": len(rows), "written": len(outputs), "errors": len(errors),
        "retryable": sum(e["retryable"] for e in errors), "errors_by_stage": json.dumps(by_stage),
        "seconds": json.dumps(seconds), "extra": json.dumps(job.stats(rows) if job.stats else {}),
    }])



# ---------------------------------------------------------------- progress and resources


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    """total += part, for nested dicts of numbers."""
    for k, v in part.items():
        if isinstance(v, dict):
            add_counts(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


class Progress:
    """Sums the commit stats rows and logs progress every `every` seconds."""

    def __init__(self, total: int, every: float = 10.0) -> None:
        self.total, self.every = total, every
        self.rows = self.written = self.errors = self.retryable = 0
        self.errors_by_stage: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self.t0 = self.last = time.time()
        self.first_commit: float | None = None

    def add(self, row: Row) -> None:
        self.first_commit = self.first_commit or time.time()
        self.rows += row["rows"]
        self.written += row["written"]
        self.errors += row["errors"]
        self.retryable += row["retryable"]
        add_counts(self.errors_by_stage, json.loads(row["errors_by_stage"]))
        add_counts(self.seconds, json.loads(row["seconds"]))
        add_counts(self.extra, json.loads(row["extra"]))
        now = time.time()
        if now - self.last > self.every or self.rows >= self.total:
            self.last = now
            rate = self.rows / max(1e-9, now - self.t0)
            eta = (self.total - self.rows) / rate if rate > 0 else float("inf")
            log.info("committed %d/%d rows (%d errors), %.2f rows/s, ETA %s", self.rows, self.total,
                     self.errors, rate, clock(eta))

    def throughput(self, wall: float) -> dict[str, float | None]:
        out: dict[str, float | None] = {s.removeprefix("seconds_"): (self.rows / v if v > 0 else None)
                                        for s, v in self.seconds.items()}
        out["end_to_end"] = self.rows / wall if wall > 0 else None
        return out


def demand(stages: Sequence[Stage]) -> list[dict[str, float]]:
    """One resource bundle per actor the plan places (what the autoscaler must provide)."""
    out = []
    for st in stages:
        bundle = {"CPU": st.cpus, **({"GPU": st.gpus} if st.gpus else {})}
        out += [dict(bundle) for _ in range(st.actors)]
    return out


def gpu_pools(stages: Sequence[Stage]) -> list[Stage]:
    """The stages with each GPU pool's lower bound set (unless given): the replicas the GPUs up now
    hold, at least one (resources.min_replicas; pools in stage order share the GPUs). A pool
    larger than that starts small and grows as the autoscaler adds GPUs."""
    import ray

    from eama.engine import resources

    have, out = ray.cluster_resources().get("GPU", 0.0), []
    for st in stages:
        if st.actors and st.gpus and not st.min_actors:
            st = dataclasses.replace(st, min_actors=resources.min_replicas(st.actors, st.gpus, have))
        have -= (st.min_actors or st.actors) * st.gpus
        out.append(st)
    return out


def ensure_resources(stages: Sequence[Stage], timeout: float, poll: float = 5.0) -> bool:
    """Ask the autoscaler for the GPUs of the plan's actor pools at full size, then wait until the
    cluster has what they start with (min_actors; a GPU worker group that scales from zero starts
    only when asked). True when it asked: the caller withdraws the request when the job ends
    (withdraw_resources)."""
    import ray

    full = sum(st.actors * st.gpus for st in stages)
    if full <= 0 or ray.cluster_resources().get("GPU", 0) >= full:
        return False
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=demand(stages))
    try:
        wait_for_gpus(sum((st.min_actors or st.actors) * st.gpus for st in stages), timeout, poll, full)
    except BaseException:
        withdraw_resources()
        raise
    return True


def wait_for_gpus(need: float, timeout: float, poll: float, full: float = 0.0) -> None:
    """Block until the cluster has `need` GPUs (SystemExit after `timeout` seconds); `full`: what
    the pools grow to, for the messages."""
    import ray

    deadline, last_log = time.time() + timeout, 0.0
    grows = f" to start (its pools grow to {full:g})" if full > need else ""
    while (have := ray.cluster_resources().get("GPU", 0)) < need:
        if time.time() > deadline:
            raise SystemExit(f"the plan needs {need:g} GPUs{grows}; asked the autoscaler, but after {timeout:.0f} s "
                             f"the cluster has {have:g}. Check the GPU worker type in ray_cluster.yaml (max_workers, "
                             f"quota) or set mllm_actors / device to what the cluster has.")
        if time.time() - last_log > 30:
            log.info("waiting for the autoscaler: %g of %g GPUs%s", have, need, grows)
            last_log = time.time()
        time.sleep(poll)
    log.info("the cluster has the %g GPUs the plan needs", need)


def withdraw_resources() -> None:
    """Withdraw this job's standing request to the autoscaler (it would keep GPU nodes up)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception as exc:  # the job's own outcome matters more than this clean-up
        log.warning("could not withdraw the autoscaler request: %s", exc)


# ---------------------------------------------------------------- the run


def build_dataset(job: BatchJob, cfg: RunnerConfig, items: list[Row], run_id: str, generation: int = 0,
                  versions: dict[str, str] | None = None) -> Any:
    """read -> the job's stages -> commit, as one streaming Ray Data chain."""
    import ray.data

    def markers(stage: str) -> isolation.Markers:
        return isolation.Markers.for_stage(cfg.output, run_id, stage, cfg.deaths_per_row)

    def retries(rows: int) -> int:  # bounded: Ray Data's default retries a task whose worker died forever
        return cfg.worker_retries or isolation.worker_retries(rows, cfg.deaths_per_row)

    io = {"num_cpus": job.io_cpus}
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 256)))
    ds = ds.map_batches(read_positions, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"job": job, "markers": markers("read")},
                        max_retries=retries(max(len(i["rows"]) for i in items)), **io)
    for st in job.stages:
        rows = st.batch_size or cfg.batch_size
        common = {"batch_size": rows, "batch_format": "pyarrow", "num_cpus": st.cpus}
        if st.gpus:
            common["num_gpus"] = st.gpus
        guard = {"name": st.name, "retries": cfg.transient_retries, "markers": markers(st.name)}
        label = "".join(part.capitalize() for part in st.name.split("_"))  # Ray's progress bars show it
        if st.actors:  # a dead actor is restarted and its tasks retried, both bounded
            ds = ds.map_batches(type(label, (ActorStage,), {}),
                                fn_constructor_kwargs={"cls": st.fn, "kwargs": st.kwargs, **guard},
                                compute=pool_strategy(st), max_restarts=cfg.actor_restarts,
                                max_task_retries=retries(rows), **common)
        else:
            ds = ds.map_batches(task_stage(label), fn_kwargs={"fn": st.fn, "kwargs": st.kwargs, **guard},
                                max_retries=retries(rows), **common)
    return ds.map_batches(commit_batch, batch_size=cfg.commit_rows, batch_format="pyarrow",
                          fn_kwargs={"job": job, "output": cfg.output, "run_id": run_id, "generation": generation,
                                     "versions": versions or {}}, max_retries=retries(1), **io)


def pool_strategy(st: Stage) -> Any:
    """A fixed actor pool, or one growing from min_actors to actors."""
    import ray.data

    if 0 < st.min_actors < st.actors:
        return ray.data.ActorPoolStrategy(min_size=st.min_actors, max_size=st.actors)
    return ray.data.ActorPoolStrategy(size=st.actors)


def stream(job: BatchJob, cfg: RunnerConfig, plan: Plan, run_id: str, lease: output_lease.Lease,
           progress: Progress) -> None:
    """Run the planned items through the stages into commits; the autoscaler request is withdrawn
    however it ends, and a commit refused for a lost lease ends the run with LeaseLost."""
    asked = False
    try:
        asked = ensure_resources(job.stages, cfg.wait_for_resources_seconds)
        for stats in build_dataset(job, cfg, plan.items, run_id, lease.generation, plan.versions).iter_rows():
            progress.add(stats)
            if lease.lost:
                lease.check()
    except Exception as exc:
        if "Fenced" in f"{type(exc).__name__} {exc}" or "fenced:" in str(exc):
            lease.check()  # raises LeaseLost naming the run that took over
            lease.lost = "a newer run"
            raise lease.lost_error() from None
        raise
    finally:
        if asked:
            withdraw_resources()


def run(job: BatchJob, cfg: RunnerConfig, run_id: str | None = None) -> dict[str, Any]:
    """Process every pending input row of `cfg.input` into `cfg.output`, exactly once; return the
    run manifest (also written to OUTPUT/_manifests/<run_id>.json)."""
    import ray

    validate(cfg)
    cfg.input, cfg.output = storage.absolute(cfg.input), storage.absolute(cfg.output)
    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    run_id, started = run_id or new_run_id(), time.time()
    with output_lease.Lease(cfg.output, run_id, cfg.lease_seconds) as lease:
        led = ledger.Ledger.open_for_run(cfg.output, lease.generation, cfg.overwrite)
        plan = plan_run(job, cfg, led)
        job = dataclasses.replace(job, stages=gpu_pools(job.stages))
        led.commit_settled(run_id, lease.generation, plan.file_errors, plan.carried, plan.versions)
        log_plan(job, plan)
        progress = Progress(plan.pending_rows)
        if plan.items:
            stream(job, cfg, plan, run_id, lease, progress)
            isolation.clear_markers(cfg.output)  # the in-flight markers crashed workers left
        lease.verify()
        led.compact(plan.inspected)
        manifest = run_manifest(job, cfg, plan, progress, led, run_id, started)
        ledger.write_manifest(cfg.output, manifest)
    return manifest


def log_plan(job: BatchJob, plan: Plan) -> None:
    for e in plan.file_errors:
        log.warning("unusable input %s: %s", e["source_file"], e["reason"])
    log.info("%s: %d input files (%d unusable, %d done); %d of %d rows to process (%d duplicates); planned in %.2f s",
             job.name, plan.files, len(plan.file_errors), plan.files_done, plan.pending_rows, plan.input_rows,
             plan.duplicates, plan.seconds)


def run_manifest(job: BatchJob, cfg: RunnerConfig, plan: Plan, progress: Progress, led: ledger.Ledger,
                 run_id: str, started: float) -> dict[str, Any]:
    """What a run did and what the output holds (OUTPUT/_manifests/<run_id>.json)."""
    if plan.file_errors:
        add_counts(progress.errors_by_stage, {"read": len(plan.file_errors)})
    out_rows, err_rows = led.totals()
    wall = time.time() - started
    return {
        "run_id": run_id, "job": job.name, **job.describe,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "plan": {st.name: st.describe() for st in job.stages}, "wall_seconds": round(wall, 2),
        "planning_seconds": round(plan.seconds, 3),
        "first_commit_seconds": round(progress.first_commit - started, 2) if progress.first_commit else None,
        "input": {"files": plan.files, "rows": plan.input_rows, "unusable_files": len(plan.file_errors),
                  "files_done_before": plan.files_done, "rows_pending": plan.pending_rows},
        "this_run": {"rows": progress.rows + len(plan.file_errors), "written": progress.written,
                     "errors": progress.errors + len(plan.file_errors),
                     "retryable_errors": progress.retryable + sum(e["retryable"] for e in plan.file_errors),
                     "errors_by_stage": progress.errors_by_stage,
                     "counts": {**progress.extra, **(job.rates(progress.extra) if job.rates else {})},
                     "error_reasons": [f"{e['source_file']}: {e['reason']}" for e in plan.file_errors],
                     "rewritten_files": plan.changed, "rows_already_done_in_rewritten_files": len(plan.carried),
                     "vanished_ids": {p: {"count": len(ids), "examples": ids[:20]} for p, ids in plan.vanished.items()}},
        "output_total": {"rows": out_rows, "error_rows": err_rows},
        "throughput_rows_per_s": progress.throughput(wall),
    }
