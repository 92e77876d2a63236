"""The engine's guarantees in the states that break them, each state constructed on purpose (not a
random kill): a lost lease, a late commit of a fenced run, rewritten inputs, an --overwrite cut
short, glob characters in an output path, empty inputs, rows whose output cannot be written, the
autoscaler request, S3 range reads and the sample-id index. Real Ray, real Parquet, moto's S3."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from eama.engine import id_index, ledger, runner, schema, storage
from eama.engine import lease as leases
from test_engine import OUT, TEXT, WORK, cfg_for, outputs, toy_job, write_input

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


def held_shout(batch: pa.Table, hold: str, started: str) -> pa.Table:
    """The toy stage, but it waits while `hold` exists (a run paused mid-way)."""
    Path(started).touch()
    while os.path.exists(hold):
        time.sleep(0.1)
    rows = batch.to_pylist()
    for r in runner.pending(rows):
        r["shout"] = r["text"].upper()
    return pa.Table.from_pylist(rows, schema=WORK)


def ids_once(out: str) -> list[str]:
    rows, errs = outputs(out)
    return sorted([r["sample_id"] for r in rows] + [e["sample_id"] for e in errs if e["sample_id"]])


# ---------------------------------------------------------------- fencing


def test_a_run_that_lost_its_lease_cannot_commit_beside_the_new_holder(ray_local, tmp_path, monkeypatch):
    """Run A's renewals stop (a paused driver); its lease lapses; run B takes over and finishes;
    A resumes and tries to commit: nothing of A's lands, no position twice, A ends with LeaseLost."""
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    ids = [f"s{i}" for i in range(6)]
    write_input(inp, "a.parquet", ids)
    hold, started = tmp_path / "hold", tmp_path / "started"
    hold.touch()
    renew = leases.Lease.renew_once
    monkeypatch.setattr(leases.Lease, "renew_once", lambda self: None if self.run_id == "run-A" else renew(self))
    job_a = runner.BatchJob(name="shout", input_schema=TEXT, required=("sample_id",), work_schema=WORK,
                            output_schema=OUT, emit=toy_job().emit,
                            stages=[runner.Stage("shout", held_shout, {"hold": str(hold), "started": str(started)})])
    outcome: dict[str, BaseException] = {}

    def run_a() -> None:
        try:
            runner.run(job_a, cfg_for(str(inp), out, lease_seconds=2, commit_rows=6), run_id="run-A")
        except BaseException as exc:  # LeaseLost is a SystemExit
            outcome["a"] = exc

    thread = threading.Thread(target=run_a)
    thread.start()
    deadline = time.time() + 120
    while not started.exists():
        assert time.time() < deadline and thread.is_alive(), "run A never reached its stage"
        time.sleep(0.1)
    time.sleep(2.5)  # A's lease expires unrenewed
    manifest_b = runner.run(toy_job(), cfg_for(str(inp), out, commit_rows=6), run_id="run-B")
    assert manifest_b["this_run"]["written"] == 6
    hold.unlink()  # A resumes and reaches its commit
    thread.join(timeout=120)
    assert not thread.is_alive()
    lost = outcome.get("a")
    assert isinstance(lost, leases.LeaseLost) and lost.code == 3, repr(lost)
    assert "lost the lease" in lost.message and "run-B" in lost.message
    rows, errs = outputs(out)
    assert sorted(r["sample_id"] for r in rows) == ids and not errs
    assert {r["sample_id"]: r["shout"] for r in rows} == {i: f"TEXT OF {i.upper()}" for i in ids}
    assert len({json.loads(p.read_text())["run_id"] for p in (Path(out) / "_manifests").iterdir()}) == 1


