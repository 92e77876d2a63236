"""The GPU plan on a cluster that scales from zero: device=cuda with a replica count plans a pool
that starts on the first GPU and grows to the count (the autoscaler asked for all of it); without
a count and with no GPU up it refuses in one line naming the key. A simulated multi-node cluster
(ray.cluster_utils on 127.0.0.1) runs a real job through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_on_cluster
from eama.engine import config, resources, runner
from eama.news import benchmark, gpu_cost

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("plan, key", [
    (lambda n: resources.plan_stages(cpus=8, gpus=0, device="cuda", mllm_actors=n), "mllm_actors"),
    (lambda n: resources.plan_views(8, 0, ("caption", "ocr"), device="cuda", caption_actors=n), "caption_actors"),
    (lambda n: resources.plan_model_pool(8, 0, device="cuda", actors=n), "actors"),
])
def test_device_cuda_on_a_cluster_with_no_gpu_takes_the_replica_count_or_refuses_naming_it(plan, key):
    with pytest.raises(config.ConfigError, match=f"set {key}=N, the replicas to ask the autoscaler for"):
        plan(0)
    sized = plan(4)
    replicas = {"mllm_actors": "mllm_actors", "caption_actors": "caption_actors", "actors": "actors"}[key]
    assert getattr(sized, replicas) == 4 and sized.device == "cuda"


def test_plans_off_a_cold_cluster_are_unchanged():
    """Replicas follow the GPUs up when there are some; laptops keep a CPU for the I/O tasks."""
    assert resources.plan_stages(cpus=192, gpus=8, device="cuda").mllm_actors == 8
    assert resources.plan_model_pool(64, 2, device="cuda").actors == 2
    laptop = resources.plan_stages(cpus=2, gpus=0)
    held = laptop.ner_actors * laptop.ner_cpus + laptop.mllm_actors * laptop.mllm_cpus \
        + laptop.caption_ner_actors * laptop.caption_ner_cpus
    assert laptop.device == "cpu" and 2 - held >= 0.75


@pytest.mark.parametrize("actors, each, up, first", [
    (4, 1.0, 0, 1),  # nothing up: the first GPU to join starts the pool
    (4, 1.0, 2, 2),  # what is up starts, the rest join later
    (4, 1.0, 8, 4),  # everything fits: a fixed pool
    (2, 0.5, 1, 2),
])
def test_a_gpu_pool_starts_with_what_the_gpus_up_hold(actors, each, up, first):
    assert resources.min_replicas(actors, each, up) == first


def test_a_pool_growing_from_one_is_what_ray_data_maps_and_what_the_manifest_says():
    st = runner.Stage("mllm", object, actors=4, cpus=0.5, gpus=1.0, min_actors=1)
    strategy = runner.pool_strategy(st)
    assert (strategy.min_size, strategy.max_size) == (1, 4)
    assert st.describe() == "1-4 actors x 0.5 CPU + 1.0 GPU"
    assert runner.pool_strategy(runner.Stage("ner", object, actors=2)).max_size == 2
    assert runner.demand([st]) == [{"CPU": 0.5, "GPU": 1.0}] * 4  # the autoscaler is asked for the whole pool


def test_caption_corpus_with_device_cuda_on_no_gpu_refuses_in_one_line(tmp_path, demo_corpus):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "caption_corpus.py"), "--input", str(demo_corpus),
                           "--output", str(tmp_path / "out"), "device=cuda"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: device=cuda, but the cluster has 0 GPUs up") and "set mllm_actors=N" in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("part-*"))


@pytest.mark.slow
def test_a_cold_cluster_asks_for_the_whole_pool_and_runs_on_the_first_gpu(tmp_path):
    """A real job with a 3-replica GPU pool on a cluster with no GPU: the autoscaler is asked for
    three GPU bundles, the job waits, one GPU node joins (the autoscaler's answer so far) and the
    job runs to the end on it; the request is withdrawn after."""
    done = run_on_cluster(f"""
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import os
        import pyarrow as pa
        from ray.experimental.internal_kv import _internal_kv_get
        from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
        from eama.engine import runner
        from test_engine import WORK, cfg_for, outputs, toy_job, write_input
        from pathlib import Path

        def standing():
            return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")

        class GpuShout:
            def __init__(self):
                self.gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
            def __call__(self, batch):
                rows = batch.to_pylist()
                for r in runner.pending(rows):
                    r["shout"] = r["text"].upper() + " on GPU " + str(self.gpus)
                return pa.Table.from_pylist(rows, schema=WORK)

        tmp = Path({str(tmp_path)!r})
        (tmp / "in").mkdir()
        write_input(tmp / "in", "a.parquet", [f"s{{k}}" for k in range(12)])
        job = toy_job()
        job.stages = [runner.Stage("shout", GpuShout, actors=3, cpus=0.25, gpus=1.0)]
        result = {{}}
        t = threading.Thread(target=lambda: result.update(m=runner.run(
            job, cfg_for(str(tmp / "in"), str(tmp / "out"), batch_size=2, wait_for_resources_seconds=200))))
        t.start()
        deadline = time.time() + 60
        while not standing() and time.time() < deadline:
            time.sleep(0.2)
        print("REQUEST", json.dumps(standing()))
        time.sleep(3.0)
        print("WAITING", t.is_alive(), len(glob.glob(str(tmp / "out" / "part-*"))))
        cluster.add_node(num_cpus=1, num_gpus=1)
        t.join(timeout=240)
        print("DONE", not t.is_alive())
        m = result["m"]
        print("PLAN", m["plan"]["shout"])
        rows, errs = outputs(str(tmp / "out"))
        print("ROWS", json.dumps(sorted(r["shout"] for r in rows)))
        print("ERRORS", len(errs))
        print("AFTER", json.dumps(standing()))
        """, head_cpus=2, worker_cpus=1, workers=0, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    out = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()
           if line.split(" ", 1)[0] in ("REQUEST", "WAITING", "DONE", "PLAN", "ROWS", "ERRORS", "AFTER")}
    assert out["REQUEST"] == '[{"CPU": 0.25, "GPU": 1.0}, {"CPU": 0.25, "GPU": 1.0}, {"CPU": 0.25, "GPU": 1.0}]'
    assert out["WAITING"] == "True 0"  # no GPU yet: nothing ran
    assert out["DONE"] == "True"
    assert out["PLAN"] == "1-3 actors x 0.25 CPU + 1.0 GPU"
    assert json.loads(out["ROWS"]) == sorted(f"TEXT OF S{k} on GPU 0" for k in range(12)) and out["ERRORS"] == "0"
    assert out["AFTER"] == "[]"


def test_the_cost_model_gives_the_figures_worked_by_hand():
    """docs/cluster.md's rules, worked by hand for 955 computed prompt tokens, 990 KV tokens a
    sequence and 32 decoding steps: vLLM on an H100 holds (0.9 x 80 - 13.5) GB / 0.519 GB = 112
    sequences, a step reads 71.6 GB at 2,345 GB/s (30.5 ms), so 8.7 ms a sample; prefill is
    (955 x 13.48 + 350) GFLOP at 494.5 TFLOPS = 26.7 ms; 28.2 samples/s, 7.8 GPU-hours for 793k.
    transformers: 8 rows at the 25 ms floor, 32 x 25 / 8 = 100 ms; 7.5 samples/s."""
    work = gpu_cost.Work(computed_tokens=955, kv_tokens=990, decode_steps=32)
    vllm = gpu_cost.estimate(gpu_cost.GPUS["h100"], "vllm", work, 793_000)
    assert vllm["batch"] == 112
    assert (round(vllm["prefill_ms"], 1), round(vllm["decode_ms"], 1)) == (26.7, 8.7)
    assert (round(vllm["samples_per_s"], 1), round(vllm["gpu_hours"], 1)) == (28.2, 7.8)
    hf = gpu_cost.estimate(gpu_cost.GPUS["h100"], "hf", work, 793_000)
    assert (hf["batch"], hf["decode_ms"], round(hf["samples_per_s"], 1)) == (8, 100.0, 7.5)
    # a longer sequence leaves the token budget fewer rows: 8192 // 1722 = 4
    assert gpu_cost.estimate(gpu_cost.GPUS["h100"], "hf", gpu_cost.Work(1690, 1722, 32), 1)["batch"] == 4
    # the measured totals: 12 samples, 20,285 prompt tokens, none cached, one prompt and 32 steps each
    measured = gpu_cost.measured_work(20_285, 0, 12, 1, 32)
    assert (round(measured.computed_tokens), round(measured.kv_tokens), measured.decode_steps) == (1690, 1722, 32)


def test_the_benchmark_feeds_the_cost_model_vllms_counts_per_mode():
    """eama sends two selection prompts a candidate group and the caption prompt: with 1.5 groups a
    sample that is 4 prompts and 1.5 x 2 x 24 + 32 = 104 decoding steps; the cached prompt tokens
    are not computed. Without vLLM's counts there is no cost table."""
    cfg = benchmark.BenchConfig(max_new_tokens=32, selection_max_new_tokens=24)
    rows = [{"engine": "vllm", "mode": "plain", "prompt_tokens": 2000, "cached_tokens": 0, "samples": 2},
            {"engine": "vllm", "mode": "eama", "prompt_tokens": 8000, "cached_tokens": 5000, "samples": 2},
            {"engine": "hf", "mode": "eama", "prompt_tokens": 8000, "cached_tokens": None, "samples": 2}]
    works = benchmark.corpus_work(cfg, rows, groups=1.5)
    assert works["plain"] == gpu_cost.Work(1000, 1032, 32)
    assert works["eama"] == gpu_cost.Work(1500, 1000 + 104 / 4, 104)
    assert benchmark.corpus_work(cfg, rows[2:], groups=1.5) == {}
