"""Rows that never end: a row that kills its worker (in the read or in a stage, task or actor), a
batch that runs out of memory, a process poisoned by a CUDA device-side assert, a transient fault
that always recurs on one row. Each run ends, and only the row at fault is an error row."""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch

from eama.engine import faults, isolation, ledger, reading, runner, schema, storage

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/

TEXT = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("text", pa.string())])
WORK = schema.work_schema(list(TEXT) + [pa.field("shout", pa.string())], ("shout",))
OUT = pa.schema([pa.field("sample_id", pa.string()), pa.field("shout", pa.string())])
DEVICE_ASSERT = "CUDA error: device-side assert triggered"


def shout(batch: pa.Table) -> pa.Table:
    """The toy work: upper-cased text, tagged with the process that did it."""
    rows = batch.to_pylist()
    for r in runner.pending(rows):
        r["shout"] = f"{r['text'].upper()}|{os.getpid()}"
    return pa.Table.from_pylist(rows, schema=WORK)


def ids(batch: pa.Table) -> list[str]:
    return batch.column("sample_id").to_pylist()


def explode(batch: pa.Table, victim: str) -> pa.Table:
    """Kills its worker process whenever the batch holds `victim` (a segfaulting decoder)."""
    if victim in ids(batch):
        os._exit(1)
    return shout(batch)


class Exploder:
    def __init__(self, victim: str) -> None:
        self.victim = victim

    def __call__(self, batch: pa.Table) -> pa.Table:
        return explode(batch, self.victim)


def die_on(row: dict, victim: str) -> str | None:
    """A per-row check after read that kills the reader on `victim`."""
    if row["sample_id"] == victim:
        os._exit(1)
    return None