def test_a_late_commit_of_an_older_generation_is_ignored_and_removed(ray_local, tmp_path):
    """The race the commit-time check cannot close: run A (generation 1) passed its check, then
    run B sealed the output (generation 2), then A's commit landed. Readers ignore it and the next
    compaction deletes it, data file included."""
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    path = write_input(inp, "a.parquet", ["x", "y"])
    runner.run(toy_job(), cfg_for(str(inp), out))  # generation 1
    runner.run(toy_job(), cfg_for(str(inp), out))  # generation 2 seals the output
    ledger.commit(out, "20200101T000000Z-late", "part-late", [{"sample_id": "x", "shout": "LATE", "source_file": path}],
                  [], [(path, 0, 0)], OUT, generation=1)
    led = ledger.Ledger.load(out)
    assert [r.name for r in led.void] == ["part-late"] and led.totals() == (2, 0)
    write_input(inp, "b.parquet", ["z"])
    runner.run(toy_job(), cfg_for(str(inp), out))  # generation 3 compacts
    assert not os.path.exists(os.path.join(out, "part-late.parquet"))
    rows, _ = outputs(out)
    assert sorted((r["sample_id"], r["shout"]) for r in rows) == [("x", "TEXT OF X"), ("y", "TEXT OF Y"), ("z", "TEXT OF Z")]


def test_commits_of_a_crashed_run_are_kept_and_the_rest_is_done(ray_local, tmp_path):
    """A killed run left commits that no compaction folded: the next run seals them into the
    index (the file is not yet complete) and processes only the remaining rows."""
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    ids = [f"s{i}" for i in range(10)]
    path = write_input(inp, "a.parquet", ids)  # row groups of 4
    version = storage.list_file_versions(path)[0][2]
    killed = leases.Lease(out, "killed", ttl=60).acquire()  # the killed run held generation 1
    killed.release()
    done = [{"sample_id": ids[i], "shout": f"TEXT OF {ids[i].upper()}", "source_file": path} for i in range(4)]
    ledger.commit(out, "20200101T000000Z-killed", "part-killed", done, [], [(path, 0, i) for i in range(4)], OUT,
                  generation=1, versions={path: version})
    m = runner.run(toy_job(), cfg_for(str(inp), out))
    assert m["this_run"]["written"] == 6 and ids_once(out) == sorted(ids)
    assert runner.run(toy_job(), cfg_for(str(inp), out))["this_run"]["rows"] == 0


# ---------------------------------------------------------------- rewritten inputs


def test_a_row_prepended_to_a_committed_file_is_processed_and_nothing_is_redone(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a", "b", "c", "d", "e"])
    runner.run(toy_job(), cfg_for(str(inp), out))
    write_input(inp, "a.parquet", ["new", "a", "b", "c", "d", "e"])  # every old sample moves one position
    m = runner.run(toy_job(), cfg_for(str(inp), out))
    rows, errs = outputs(out)
    assert sorted(r["sample_id"] for r in rows) == ["a", "b", "c", "d", "e", "new"] and not errs
    assert m["this_run"]["written"] == 1 and m["this_run"]["rows_already_done_in_rewritten_files"] == 5
    assert runner.run(toy_job(), cfg_for(str(inp), out))["this_run"]["rows"] == 0  # settled


def test_a_same_size_rewrite_is_noticed_and_vanished_ids_are_reported(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    path = write_input(inp, "a.parquet", ["a1", "b1", "c1"])
    runner.run(toy_job(), cfg_for(str(inp), out))
    size = os.path.getsize(path)
    write_input(inp, "a.parquet", ["a2", "b2", "c2"])
    assert os.path.getsize(path) == size  # the state: same name, same size, other samples
    m = runner.run(toy_job(), cfg_for(str(inp), out))
    assert ids_once(out) == ["a1", "a2", "b1", "b2", "c1", "c2"]
    assert m["this_run"]["written"] == 3
    assert m["this_run"]["vanished_ids"] == {path: {"count": 3, "examples": ["a1", "b1", "c1"]}}


# ---------------------------------------------------------------- overwrite, odd paths, empty inputs


def test_an_overwrite_cut_short_is_finished_by_the_next_run(ray_local, tmp_path):
    """Killed after deleting the data and before the ledger: the next run, even without
    --overwrite, must not trust the ledger's positions (their rows are gone)."""
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a", "b", "c"])
    runner.run(toy_job(), cfg_for(str(inp), out))
    storage.write_json_atomic(os.path.join(out, ledger.OVERWRITE_MARK), {"overwrite_started": 0})
    for f in storage.list_files(out):  # the data went first; the kill came before the ledger
        os.remove(f)
    assert os.path.exists(os.path.join(out, ledger.INDEX_FILE))
    m = runner.run(toy_job(), cfg_for(str(inp), out))
    assert m["this_run"]["written"] == 3 and ids_once(out) == ["a", "b", "c"]
    assert not os.path.exists(os.path.join(out, ledger.OVERWRITE_MARK))


def test_an_output_path_with_glob_characters_is_taken_literally(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out[1]")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a", "b"])
    assert runner.run(toy_job(), cfg_for(str(inp), out))["this_run"]["written"] == 2
    again = runner.run(toy_job(), cfg_for(str(inp), out))
    assert again["this_run"]["rows"] == 0 and again["input"]["files_done_before"] == 1
    assert ids_once(out) == ["a", "b"]


def test_an_empty_input_file_is_read_once(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a"])
    pq.write_table(TEXT.empty_table(), inp / "empty.parquet")
    runner.run(toy_job(), cfg_for(str(inp), out))
    plan = runner.plan_run(toy_job(), cfg_for(str(inp), out), ledger.Ledger.load(out))
    assert plan.inspected == {} and plan.files_done == 2 and not plan.items


def test_attachment_folders_must_start_with_an_underscore():
    with pytest.raises(ValueError, match="must start with '_'"):
        runner.Attachment("images", pa.schema([pa.field("sample_id", pa.string())]), lambda row: [])


STRICT = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("shout", pa.string(), nullable=False),
                    pa.field("source_file", pa.string())])


