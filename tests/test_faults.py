"""Nothing is lost: bad input, a killed MLLM actor, a killed node, an S3 outage; and security."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import run_on_cluster
from eama.engine import schema, storage
from eama.news import demo, models
from test_caption_corpus import ROOT, read_output, run_job, write_bad_corpus

SECRET = "eama-test-secret-do-not-log-7f3a9c"


def _jpeg(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "gray").save(buf, "JPEG", quality=50)
    return buf.getvalue()


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.new("I;16", (30, 30), 50000).save(buf, "PNG")
    return buf.getvalue()


def test_hostile_corpus_every_row_accounted_for(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    n_bad = write_bad_corpus(tmp_path / "in")
    base = list(demo.generate_samples(2, seed=6))[0]
    extra = [
        dict(base, sample_id="huge-image", image=_jpeg((8000, 8000))),
        dict(base, sample_id="png16", image=_png16()),
        dict(base, sample_id="long-article", article=base["article"] + " word" * 200_000),
        dict(base, sample_id="non-english", article="Angela Merkel besuchte am Montag Paris. Der Präsident empfing sie."),
        dict(base, sample_id="mixed-script", article="習近平 met Emmanuel Macron in Beijing. Москва responded on Friday. مرحبا"),
        dict(base, sample_id="null-caption", caption=None),
        dict(base, sample_id="../../escape/../../etc/passwd"),
    ]
    pq.write_table(pa.Table.from_pylist(extra, schema=schema.SAMPLE), tmp_path / "in" / "part-3.parquet")
    out = str(tmp_path / "out")
    run_job(str(tmp_path / "in"), out)
    rows, errs = read_output(out)
    sample_errors = errs.filter(pa.compute.is_valid(errs["sample_id"]))
    assert rows.num_rows + sample_errors.num_rows == n_bad + len(extra)
    ok = set(rows.column("sample_id").to_pylist())
    assert {"huge-image", "png16", "long-article", "non-english", "mixed-script", "null-caption"} <= ok
    long_row = rows.filter(pa.compute.equal(rows["sample_id"], "long-article")).to_pylist()[0]
    assert sum(len(s.split()) for s in long_row["sentences"]) <= 5000 + 50  # truncated, bounded
    # every file written stays inside the output directory, whatever the sample ids say
    for path in Path(out).rglob("*"):
        assert Path(out).resolve() in path.resolve().parents
    assert not (tmp_path / "escape").exists() and not (tmp_path / "etc").exists()


def _captioner_pids() -> list[int]:
    """Worker processes of live MLLM actors (Ray titles them 'ray::MapWorker(MapBatches(Mllm))')."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::") and "(Mllm)" in cmd:
            pids.append(proc.pid)
    return pids


