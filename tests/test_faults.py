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


def _deepspeed_engine(seed: int, zero_stage: int):
    """A real DeepSpeed engine (CPU, the project's config builder) on a small torch module."""
    import deepspeed
    import torch

    from eama.engine import deepspeed_config

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    cfg = deepspeed_config.build_config(zero_stage=zero_stage, micro_batch_size=2, grad_accum=1, world_size=1,
                                        lr=1e-2, param_persistence_threshold=0)
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)[0]


@pytest.fixture(scope="module")
def single_process_group():
    """torch.distributed over gloo with this process as the only rank (on 127.0.0.1), as DeepSpeed
    needs one. One group for the whole module: DeepSpeed caches its groups, so engines built after
    a second init_distributed would still point at the first, destroyed group."""
    import socket

    import deepspeed
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:  # deepspeed.initialize reads LOCAL_RANK too
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            patch.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [2, 3])  # ZeRO-1/2 shards hold fragment addresses, ZeRO-3 its own layout
def test_training_checkpoints_are_unpickled_weights_only(zero_stage, tmp_path, single_process_group):
    """A real DeepSpeed checkpoint round-trips through the trainer's loader; with a pickled payload
    planted in it the loader refuses it (DeepSpeed's own loader would run the payload)."""
    import pickle

    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from ray.train import Checkpoint

    from eama.engine.training.checkpoints import DS_TAG, gather_state_dict, load_engine_state

    def weights(engine) -> list:
        return [t.detach().clone() for t in gather_state_dict(engine, rank=0).values()]  # ZeRO-3: gathered

    trained = _deepspeed_engine(seed=0, zero_stage=zero_stage)
    loss = trained(torch.ones(2, 4)).square().mean()
    trained.backward(loss)
    trained.step()
    ckpt = tmp_path / "ckpt"
    trained.save_checkpoint(str(ckpt), tag=DS_TAG)

    fresh = _deepspeed_engine(seed=1, zero_stage=zero_stage)
    before = weights(fresh)
    load_engine_state(fresh, Checkpoint.from_directory(str(ckpt)), rank=0)
    after, want = weights(fresh), weights(trained)
    assert len(after) == 4 and all(torch.equal(a, b) for a, b in zip(after, want))
    assert not any(torch.equal(a, b) for a, b in zip(before, after))  # really replaced

    (states,) = (ckpt / DS_TAG).glob("*mp_rank_00_model_states.pt")  # ZeRO-3 prefixes zero_pp_rank_0_
    marker = tmp_path / "pwned"
    blob = torch.load(states, weights_only=False)  # the file this test just wrote
    blob["client_state"] = _Payload(str(marker))
    torch.save(blob, states)
    with pytest.raises(pickle.UnpicklingError):
        load_engine_state(_deepspeed_engine(seed=1, zero_stage=zero_stage), Checkpoint.from_directory(str(ckpt)), rank=0)
    assert not marker.exists()
    TorchCheckpointEngine(fresh._config).load(str(states))  # DeepSpeed's default: weights_only=False
    assert marker.exists()  # so the payload was live, and only the trainer's loader stopped it