def test_a_row_whose_output_breaks_the_schema_is_an_error_row_not_a_failed_run(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a", "nullrow", "b"])

    def emit(row: dict) -> list[dict]:
        shout = None if row["sample_id"] == "nullrow" else row["shout"]
        return [{"sample_id": row["sample_id"], "shout": shout, "source_file": row["source_file"]}]

    job = runner.BatchJob(name="shout", input_schema=TEXT, required=("sample_id",), work_schema=WORK,
                          output_schema=STRICT, emit=emit, stages=toy_job().stages)
    m = runner.run(job, cfg_for(str(inp), out, batch_size=3, commit_rows=3))
    rows, errs = outputs(out)
    assert sorted(r["sample_id"] for r in rows) == ["a", "b"]
    assert [(e["sample_id"], e["stage"]) for e in errs] == [("nullrow", "commit")] and "shout" in errs[0]["reason"]
    assert m["output_total"] == {"rows": 2, "error_rows": 1}
    assert runner.run(job, cfg_for(str(inp), out))["this_run"]["rows"] == 0


def test_the_autoscaler_request_is_withdrawn_when_the_job_ends(ray_local, tmp_path, monkeypatch):
    import ray.autoscaler.sdk

    calls: list = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: calls.append(kw.get("bundles")))
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a"])
    job = toy_job()
    job.stages[0] = runner.Stage("shout", job.stages[0].fn, job.stages[0].kwargs, actors=1, gpus=1)
    with pytest.raises(SystemExit, match="needs 1 GPUs"):  # this cluster never gets one
        runner.run(job, cfg_for(str(inp), out, wait_for_resources_seconds=0.5))
    assert calls == [[{"CPU": 0.25, "GPU": 1}], []]  # asked, then withdrawn