def _in_thread(fn, *args):
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _wait_for_commits(out: Path, count: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < count:
        time.sleep(0.05)


def test_killed_mllm_actor_is_restarted_and_nothing_is_lost(ray_local, tmp_path):
    corpus, out = tmp_path / "in", tmp_path / "out"
    demo.write_demo_corpus(str(corpus), num_samples=48, shard_size=16, seed=12)
    thread, result = _in_thread(run_job, str(corpus), str(out), "batch_size=2", "commit_rows=4", "max_new_tokens=24")
    _wait_for_commits(out, 2)
    pids = _captioner_pids()
    assert pids, "no Captioner actor found"
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    rows, errs = read_output(str(out))
    ids = rows.column("sample_id").to_pylist()
    assert errs.num_rows == 0 and len(ids) == 48 and len(set(ids)) == 48


def test_s3_outage_mid_run_is_retried_and_leaves_no_partial_object(ray_local, s3_server, tmp_path):
    endpoint, server = s3_server
    corpus, out = "s3://eama-test/outage-in", "s3://eama-test/outage-out"
    demo.write_demo_corpus(corpus, num_samples=32, shard_size=8, seed=13)
    thread, result = _in_thread(run_job, corpus, out, "batch_size=2", "commit_rows=4", "max_new_tokens=16")
    fs = storage.filesystem(out)
    deadline = time.time() + 240
    while time.time() < deadline and not [p for p in fs.find("eama-test/outage-out") if "/part-" in p]:
        time.sleep(0.1)
        fs.invalidate_cache()
    server.stop()
    time.sleep(3)
    server.start()
    thread.join(timeout=400)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    rows, errs = read_output(out)
    ids = rows.column("sample_id").to_pylist()
    assert errs.num_rows == 0 and len(ids) == 32 and len(set(ids)) == 32
    for path in storage.list_files(out):  # every committed object is a whole Parquet file
        pq.read_metadata(io.BytesIO(storage.read_bytes(path)))


def test_credentials_never_reach_logs_manifests_or_errors(s3_server, tmp_path):
    corpus, out = "s3://eama-test/creds-in", "s3://eama-test/creds-out"
    rows = list(demo.generate_samples(6, seed=14))
    rows[0] = dict(rows[0], image=None, image_uri="s3://eama-test/no-such-image.jpg")
    storage.write_table_atomic(pa.Table.from_pylist(rows, schema=schema.SAMPLE), corpus + "/part-0.parquet")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "caption_corpus.py"), "--input", corpus,
                           "--output", out, "max_new_tokens=8"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _, errs = read_output(out)
    assert errs.num_rows == 1 and "not found" in errs.column("reason")[0].as_py()
    texts = [done.stdout, done.stderr]
    fs = storage.filesystem(out)
    texts += [fs.cat_file(p).decode("latin-1") for p in fs.find("eama-test/creds-out")]
    for text in texts:
        assert SECRET not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text


def test_remote_code_is_not_trusted_by_default(tmp_path):
    path = models.build_tiny_model("llava", str(tmp_path / "m"))
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg["model_type"] = "evil-custom"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (Path(path) / "config.json").write_text(json.dumps(cfg))
    (Path(path) / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        models.load_model(path)


def test_killed_worker_node_mid_run_loses_nothing(tmp_path):
    corpus, out = tmp_path / "in", tmp_path / "out"
    demo.write_demo_corpus(str(corpus), num_samples=48, shard_size=8, seed=15)
    done = run_on_cluster(f"""
        result = {{}}
        def go():
            result["m"] = caption_corpus.main(["--input", {str(corpus)!r}, "--output", {str(out)!r}, "batch_size=2",
                                               "commit_rows=4", "max_new_tokens=24", "selection_max_new_tokens=8"])
        t = threading.Thread(target=go, daemon=True)
        t.start()
        deadline = time.time() + 240
        while time.time() < deadline and len(glob.glob({str(out)!r} + "/part-*.parquet")) < 2:
            time.sleep(0.05)
        cluster.remove_node(workers[0])
        print("NODE REMOVED", flush=True)
        cluster.add_node(num_cpus=2)
        t.join(400)
        print("RESULT", json.dumps(result["m"]["this_run"]))
        """, head_cpus=2, worker_cpus=2, workers=1, timeout=500)
    assert done.returncode == 0 and "NODE REMOVED" in done.stdout, (done.stdout[-2000:], done.stderr[-4000:])
    rows, errs = read_output(str(out))
    ids = rows.column("sample_id").to_pylist()
    assert errs.num_rows == 0 and len(ids) == 48 and len(set(ids)) == 48


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_training_checkpoints_are_unpickled_weights_only(tmp_path):
    import pickle
    import types

    import torch

    from eama.engine import trainer

    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, tmp_path / "evil.pt")
    engine = trainer.safe_checkpoint_engine(types.SimpleNamespace(_config=None))
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(3)}}, tmp_path / "ok.pt")
    assert float(engine.load(str(tmp_path / "ok.pt"))["module"]["w"].sum()) == 3.0
