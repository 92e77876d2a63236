"""The engine's batch runner, ledger and lease on real Ray, real Parquet and a real S3 API server,
through a small job of its own (no model), so each guarantee is tested apart from any system."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from conftest import run_on_cluster
from eama.engine import faults, ledger, resources, runner, schema, storage
from eama.engine import lease as leases
from eama.engine.lease import Lease, LeaseHeld

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/

TEXT = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("text", pa.string())])
WORK = schema.work_schema(list(TEXT) + [pa.field("shout", pa.string())], ("shout",))
OUT = pa.schema([pa.field("sample_id", pa.string()), pa.field("shout", pa.string()),
                 pa.field("source_file", pa.string())])


def shout(batch: pa.Table, marker: str) -> pa.Table:
    """The toy stage: upper-cases `text`. While `marker` exists, a 'flaky' row raises a lost
    connection for its whole batch and a 'bad' row is the data's fault (its row alone fails)."""
    rows = batch.to_pylist()
    for r in runner.pending(rows):
        if os.path.exists(marker) and "flaky" in r["text"]:
            raise ConnectionResetError("connection reset by peer")
        if os.path.exists(marker) and "bad" in r["text"]:
            runner.fail(r, "shout", "bad text")
            continue
        r["shout"] = r["text"].upper()
    return pa.Table.from_pylist(rows, schema=WORK)


def emit(row: dict) -> list[dict]:
    return [{"sample_id": row["sample_id"], "shout": row["shout"], "source_file": row["source_file"]}]


def toy_job(marker: str = "/nonexistent") -> runner.BatchJob:
    return runner.BatchJob(name="shout", input_schema=TEXT, required=("sample_id",), work_schema=WORK,
                           output_schema=OUT, emit=emit,
                           stages=[runner.Stage("shout", shout, {"marker": marker}, cpus=0.25)])


def write_input(directory: Path, name: str, ids: list[str], texts: list[str] | None = None) -> str:
    path = str(directory / name)
    texts = texts or [f"text of {i}" for i in ids]
    storage.write_table_atomic(pa.Table.from_pylist([{"sample_id": i, "text": t} for i, t in zip(ids, texts)],
                                                    schema=TEXT), path, row_group_size=4)
    return path


def cfg_for(inp: str, out: str, **kw) -> runner.RunnerConfig:
    return runner.RunnerConfig(**{"input": inp, "output": out, "batch_size": 1, "transient_retries": 1, **kw})


def outputs(out: str) -> tuple[list[dict], list[dict]]:
    rows = [r for p in storage.list_files(out) for r in pq.read_table(p).to_pylist()]
    err_dir = storage.join(out, ledger.ERRORS_DIR)
    errs = [r for p in storage.list_files(err_dir) for r in pq.read_table(p).to_pylist()] if storage.exists(err_dir) else []
    return rows, errs


# ---------------------------------------------------------------- exactly once


def test_a_committed_duplicate_never_hides_the_first_occurrence(ray_local, tmp_path):
    """The crash state of the lost-sample hole: the duplicate's error row is committed, the first
    occurrence is not. The re-run must still process the first occurrence."""
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    first = write_input(inp, "a.parquet", ["x", "y"])
    second = write_input(inp, "b.parquet", ["x", "z"])
    # what the old runner could leave behind: b.parquet row 0 committed as a duplicate, a.parquet row 0 not
    ledger.commit(out, "20200101T000000Z-crash", "part-crash", [], [
        {"sample_id": "x", "source_file": second, "row_group": 0, "row": 0, "stage": "duplicate",
         "reason": f"duplicate sample_id 'x': first seen in {first}", "retryable": False}],
        [(second, 0, 0)], OUT)
    m = runner.run(toy_job(), cfg_for(str(inp), out))
    rows, errs = outputs(out)
    assert sorted((r["sample_id"], Path(r["source_file"]).name) for r in rows) == [
        ("x", "a.parquet"), ("y", "a.parquet"), ("z", "b.parquet")]
    assert [(e["sample_id"], e["stage"], Path(e["source_file"]).name) for e in errs] == [("x", "duplicate", "b.parquet")]
    assert m["output_total"] == {"rows": 3, "error_rows": 1}  # 4 rows in


def test_duplicates_within_and_across_runs(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["p", "q", "p"])
    runner.run(toy_job(), cfg_for(str(inp), out))
    write_input(inp, "b.parquet", ["q", "r"])  # q is already committed from a.parquet
    m = runner.run(toy_job(), cfg_for(str(inp), out))
    rows, errs = outputs(out)
    assert sorted(r["sample_id"] for r in rows) == ["p", "q", "r"]
    assert sorted((e["sample_id"], Path(e["source_file"]).name, e["row"]) for e in errs) == [
        ("p", "a.parquet", 2), ("q", "b.parquet", 0)]
    assert "already committed" in [e for e in errs if e["sample_id"] == "q"][0]["reason"]
    assert m["this_run"]["rows"] == 2 and m["input"]["files_done_before"] == 1