def test_signed_urls_never_reach_error_reasons(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    secret = "X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAEXAMPLE"
    write_input(inp, "a.parquet", ["a"], [f"https://bucket.example/img.jpg?{secret}"])

    def fetch(batch: pa.Table) -> pa.Table:
        raise FileNotFoundError(f"cannot open {batch.column('text')[0].as_py()}")

    job = runner.BatchJob(name="fetch", input_schema=TEXT, required=("sample_id",), work_schema=WORK,
                          output_schema=OUT, emit=toy_job().emit, stages=[runner.Stage("fetch", fetch)])
    runner.run(job, cfg_for(str(inp), out))
    _, errs = outputs(out)
    assert "https://bucket.example/img.jpg?<redacted>" in errs[0]["reason"]
    assert "deadbeef" not in json.dumps(errs) and "AKIAEXAMPLE" not in json.dumps(errs)


# ---------------------------------------------------------------- the sample-id index


def test_a_hash_collision_never_marks_a_new_id_taken(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real = id_index.hashes
    monkeypatch.setattr(id_index, "hashes", lambda ids: real(["same"] * len(list(ids))))  # every id collides
    rows = [{"sample_id": i, "shout": i.upper(), "source_file": "in.parquet"} for i in ("a", "b")]
    ledger.commit(out, "20260101T000000Z-x", "part-x", rows, [], [("in.parquet", 0, 0), ("in.parquet", 0, 1)], OUT)
    assert ledger.Ledger.load(out).taken_ids({"new", "a"}) == {"a": "in.parquet"}  # fresh commit file
    led = ledger.Ledger.load(out)
    led.compact({})
    led = ledger.Ledger.load(out)
    assert led.segments and not led.fresh
    assert led.taken_ids({"new", "a"}) == {"a": "in.parquet"}  # compacted segment


def test_planning_reads_only_the_commits_that_hold_a_candidate(ray_local, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    for k in range(6):
        write_input(inp, f"f{k}.parquet", [f"f{k}-{i}" for i in range(4)])
    runner.run(toy_job(), cfg_for(str(inp), out, commit_rows=4, batch_size=4))
    led = ledger.Ledger.load(out)
    data, _ = led.committed_files()
    assert len(data) >= 6
    opened: list[str] = []
    read = storage.read_table
    monkeypatch.setattr(storage, "read_table", lambda path, columns=None: opened.append(path) or read(path, columns))
    taken = led.taken_ids({"f3-2", "brand-new"})
    assert set(taken) == {"f3-2"}
    holders = [p for p in opened if not p.startswith(os.path.join(out, "_ledger"))]
    assert len(holders) == 1 and "f3-2" in pq.read_table(holders[0]).column("sample_id").to_pylist()


def test_the_index_keeps_only_entries_a_run_must_redo(ray_local, tmp_path):
    """Permanent errors live in the error files, not in index.json; retry_errors still finds them."""
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    marker = tmp_path / "bad-now"
    marker.touch()
    write_input(inp, "a.parquet", [f"s{i}" for i in range(20)], [f"bad {i}" for i in range(20)])
    m = runner.run(toy_job(str(marker)), cfg_for(str(inp), out))
    assert m["output_total"] == {"rows": 0, "error_rows": 20}
    index = json.loads(Path(out, ledger.INDEX_FILE).read_text())
    assert all(r["errors"] == [] and r["errors_in_file"] for r in index["records"] if r["error_rows"])
    assert runner.run(toy_job(str(marker)), cfg_for(str(inp), out))["this_run"]["rows"] == 0
    marker.unlink()
    again = runner.run(toy_job(str(marker)), cfg_for(str(inp), out, retry_errors=True))
    assert again["this_run"]["written"] == 20 and again["output_total"] == {"rows": 20, "error_rows": 0}


# ---------------------------------------------------------------- S3 reads


def test_reading_one_column_chunk_on_s3_fetches_that_chunk_not_a_block(s3_server, monkeypatch):
    import s3fs

    path = "s3://eama-test/big/blobs.parquet"
    blob = os.urandom(1 << 20)
    table = pa.table({"sample_id": [f"id-{i:05d}" for i in range(100)], "image": [blob] * 100})
    storage.write_table_atomic(table, path, row_group_size=10)  # ~100 MB, 10 row groups
    fetched: list[int] = []
    real = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range",
                        lambda self, start, end: fetched.append(end - start) or real(self, start, end))
    ids = storage.read_row_group(path, 5, columns=["sample_id"]).column("sample_id").to_pylist()
    assert ids == [f"id-{i:05d}" for i in range(50, 60)]
    with storage.open_input(path) as fh:
        meta = pq.ParquetFile(fh).metadata
    chunk = meta.row_group(5).column(0).total_compressed_size
    assert sum(fetched) <= 3 * (chunk + meta.serialized_size + 65536), (sum(fetched), chunk)
    fetched.clear()
    storage.read_table(path, columns=["sample_id"])
    assert sum(fetched) < 1 << 20  # ten id chunks and the footer, not 100 MB of images
