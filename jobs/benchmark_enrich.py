"""benchmark_enrich: enrich_posts' one pass against image_views -> tag_entities -> extract_keyphrases in sequence, same rows, same exports.

    python jobs/benchmark_enrich.py [posts=2000] [--mner-model RUN/export] [--keyphrase-model RUN/export] [key=value ...]

The corpus: real Twitter-2017 posts (tokens and the given BLIP-2 captions, which serve as the
caption view: no captioner runs) with a generated image each that shows one of the post's words,
so OCR has something to read. Without --mner-model / --keyphrase-model it first trains small
MiniLM models (an ITA tagger with the `all` view on Twitter-2017 train, an MM-MKP model on the
keyphrase valid split; launcher=local), once: OUTPUT/models is reused.

One run prints: wall time, rows/s, images decoded per post and Parquet bytes read of the one pass
and of the three jobs (with the join a user runs between them), their ratio, and the one pass's
steady-state rate (rows after the first commit over the time after it) against its slowest stage
alone (each stage of the one pass run in this process on the same rows, with the threads its
actors get). Writes RESULTS/benchmark_enrich.json with the commit and the resolved config.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
import time
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from eama.engine import benchmarks, config, enrichment, resources, schema, storage
from eama.keyphrase import corpus as kp_corpus
from eama.keyphrase import extraction
from eama.keyphrase import model as kp_model
from eama.keyphrase import training as kp_training
from eama.mner import conll, methods, tagging, training

log = logging.getLogger("eama.benchmark_enrich")


@dataclasses.dataclass
class EnrichBenchConfig:
    data: str = "../shared/data"  # holds mner/twitter2017 and keyphrase/
    output: str = os.path.join("bench_out", "enrich")  # corpus, models and job outputs
    results: str = "jobs/results"  # RESULTS/benchmark_enrich.json (kept in git)
    posts: int = 2000  # posts in the corpus (Twitter-2017 test, valid, then train)
    mner_model: str = ""  # a train_mner export; empty: train a small one (once)
    keyphrase_model: str = ""  # a train_keyphrase export; empty: train a small one (once)
    commit_rows: int = 100  # rows per commit in every job
    alone_rows: int = 48  # rows each stage runs on alone


FLAGS = [
    config.Flag("--mner-model", "mner_model", "a train_mner export (default: train a small one once)"),
    config.Flag("--keyphrase-model", "keyphrase_model", "a train_keyphrase export (default: train a small one once)"),
    config.Flag("--output", "output", "working directory; OUTPUT/benchmark_enrich.json gets the figures"),
]


def drawn(word: str, seed: int) -> bytes:
    """A 480x240 JPEG: one word in black on a white band over a coloured background."""
    img = Image.new("RGB", (480, 240), ((seed * 37) % 200, (seed * 91) % 200, 120))
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 70, 470, 170), fill="white")
    draw.text((24, 88), word[:14], fill="black", font=ImageFont.load_default(size=52))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_corpus(cfg: EnrichBenchConfig) -> str:
    """OUTPUT/corpus: `posts` MNER rows with captions and a drawn image each (built once)."""
    out = storage.join(cfg.output, "corpus")
    if storage.exists(out):
        return out
    folder = os.path.join(cfg.data, "mner", "twitter2017")
    rows: list[dict[str, Any]] = []
    for split in ("test", "valid", "train"):
        for row, _ in conll.twitter_samples(os.path.join(folder, f"{split}.txt"), os.path.join(folder, "blip2_captions.txt")):
            if row and len(rows) < cfg.posts:
                word = max(row["tokens"], key=len)
                rows.append({**row, "sample_id": f"{split}-{row['sample_id']}", "image": drawn(word, len(rows))})
    os.makedirs(out + ".tmp", exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.MNER_SAMPLE), os.path.join(out + ".tmp", "part-0.parquet"),
                   row_group_size=cfg.commit_rows)
    os.rename(out + ".tmp", out)
    return out


def train_models(cfg: EnrichBenchConfig) -> None:
    """Small MiniLM exports for the benchmark where none are given (trained once, then reused)."""
    runs = storage.join(cfg.output, "models")
    if not cfg.mner_model:
        cfg.mner_model = storage.join(runs, "tagger", "export")
        if not os.path.exists(cfg.mner_model):
            folder = os.path.join(cfg.data, "mner", "twitter2017")
            train = storage.join(cfg.output, "mner_train")
            if not storage.exists(train):
                rows = [r for r, _ in conll.twitter_samples(os.path.join(folder, "train.txt"),
                                                            os.path.join(folder, "blip2_captions.txt")) if r][:512]
                os.makedirs(train)
                pq.write_table(pa.Table.from_pylist(rows, schema=schema.MNER_SAMPLE), os.path.join(train, "part-0.parquet"))
            methods.fit(training.MnerTrainConfig(train=train, output=runs, run_name="tagger", view="all", epochs=1,
                                                 num_workers=1, launcher="local", select_metric=""))
    if not cfg.keyphrase_model:
        cfg.keyphrase_model = storage.join(runs, "keyphrases", "export")
        if not os.path.exists(cfg.keyphrase_model):
            train = storage.join(cfg.output, "kp_train")
            if not storage.exists(train):
                rows = [r for r, _ in kp_corpus.twitter_samples(os.path.join(cfg.data, "keyphrase", "valid_ocr_kw.txt")) if r][:1024]
                os.makedirs(train)
                pq.write_table(pa.Table.from_pylist(rows, schema=schema.KEYPHRASE_SAMPLE), os.path.join(train, "part-0.parquet"))
            kp_training.fit(kp_training.KeyphraseTrainConfig(train=train, output=runs, run_name="keyphrases", epochs=1,
                                                             num_workers=1, launcher="local", select_metric=""))


def job(name: str) -> Any:
    """jobs/<name>.py as a module (jobs/ holds scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"eama_job_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parquet_bytes(path: str) -> int:
    return sum(os.path.getsize(f) for f in storage.list_files(path, ".parquet"))


def one_pass(cfg: EnrichBenchConfig, corpus: str) -> dict[str, Any]:
    enrich = job("enrich_posts").main
    out = storage.join(cfg.output, "one_pass")
    t0 = time.time()
    m = enrich(["--input", corpus, "--output", out, "--mner-model", cfg.mner_model, "--keyphrase-model",
                cfg.keyphrase_model, f"commit_rows={cfg.commit_rows}", "--overwrite"])
    wall = time.time() - t0
    rows, first = m["this_run"]["written"] + m["this_run"]["errors"], m["first_commit_seconds"] or 0.0
    return {"wall_s": wall, "rows": rows, "rows_per_s": rows / wall, "bytes_read": parquet_bytes(corpus),
            "decoded_per_post": m["this_run"]["counts"]["images_decoded"] / max(1, rows),
            "steady_rows_per_s": (rows - cfg.commit_rows) / max(1e-9, m["wall_seconds"] - first),
            "throughput": m.get("throughput")}


def three_jobs(cfg: EnrichBenchConfig, corpus: str) -> dict[str, Any]:
    """image_views (ocr, tags) -> tag_entities; the views joined into keyphrase rows -> extract_keyphrases."""
    image_views, tag, extract = (job(n).main for n in ("image_views", "tag_entities", "extract_keyphrases"))
    out = {k: storage.join(cfg.output, k) for k in ("views", "tagged", "kp_in", "keyphrases")}
    common = [f"commit_rows={cfg.commit_rows}", "--overwrite"]
    t0 = time.time()
    image_views(["--input", corpus, "--output", out["views"], "--views", "ocr,tags", *common])
    walls = {"image_views": time.time() - t0}
    tag(["--model", cfg.mner_model, "--input", out["views"], "--output", out["tagged"], *common])
    walls["tag_entities"] = time.time() - t0 - walls["image_views"]
    viewed = pq.read_table(out["views"], columns=["sample_id", "tokens", "image", "ocr", "object_tags"])
    kp = pa.table({"sample_id": viewed["sample_id"],
                   "post": [" ".join(t) for t in viewed["tokens"].to_pylist()], "image": viewed["image"],
                   "ocr": viewed["ocr"], "visual_entities": viewed["object_tags"]})
    os.makedirs(out["kp_in"], exist_ok=True)
    pq.write_table(schema.conform(kp, schema.KEYPHRASE_SAMPLE), os.path.join(out["kp_in"], "part-0.parquet"))
    t1 = time.time()
    m = extract(["--model", cfg.keyphrase_model, "--input", out["kp_in"], "--output", out["keyphrases"], *common])
    walls["extract_keyphrases"] = time.time() - t1
    keyphrases = {r["sample_id"]: r for r in pq.read_table(out["keyphrases"]).to_pylist()}
    joined = [{**r, **keyphrases[r["sample_id"]]} for r in pq.read_table(out["tagged"]).to_pylist()
              if r["sample_id"] in keyphrases]  # the join a user writes (Arrow joins no list columns)
    wall = time.time() - t0
    rows = len(joined)
    images_in_extract = rows if kp_model.read_spec(cfg.keyphrase_model).images else 0
    return {"wall_s": wall, "rows": rows, "rows_per_s": rows / wall,
            "bytes_read": sum(parquet_bytes(p) for p in (corpus, out["views"], out["views"], out["kp_in"])),
            "decoded_per_post": (rows + images_in_extract) / max(1, rows), "extract_manifest": m["run_id"],
            "job_wall_s": walls}


def stages_alone(cfg: EnrichBenchConfig, corpus: str) -> tuple[dict[str, float], dict[str, float]]:
    """rows/s of each stage of the one pass run alone, one instance in this process, on the same
    rows; and each pool's rate as planned on 2 CPUs (one instance's rate x the pool's actors, at
    most the CPUs: one thread an actor; task stages count as one instance per CPU)."""
    models = [tagging.post_model(cfg.mner_model), extraction.post_model(cfg.keyphrase_model)]
    ecfg = enrichment.EnrichConfig(input=corpus, output="-")
    views_ = enrichment.needed_views(ecfg, models)
    plan = resources.plan_enrich(2, 0, views_, len(models))
    built = enrichment.enrich_job(ecfg, models, views_, plan, "", "bench")
    rows = pq.read_table(corpus).slice(0, cfg.alone_rows).to_pylist()
    for r in rows:
        enrichment.prepare_post(r, [m.check for m in models])
    table = pa.Table.from_pylist(rows, schema=built.work_schema)
    rates, pools = {}, {}
    for stage in built.stages:
        fn = stage.fn(**stage.kwargs) if isinstance(stage.fn, type) else (lambda b, s=stage: s.fn(b, **s.kwargs))
        t0 = time.time()
        table = fn(table)
        rates[stage.name] = table.num_rows / (time.time() - t0)
        pools[stage.name] = rates[stage.name] * min(stage.actors or 2, 2)
    return rates, pools


def run(cfg: EnrichBenchConfig) -> dict[str, Any]:
    import ray

    corpus = build_corpus(cfg)
    train_models(cfg)
    ray.init()
    one = one_pass(cfg, corpus)
    three = three_jobs(cfg, corpus)
    alone, pools = stages_alone(cfg, corpus)
    slowest = min(alone, key=alone.get)
    slowest_pool = min(pools, key=pools.get)
    print(f"\nenrich_posts benchmark: {one['rows']} posts, each with an image (2-CPU figures depend on the machine)\n")
    print("| | one pass | three jobs | one pass / three jobs |\n|---|---|---|---|")
    for key, name in (("wall_s", "wall time, s"), ("rows_per_s", "rows/s"), ("decoded_per_post", "images decoded per post"),
                      ("bytes_read", "Parquet bytes read")):
        print(f"| {name} | {one[key]:.4g} | {three[key]:.4g} | {one[key] / three[key]:.2f}x |")
    print("\nthe three jobs: " + ", ".join(f"{k} {v:.0f} s" for k, v in three["job_wall_s"].items()))
    print(f"\none pass steady state {one['steady_rows_per_s']:.2f} rows/s; slowest stage alone: {slowest} "
          f"{alone[slowest]:.2f} rows/s (ratio {one['steady_rows_per_s'] / alone[slowest]:.2f}); stages alone: "
          + ", ".join(f"{k} {v:.1f}" for k, v in alone.items()))
    print(f"slowest pool as planned: {slowest_pool} {pools[slowest_pool]:.2f} rows/s (ratio "
          f"{one['steady_rows_per_s'] / pools[slowest_pool]:.2f}); pools: " + ", ".join(f"{k} {v:.1f}" for k, v in pools.items()))
    result = {"one_pass": one, "three_jobs": three, "stages_alone": alone, "slowest_stage": slowest,
              "pools_alone": pools, "slowest_pool": slowest_pool,
              **benchmarks.provenance(dataclasses.asdict(cfg))}
    benchmarks.save_result(cfg.results, "benchmark_enrich", result)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return run(config.parse_args(EnrichBenchConfig, __doc__.splitlines()[0], FLAGS, argv))


if __name__ == "__main__":
    config.main(main, sys.argv[1:], user_errors=(FileNotFoundError,))