def test_commits_hold_commit_rows(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", [f"s{i:02d}" for i in range(23)])
    runner.run(toy_job(), cfg_for(str(inp), out, commit_rows=5, batch_size=2))
    files = storage.list_files(out)
    assert all(pq.read_metadata(f).num_rows <= 5 for f in files) and len(files) >= 5
    assert sum(pq.read_metadata(f).num_rows for f in files) == 23
    assert not storage.list_files(storage.join(out, ledger.COMMITS_DIR), ".json")  # compacted into the index
    assert runner.RunnerConfig().commit_rows >= 1000


def test_a_commit_cut_off_by_a_crash_is_discarded_and_redone(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    ids = [f"s{i:02d}" for i in range(12)]
    path = write_input(inp, "a.parquet", ids)  # row groups of 4

    def forged(rows: range) -> tuple[list[dict], list[tuple[str, int, int]]]:
        return ([{"sample_id": ids[i], "shout": "OLD", "source_file": path} for i in rows],
                [(path, i // 4, i % 4) for i in rows])

    done, where = forged(range(0, 4))
    ledger.commit(out, "20200101T000000Z-crash", "part-a", done, [], where, OUT)
    cut, where = forged(range(4, 9))
    ledger.commit(out, "20200101T000000Z-crash", "part-b", cut[1:], [
        {"sample_id": ids[4], "source_file": path, "row_group": 1, "row": 0, "stage": "shout", "reason": "x",
         "retryable": False}], where, OUT)
    os.remove(os.path.join(out, "part-b.parquet"))  # the crash came before the data file
    m = runner.run(toy_job(), cfg_for(str(inp), out))
    rows, errs = outputs(out)
    assert m["this_run"]["rows"] == 8 and not errs
    assert sorted(r["sample_id"] for r in rows) == ids
    assert [r["shout"] for r in rows if r["sample_id"] in ids[:4]] == ["OLD"] * 4  # committed work kept


def test_a_glob_input_and_a_file_that_grows(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a0", "a1", "a2", "a3"])
    assert runner.run(toy_job(), cfg_for(str(inp / "*.parquet"), out))["this_run"]["rows"] == 4
    write_input(inp, "a.parquet", ["a0", "a1", "a2", "a3", "a4", "a5"])  # rewritten with two more rows
    assert runner.run(toy_job(), cfg_for(str(inp / "*.parquet"), out))["this_run"]["rows"] == 2
    m = runner.run(toy_job(), cfg_for(str(inp / "*.parquet"), out))
    rows, errs = outputs(out)
    assert m["this_run"]["rows"] == 0 and sorted(r["sample_id"] for r in rows) == [f"a{i}" for i in range(6)]
    assert not errs and m["output_total"] == {"rows": 6, "error_rows": 0}


def test_a_batch_that_failed_whole_is_redone_without_stale_errors(ray_local, tmp_path):
    inp, out, marker = tmp_path / "in", str(tmp_path / "out"), tmp_path / "faulty"
    inp.mkdir()
    marker.write_text("on")
    write_input(inp, "a.parquet", ["f1", "f2"], ["flaky one", "flaky two"])
    first = runner.run(toy_job(str(marker)), cfg_for(str(inp), out))
    assert first["this_run"]["retryable_errors"] == 2 and first["output_total"] == {"rows": 0, "error_rows": 2}
    marker.unlink()
    second = runner.run(toy_job(str(marker)), cfg_for(str(inp), out))
    rows, errs = outputs(out)
    assert sorted(r["sample_id"] for r in rows) == ["f1", "f2"] and errs == []
    assert second["output_total"] == {"rows": 2, "error_rows": 0}


def test_noop_replan_reads_no_committed_data_and_no_footer(ray_local, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    for k in range(5):
        write_input(inp, f"part-{k}.parquet", [f"{k}-{i}" for i in range(6)])
    runner.run(toy_job(), cfg_for(str(inp), out, commit_rows=7))
    calls = []
    for fn in ("read_table", "read_schema", "row_group_rows", "read_row_group"):
        monkeypatch.setattr(storage, fn, lambda *a, _fn=fn, **k: calls.append(_fn))
    plan = runner.plan_run(toy_job(), cfg_for(str(inp), out), ledger.Ledger.load(out))
    assert (plan.pending_rows, plan.files_done, plan.input_rows, calls) == (0, 5, 30, [])


# ---------------------------------------------------------------- transient and permanent faults


def test_transient_faults_are_retryable_and_redone_permanent_ones_only_on_request(ray_local, tmp_path):
    inp, out, marker = tmp_path / "in", str(tmp_path / "out"), tmp_path / "faulty"
    inp.mkdir()
    marker.write_text("on")
    write_input(inp, "a.parquet", ["ok", "flaky", "bad"], ["fine", "flaky net", "bad data"])
    job = toy_job(str(marker))
    m1 = runner.run(job, cfg_for(str(inp), out))
    _, errs = outputs(out)
    assert {e["sample_id"]: (e["stage"], e["retryable"]) for e in errs} == {"flaky": ("shout", True),
                                                                           "bad": ("shout", False)}
    assert "ConnectionResetError" in [e for e in errs if e["sample_id"] == "flaky"][0]["reason"]
    assert m1["this_run"]["retryable_errors"] == 1
    marker.unlink()  # the network is back, the data is fixed
    m2 = runner.run(job, cfg_for(str(inp), out))
    rows, errs = outputs(out)
    assert m2["this_run"]["rows"] == 1  # only the retryable row is redone
    assert sorted(r["sample_id"] for r in rows) == ["flaky", "ok"]
    assert [e["sample_id"] for e in errs] == ["bad"]  # the retryable error row is gone from _errors
    assert m2["output_total"] == {"rows": 2, "error_rows": 1}
    m3 = runner.run(job, cfg_for(str(inp), out, retry_errors=True))
    rows, errs = outputs(out)
    assert m3["this_run"]["rows"] == 1 and sorted(r["sample_id"] for r in rows) == ["bad", "flaky", "ok"]
    assert errs == [] and m3["output_total"] == {"rows": 3, "error_rows": 0}
    assert runner.run(job, cfg_for(str(inp), out, retry_errors=True))["this_run"]["rows"] == 0


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError("reset"), True),
    (TimeoutError("read timed out"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (ValueError("image too large: 50000 x 50000 pixels exceeds the 500 megapixel limit"), False),
    (KeyError("article"), False),
    (RuntimeError("shape mismatch: value tensor of shape [3] cannot be broadcast"), False),
])
def test_fault_classes(exc, transient):
    assert faults.is_transient(exc) is transient


def test_a_fault_raised_from_none_is_judged_alone():
    try:
        try:
            raise TimeoutError("slow disk")
        except TimeoutError:
            raise ValueError("bad row") from None
    except ValueError as exc:
        assert not faults.is_transient(exc)
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("fetch failed") from inner
    except RuntimeError as exc:
        assert faults.is_transient(exc)


def test_real_library_faults_are_classified():
    import botocore.exceptions
    import torch
    from PIL import Image, UnidentifiedImageError

    assert faults.is_transient(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert faults.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    missing = botocore.exceptions.ClientError({"Error": {"Code": "NoSuchKey", "Message": "img-500.jpg"},
                                               "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")
    busy = botocore.exceptions.ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your rate"},
                                            "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    assert not faults.is_transient(missing) and faults.is_transient(busy)
    with pytest.raises(UnidentifiedImageError) as bad:
        Image.open(__import__("io").BytesIO(b"not an image"))
    assert not faults.is_transient(bad.value)


# ---------------------------------------------------------------- one run per output


def test_a_second_run_on_a_held_output_refuses_and_names_the_holder(ray_local, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_input(inp, "a.parquet", ["a"])
    with Lease(out, "scheduled-run-1", ttl=60):
        with pytest.raises(LeaseHeld, match="scheduled-run-1") as held:
            runner.run(toy_job(), cfg_for(str(inp), out))
        assert socket.gethostname() in held.value.message and held.value.code == 3
        assert not storage.list_files(out)  # the refused run wrote nothing
    assert runner.run(toy_job(), cfg_for(str(inp), out))["this_run"]["written"] == 1
    assert leases.holder(out) is None  # released at the end


def _claim(out: str, generation: int, **fields) -> Path:
    path = Path(out) / "_lease" / f"gen-{generation:010d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields) if fields else "")
    return path


def test_stale_leases_are_broken(tmp_path):
    out = str(tmp_path / "out")
    expired = {"run_id": "old", "host": "elsewhere", "machine": "elsewhere", "pid": 1, "token": "t",
               "acquired": 0, "expires": time.time() - 1}
    _claim(out, 1, **expired)
    with Lease(out, "new", ttl=60) as lease:
        assert lease.generation == 2 and leases.holder(out)["run_id"] == "new"
    # a live-looking claim of this very machine whose process is gone
    dead = dict(expired, host=socket.gethostname(), machine=leases.machine_id(), pid=2 ** 22 + 12345,
                expires=time.time() + 3600)
    _claim(out, 3, **dead)
    with Lease(out, "newer", ttl=60) as lease:
        assert lease.generation == 4 and leases.holder(out)["run_id"] == "newer"
    # the same host name in another container (another process namespace): held until it expires
    _claim(out, 5, **dict(dead, machine=socket.gethostname() + "/other-boot/other-ns"))
    with pytest.raises(LeaseHeld, match="old"):
        Lease(out, "third", ttl=60).acquire()


def test_an_unreadable_lease_is_held_until_it_is_old(tmp_path):
    out = str(tmp_path / "out")
    path = _claim(out, 1)  # cut short by a crash mid-write, or another tool's file
    with pytest.raises(LeaseHeld, match="unreadable"):
        Lease(out, "new", ttl=60).acquire()
    os.utime(path, (time.time() - 400, time.time() - 400))
    with Lease(out, "new", ttl=60):
        assert leases.holder(out)["run_id"] == "new"


def test_two_runs_taking_over_one_stale_lease_get_one_generation_each(tmp_path):
    """Take-over is an exclusive create of the next claim: of two runs that both saw the stale
    claim, exactly one gets generation 2; the other refuses (the winner is live)."""
    out = str(tmp_path / "out")
    _claim(out, 1, run_id="old", machine="elsewhere", pid=1, expires=time.time() - 1, acquired=0)
    a, b = Lease(out, "a", ttl=60), Lease(out, "b", ttl=60)
    a.generation = b.generation = 2
    assert storage.create_exclusive(a.path, a._record())
    assert not storage.create_exclusive(b.path, b._record()) and not b._is_mine()
    assert a._is_mine()  # a lost answer to a's create, retried, finds a's own claim: never refuses itself
    with pytest.raises(LeaseHeld, match="in use by run a"):
        Lease(out, "c", ttl=60).acquire()


def test_the_lease_is_exclusive_on_s3_and_renewed(s3_server):
    out = "s3://eama-test/leased"
    with Lease(out, "first", ttl=1.5) as lease:
        with pytest.raises(LeaseHeld, match="first"):
            Lease(out, "second", ttl=60).acquire()
        before = json.loads(storage.read_bytes(lease.path))["expires"]
        time.sleep(1.2)  # renewed every ttl/3
        assert json.loads(storage.read_bytes(lease.path))["expires"] > before
    assert leases.holder(out) is None


def test_one_s3_client_per_process_and_endpoint(s3_server, monkeypatch):
    a, b = storage.filesystem("s3://eama-test/x"), storage.filesystem("s3://other/y.parquet")
    assert a is b
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage.filesystem("s3://eama-test/x") is not a


# ---------------------------------------------------------------- GPUs on a cold cluster


def test_plan_for_a_gpu_cluster_that_scales_from_zero():
    plan = resources.plan_stages(cpus=8, gpus=0, device="cuda", mllm_actors=2)
    assert (plan.mllm_actors, plan.mllm_gpus, plan.device) == (2, 1.0, "cuda")
    stages = [runner.Stage("mllm", object, actors=2, cpus=1.0, gpus=1.0), runner.Stage("ner", object, actors=3)]
    assert runner.demand(stages) == [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 0.25}] * 3


@pytest.mark.slow
def test_the_job_waits_for_gpus_the_autoscaler_adds(tmp_path):
    """A simulated cluster with no GPU: the runner asks for two, a GPU node joins, the wait ends;
    with nobody adding one, the wait ends in a clear error."""
    done = run_on_cluster("""
        from eama.engine import runner
        stages = [runner.Stage("mllm", object, actors=2, cpus=0.5, gpus=1.0)]
        t0 = time.time()
        waiter = threading.Thread(target=runner.ensure_resources, args=(stages, 120, 0.5))
        waiter.start()
        time.sleep(3.0)
        assert waiter.is_alive()  # still waiting: the cluster has no GPU
        cluster.add_node(num_cpus=1, num_gpus=2)  # what the autoscaler does when asked
        waiter.join(timeout=60)
        print("WAITED", round(time.time() - t0, 1), ray.cluster_resources().get("GPU"))
        try:
            runner.ensure_resources([runner.Stage("mllm", object, actors=4, cpus=0.5, gpus=1.0)], timeout=2, poll=0.5)
        except SystemExit as exc:
            print("REFUSED", exc)
        """, head_cpus=1, worker_cpus=1, workers=0, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    waited = next(line for line in done.stdout.splitlines() if line.startswith("WAITED")).split()
    assert float(waited[1]) >= 2.5 and float(waited[2]) == 2.0
    assert "the plan needs 4 GPUs" in done.stdout and "has 2" in done.stdout