class OutOfMemoryOnBig:
    """Runs out of (CUDA) memory whenever its batch holds the row 'big'."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "big" in ids(batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return shout(batch)

    def row_size(self, row: dict) -> str:
        return f"{len(row['text'].split())} tokens"


class Poisonable:
    """After it has seen the row 'poison', every later call in its process fails with a CUDA
    device-side assert (the context is gone). Each call is logged to `log`."""

    def __init__(self, log: str) -> None:
        self.log, self.poisoned = log, False

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = not self.poisoned
        with open(self.log, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "ids": ids(batch), "ok": ok}) + "\n")
        if not ok:
            raise RuntimeError(DEVICE_ASSERT)
        self.poisoned = "poison" in ids(batch)
        return shout(batch)


def emit(row: dict) -> list[dict]:
    return [{"sample_id": row["sample_id"], "shout": row["shout"]}]


def job_with(stage: runner.Stage, prepare=None) -> runner.BatchJob:
    return runner.BatchJob(name="crash", input_schema=TEXT, required=("sample_id",), work_schema=WORK,
                           output_schema=OUT, emit=emit, prepare=prepare, stages=[stage])


def write_input(path: Path, sample_ids: list[str], row_group_size: int, texts: dict[str, str] | None = None) -> str:
    texts = texts or {}
    rows = [{"sample_id": i, "text": texts.get(i, f"text of {i}")} for i in sample_ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=TEXT), path, row_group_size=row_group_size)
    return str(path)


def run_within(seconds: float, job: runner.BatchJob, cfg: runner.RunnerConfig) -> dict:
    """runner.run, failing the test (not hanging it) when the run does not end in time."""
    result: dict = {}

    def target() -> None:
        try:
            result["manifest"] = runner.run(job, cfg)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the run did not end within {seconds} s"
    assert "error" not in result, result.get("error")
    return result["manifest"]


def outputs(out: str) -> tuple[dict[str, str], list[dict]]:
    rows = {r["sample_id"]: r["shout"] for p in storage.list_files(out) for r in pq.read_table(p).to_pylist()}
    err_dir = os.path.join(out, ledger.ERRORS_DIR)
    if not os.path.isdir(err_dir):
        return rows, []
    return rows, [r for p in storage.list_files(err_dir) for r in pq.read_table(p).to_pylist()]


def config(inp: str, out: str, **kw) -> runner.RunnerConfig:
    return runner.RunnerConfig(**{"input": inp, "output": out, "commit_rows": 4, "transient_retries": 0, **kw})


SAMPLES = [f"s{i}" for i in range(7)]


# ---------------------------------------------------------------- a row that kills its worker


@pytest.mark.parametrize("actors", [1, 0], ids=["actor", "task"])
def test_a_row_that_kills_its_worker_becomes_a_crash_row(ray_local, tmp_path, actors):
    inp = write_input(tmp_path / "in.parquet", SAMPLES[:5] + ["boom"] + SAMPLES[5:], row_group_size=4)
    out = str(tmp_path / "out")
    stage = (runner.Stage("explode", Exploder, {"victim": "boom"}, actors=1) if actors
             else runner.Stage("explode", explode, {"victim": "boom"}))
    m = run_within(150, job_with(stage), config(inp, out, batch_size=4, deaths_per_row=2))
    rows, errs = outputs(out)
    assert sorted(rows) == SAMPLES
    assert [(e["sample_id"], e["stage"], e["row"], e["retryable"]) for e in errs] == [("boom", "crash", 1, False)]
    assert "explode worker died 2 times" in errs[0]["reason"]
    assert m["this_run"]["errors_by_stage"] == {"crash": 1}
    assert m["output_total"] == {"rows": 7, "error_rows": 1}
    assert not os.path.exists(os.path.join(out, "_ledger", "inflight"))


def test_a_row_that_kills_the_reader_becomes_a_crash_row(ray_local, tmp_path):
    inp = write_input(tmp_path / "in.parquet", SAMPLES[:2] + ["boom"] + SAMPLES[2:], row_group_size=8)
    out = str(tmp_path / "out")
    job = job_with(runner.Stage("shout", shout), prepare=functools.partial(die_on, victim="boom"))
    m = run_within(150, job, config(inp, out, batch_size=2, read_slice_bytes=1 << 30))
    rows, errs = outputs(out)
    assert sorted(rows) == SAMPLES
    # the reader died before it knew the sample id: the error row names the position
    assert [(e["sample_id"], e["stage"], e["row_group"], e["row"]) for e in errs] == [(None, "crash", 0, 2)]
    assert "read worker died 2 times" in errs[0]["reason"]
    assert m["output_total"] == {"rows": 7, "error_rows": 1}


# ---------------------------------------------------------------- out of memory, poisoned processes


def test_out_of_memory_halves_the_batch_down_to_the_row_that_does_not_fit(ray_local, tmp_path):
    texts = {"big": " ".join(["word"] * 3000)}
    inp = write_input(tmp_path / "in.parquet", SAMPLES[:3] + ["big"] + SAMPLES[3:], row_group_size=8, texts=texts)
    out = str(tmp_path / "out")
    m = run_within(120, job_with(runner.Stage("generate", OutOfMemoryOnBig, actors=1)),
                   config(inp, out, batch_size=8, commit_rows=8))
    rows, errs = outputs(out)
    assert sorted(rows) == SAMPLES
    assert [(e["sample_id"], e["stage"], e["retryable"]) for e in errs] == [("big", "generate", False)]
    assert "3000 tokens" in errs[0]["reason"] and "OutOfMemoryError" in errs[0]["reason"]
    assert m["this_run"]["retryable_errors"] == 0


def test_a_poisoned_actor_ends_and_the_later_rows_are_redone_in_a_fresh_one(ray_local, tmp_path):
    sample_ids = ["s0", "poison"] + [f"s{i}" for i in range(1, 15)]
    inp = write_input(tmp_path / "in.parquet", sample_ids, row_group_size=2)
    out, log = str(tmp_path / "out"), tmp_path / "calls.jsonl"
    m = run_within(150, job_with(runner.Stage("caption", Poisonable, {"log": str(log)}, actors=1)),
                   config(inp, out, batch_size=2))
    rows, errs = outputs(out)
    assert sorted(rows) == sorted(sample_ids) and errs == []
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    poisoned = {c["pid"] for c in calls if "poison" in c["ids"]}
    failed = [c for c in calls if not c["ok"]]
    assert failed and {c["pid"] for c in failed} <= poisoned  # a later call in that process failed
    for call in failed:  # and its rows were redone in another process
        assert all(int(rows[i].rsplit("|", 1)[1]) not in poisoned for i in call["ids"])
    assert m["output_total"] == {"rows": 16, "error_rows": 0}


# ---------------------------------------------------------------- the guard and isolate, in process


def work_batch(sample_ids: list[str], texts: dict[str, str] | None = None) -> pa.Table:
    texts = texts or {}
    return pa.Table.from_pylist([{"sample_id": i, "text": texts.get(i, "t"), "source_file": "f", "source_row_group": 0,
                                  "source_row": k} for k, i in enumerate(sample_ids)], schema=WORK)


def counting(fn, calls: list):
    def call(batch):
        calls.append(ids(batch))
        return fn(batch)
    return call


def test_a_transient_fault_that_recurs_on_one_row_is_retryable_for_that_row_alone():
    calls: list = []

    def flaky_row(batch: pa.Table) -> pa.Table:
        if "flaky" in ids(batch):
            raise ConnectionResetError("connection reset by peer")
        return shout(batch)

    batch = work_batch([f"r{i}" for i in range(5)] + ["flaky"] + ["r5", "r6"])
    out = runner.guarded(counting(flaky_row, calls), batch, "fetch", retries=0).to_pylist()
    assert [(r["sample_id"], r["error_stage"], r["error_retryable"]) for r in out if r["error_stage"]] == [
        ("flaky", "fetch", True)]
    assert [r["sample_id"] for r in out if r["shout"]] == [f"r{i}" for i in range(7)]
    assert len(calls) <= 1 + 2 * 3  # the batch, then two halves per level of 8 -> 1


def test_failed_rows_pass_the_guard_untouched_and_in_order():
    calls: list = []
    rows = work_batch(["a", "gone", "b", "c"]).to_pylist()
    runner.fail(rows[1], "read", "empty article")
    out = runner.guarded(counting(shout, calls), pa.Table.from_pylist(rows, schema=WORK), "shout", retries=0)
    assert calls == [["a", "b", "c"]]
    assert [(r["sample_id"], r["error_stage"], r["shout"] is None) for r in out.to_pylist()] == [
        ("a", None, False), ("gone", "read", True), ("b", None, False), ("c", None, False)]


def test_a_fault_of_the_whole_batch_is_not_searched_row_by_row():
    calls: list = []

    def outage(batch: pa.Table) -> pa.Table:
        raise ConnectionRefusedError("connection refused")

    out = runner.guarded(counting(outage, calls), work_batch([f"r{i}" for i in range(8)]), "fetch", retries=0)
    assert out.column("error_retryable").to_pylist() == [True] * 8
    assert len(calls) == 3  # the batch and its two halves: both fail alike, so it is the surroundings


def test_isolate_halves_a_chunk_that_runs_out_of_memory():
    rows = work_batch(["a", "b", "big", "c", "d"], texts={"big": "x" * 5000}).to_pylist()
    done: list = []

    def generate(chunk: list[dict]) -> None:
        if any(r["sample_id"] == "big" for r in chunk):
            raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")
        done.extend(r["sample_id"] for r in chunk)

    runner.isolate(rows, 4, generate, "mllm")
    assert sorted(done) == ["a", "b", "c", "d"]
    big = rows[2]
    assert (big["error_stage"], big["error_retryable"]) == ("mllm", False)
    assert "5000 characters" in big["error_reason"] and "out of memory" in big["error_reason"]


def test_memory_and_poison_faults_are_told_apart():
    assert faults.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert faults.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert faults.is_out_of_memory(MemoryError())
    assert not faults.is_out_of_memory(RuntimeError(DEVICE_ASSERT))
    assert faults.poisons_process(RuntimeError(DEVICE_ASSERT))
    assert faults.poisons_process(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not faults.poisons_process(torch.OutOfMemoryError("CUDA out of memory"))
    assert not faults.poisons_process(ValueError("device-side assert"))  # not a runtime fault


def test_default_row_size_names_text_and_image_pixels():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), "gray").save(buf, "PNG")
    text = isolation.describe_size({"sample_id": "x", "article": "one two three", "image": buf.getvalue()})
    assert "640x480" in text and "307200 pixels" in text and "13 characters, 3 words" in text


def test_in_flight_markers_count_deaths_on_s3_and_are_cleared(s3_server):
    out = "s3://eama-test/markers-out"
    markers = isolation.Markers.for_stage(out, "run-1", "decode", deaths_per_row=2)
    where = [("s3://eama-test/in.parquet", 0, 3), ("s3://eama-test/in.parquet", 0, 4)]
    path = markers.path(where)
    assert path.startswith(out + "/_ledger/inflight/run-1/decode/")
    assert path == markers.path(list(reversed(where))) != markers.path(where[:1])  # the rows, not their order
    assert markers.read(path)["deaths"] == 0
    markers.write(path, 1)
    assert markers.read(path) == {"deaths": 1, "last": None}
    markers.remove(path)
    markers.remove(path)  # already gone: nothing to do
    assert markers.read(path)["deaths"] == 0
    markers.write(path, 2, "RuntimeError: " + DEVICE_ASSERT)
    isolation.clear_markers(out)
    assert not storage.exists(out + "/_ledger/inflight")


# ---------------------------------------------------------------- bounded reads


def test_a_huge_row_group_is_read_in_slices_of_bounded_bytes(tmp_path):
    sample_ids = [f"s{i:02d}" for i in range(40)]
    path = write_input(tmp_path / "one-group.parquet", sample_ids, row_group_size=40)
    item = {"path": path, "row_group": 0, "rows": list(range(3, 40)), "dup_rows": [7], "dup_reasons": ["dup"]}
    items = reading.split_items([item], {path: 100.0}, slice_bytes=1000)  # 10 rows of 100 bytes a slice
    assert [i["rows"][0] for i in items] == [3, 13, 23, 33] and sum(len(i["rows"]) for i in items) == 37
    assert [i["dup_rows"] for i in items] == [[7], [], [], []]
    read = runner.read_positions(pa.Table.from_pylist(items), job_with(runner.Stage("shout", shout))).to_pylist()
    assert [r["sample_id"] for r in read] == sample_ids[3:]
    assert [r["source_row"] for r in read] == list(range(3, 40))
    assert [r["sample_id"] for r in read if r["error_stage"] == "duplicate"] == ["s07"]
    # a slice of the middle is read from a stream of small batches, not the whole row group
    assert reading.read_rows(path, 0, [20, 21]).column("sample_id").to_pylist() == ["s20", "s21"]
