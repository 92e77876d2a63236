"""The keyphrase benchmark: MM-MKP's ablation rows and two baselines on the Twitter test set.

The public train split is not retrievable here, so every row trains on valid_ocr_kw.txt less a
seeded 10% held out for model selection (the same posts for every row and seed), and is scored on
test_ocr_kw.txt (5,372 posts). Neural rows train with train_keyphrase's task, decode the test set
with extract_keyphrases and are scored with the papers' metric; the baselines (TF-IDF + linear
SVMs with C chosen on the held-out posts; the most frequent training keyphrases) see the same posts.
A finished run leaves RESULTS/<run>.json (kept in git) and is skipped next time; runs checkpoint
every epoch, so one cut short resumes. `throughput` compares extract_keyphrases with the model's raw
batched decoding on the same rows.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

from eama.engine import benchmarks, exports, importing, schema, storage
from eama.engine.training import config as trainer_config
from eama.engine.training.metrics import run_summary
from eama.engine.training.order import plan_steps, steps_per_epoch
from eama.keyphrase import baselines, corpus, extraction, report, training

# (F1@1, F1@3, MAP@5) x100 on the same test set, trained on the 42,959-post train split.
ANCHORS = {"CMKP": (47.13, 33.22, 52.26), "MM-MKP": (48.19, 33.86, 53.28)}
CONFIGS = {  # name -> (inputs, mode)
    "text": ("text", "joint"),  # the post alone
    "joint": ("all", "joint"),  # + OCR + visual entities: the full model
    "classify": ("all", "classify"),
    "generate": ("all", "generate"),
}
BASELINES = ("tfidf", "most_frequent")


@dataclasses.dataclass
class BenchmarkConfig:
    """benchmark_keyphrase settings."""

    data: str = "../shared/data/keyphrase"  # folder with valid_ocr_kw.txt (training) and test_ocr_kw.txt (test)
    output: str = "bench_out/keyphrase"  # imports, runs (checkpoints, exports) and decoded outputs
    results: str = "jobs/results/benchmark_keyphrase"  # one JSON per finished run (kept in git, so later sessions skip it)
    configs: str = "joint,text,classify,generate"  # neural rows: text | joint | classify | generate
    baselines: str = "tfidf,most_frequent"  # baseline rows
    seeds: str = "0,1"  # training seeds of the neural rows
    encoder: str = "minilm"  # minilm | mpnet | a Hugging Face id or folder
    holdout: float = 0.1  # share of the training posts held out for model selection
    epochs: int = training.KeyphraseTrainConfig.epochs
    lr: float = training.KeyphraseTrainConfig.lr  # the encoder's learning rate
    head_lr: float = training.KeyphraseTrainConfig.head_lr  # the new layers' learning rate; 0 = lr
    tag: str = "headlr-e8"  # appended to the neural runs' names (the default names the default recipe): change it with any setting above, so earlier results are not taken for these
    joint_rank: str = "sum"  # joint rows' list: sum (a phrase's decoder + classifier probability) | beams_first; a finished training run is only decoded again
    micro_batch_size: int = training.KeyphraseTrainConfig.micro_batch_size  # posts per worker per forward pass
    group_by_length: int = training.KeyphraseTrainConfig.group_by_length  # > 0: micro-batches of posts of similar length, in random buckets of this many (the trainer's setting; recorded in each result)
    num_workers: int = 1  # training workers
    cpus_per_worker: float = 1.0  # CPUs each training worker reserves
    torch_threads: int = 2  # per training worker
    extract_threads: int = 2  # torch threads of the extract_keyphrases actor and of the raw-decoding baseline
    max_runs: int = 0  # stop after this many new runs (0 = all); finished ones never count
    throughput: bool = True  # also measure extract_keyphrases against raw batched decoding (needs one finished run)
    throughput_rows: int = 1000  # test posts for the throughput comparison


def train_name(cfg: BenchmarkConfig, config: str, seed: int | None) -> str:
    """The training run's folder name (shared by the rankings of one trained model)."""
    return f"{os.path.basename(cfg.encoder.rstrip('/'))}-{config}-s{seed}" + (f"-{cfg.tag}" if cfg.tag else "")


def run_name(cfg: BenchmarkConfig, config: str, seed: int | None) -> str:
    """The result's name: the training run's, plus the ranking where it is not the default."""
    if config in BASELINES:
        return f"baseline-{config}"
    ranked = CONFIGS[config][1] == "joint" and cfg.joint_rank != "sum"
    return train_name(cfg, config, seed) + (f"-{cfg.joint_rank}" if ranked else "")


def import_data(cfg: BenchmarkConfig) -> dict[str, str]:
    """train / holdout / test as keyphrase Parquet (imported and split once)."""
    base = storage.join(cfg.output, "data")
    test = storage.join(base, "test")
    if not storage.exists(storage.join(test, "part-00000.parquet")):
        importing.write_shards(corpus.twitter_samples(os.path.join(cfg.data, "test_ocr_kw.txt")), test, 100_000,
                               schema.KEYPHRASE_SAMPLE)
    source = storage.join(base, "valid")
    if not storage.exists(storage.join(source, "part-00000.parquet")):
        importing.write_shards(corpus.twitter_samples(os.path.join(cfg.data, "valid_ocr_kw.txt")), source, 100_000,
                               schema.KEYPHRASE_SAMPLE)
    train, holdout = training.write_split(source, base, cfg.holdout, 0)
    return {"train": train, "holdout": holdout, "test": test}


def train_one(cfg: BenchmarkConfig, data: dict[str, str], config: str, seed: int) -> training.KeyphraseTrainConfig:
    """Train (or resume) one row's model; a run that already holds all its steps is not started."""
    inputs, mode = CONFIGS[config]
    tcfg = training.KeyphraseTrainConfig(
        train=data["train"], valid=data["holdout"], output=storage.join(cfg.output, "runs"),
        run_name=train_name(cfg, config, seed), encoder=cfg.encoder, inputs=inputs, mode=mode, epochs=cfg.epochs,
        lr=cfg.lr, head_lr=cfg.head_lr, seed=seed, micro_batch_size=cfg.micro_batch_size,
        group_by_length=cfg.group_by_length, num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker, torch_threads=cfg.torch_threads, joint_rank=cfg.joint_rank)
    rows = training.keyphrase_files(data["train"])[1]
    tcfg.checkpoint_every = steps_per_epoch(rows, tcfg)
    tcfg.keep_checkpoints = 1
    trained = run_summary(tcfg)["steps"]  # 0 when it has not started
    if trained >= plan_steps(rows, tcfg).total_steps and exports.export_exists(trainer_config.export_dir(tcfg)):
        print(f"benchmark_keyphrase: {tcfg.run_name} is trained ({trained} steps); decoding its export", flush=True)
        return tcfg
    result = training.fit(tcfg)
    if result.error:
        raise RuntimeError(f"training {tcfg.run_name} failed: {result.error}")
    return tcfg


def scores_of(full: dict[str, Any]) -> dict[str, Any]:
    return {scope: {k: full[scope][k] for k in ("posts", "F1@1", "F1@3", "F1@5", "MAP@5")}
            for scope in ("all", "present", "absent")}


def neural_run(cfg: BenchmarkConfig, data: dict[str, str], config: str, seed: int) -> dict[str, Any]:
    started = time.time()
    tcfg = train_one(cfg, data, config, seed)
    summary = run_summary(tcfg)
    out = storage.join(cfg.output, "extracted", run_name(cfg, config, seed))
    manifest = extraction.run(extraction.ExtractConfig(input=data["test"], output=out, model=trainer_config.export_dir(tcfg),
                                                       threads=cfg.extract_threads, joint_rank=cfg.joint_rank))
    full = report.score_output(report.ScoreConfig(input=out))
    best = next((d for d in summary["dev"] if d["step"] == summary["selected_step"]), {})
    return {"config": config, "seed": seed, "encoder": cfg.encoder, "inputs": tcfg.inputs, "mode": tcfg.mode,
            "train_run": tcfg.run_name, "joint_rank": cfg.joint_rank if tcfg.mode == "joint" else None,
            "epochs": cfg.epochs, "lr": cfg.lr, "head_lr": cfg.head_lr or cfg.lr, "tag": cfg.tag,
            "group_by_length": cfg.group_by_length,
            "selected_step": summary["selected_step"], "dev": best,
            "test": scores_of(full), "train_seconds": summary["train_seconds"],
            "train_wall_seconds": round(time.time() - started, 1), "extract_seconds": manifest["wall_seconds"]}


def baseline_run(data: dict[str, str], name: str) -> dict[str, Any]:
    train, holdout, test = (training.read_rows(data[k], with_images=False) for k in ("train", "holdout", "test"))
    started = time.time()
    extra: dict[str, Any] = {}
    if name == "tfidf":
        model, tried = baselines.select_tfidf(train, holdout, cs=(0.3, 1.0, 3.0, 10.0))
        predictions = model.predict(test)
        extra = {"c": model.c, "holdout_score_by_c": tried}
    else:
        predictions = [baselines.most_frequent(train)] * len(test)
    full = baselines.score_rows(test, predictions)
    return {"config": name, "seed": None, "encoder": None, "test": scores_of(full),
            "train_seconds": round(time.time() - started, 1), **extra}


def run_matrix(cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """Every baseline and (seed, config) run not finished yet; returns all finished results."""
    data: dict[str, str] | None = None
    new = 0
    todo: list[tuple[str, int | None]] = [(b, None) for b in benchmarks.split_list(cfg.baselines)]
    todo += [(c, int(s)) for s in benchmarks.split_list(cfg.seeds) for c in benchmarks.split_list(cfg.configs)]
    for config, seed in todo:
        if config not in CONFIGS and config not in BASELINES:
            raise SystemExit(f"unknown row {config!r}: configs are {', '.join(CONFIGS)}, baselines {', '.join(BASELINES)}")
        name = run_name(cfg, config, seed)
        if benchmarks.is_done(cfg.results, name):
            continue
        if cfg.max_runs and new >= cfg.max_runs:
            break
        data = data or import_data(cfg)
        print(f"benchmark_keyphrase: run {name}", flush=True)
        result = baseline_run(data, config) if seed is None else neural_run(cfg, data, config, seed)
        benchmarks.save_result(cfg.results, name, {"run": name, **result})
        new += 1
    return benchmarks.read_results(cfg.results)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per row, test F1@1 / F1@3 / MAP@5 mean ± std over seeds, then the papers' anchors."""
    order = list(BASELINES) + list(CONFIGS)
    lines = ["| row | encoder | F1@1 | F1@3 | MAP@5 | present F1@1 | absent F1@1 | train s/run |",
             "|---|---|---|---|---|---|---|---|"]
    def key(r: dict[str, Any]) -> tuple[str, str]:
        notes = [n for n in (r.get("tag"), r.get("joint_rank") if r.get("joint_rank") != "sum" else None) if n]
        return r["config"] + (f" ({', '.join(notes)})" if notes else ""), r.get("encoder") or "-"

    keys = sorted({key(r) for r in results},
                  key=lambda k: (order.index(k[0].split()[0]) if k[0].split()[0] in order else 99, k))
    for conf, enc in keys:
        rows = [r for r in results if key(r) == (conf, enc)]
        cell = [benchmarks.mean_std([r["test"][scope][m] for r in rows])
                for scope, m in (("all", "F1@1"), ("all", "F1@3"), ("all", "MAP@5"), ("present", "F1@1"),
                                 ("absent", "F1@1"))]
        secs = statistics.fmean(r["train_seconds"] for r in rows)
        lines.append(f"| {conf} | {enc} | " + " | ".join(cell) + f" | {secs:.0f} |")
    for name, (f1, f3, m5) in ANCHORS.items():
        lines.append(f"| {name} (paper, 42,959 training posts) | - | {f1:.2f} | {f3:.2f} | {m5:.2f} | - | - | - |")
    return "\n".join(lines)


def throughput(cfg: BenchmarkConfig, results: list[dict[str, Any]]) -> str | None:
    """extract_keyphrases rows/s (whole job, and the stage's busy time) against the same export's
    raw batched decoding (encode + beam search in one process, length-sorted) on the same rows."""
    import pyarrow as pa
    import torch

    from eama.keyphrase import model as kp_model

    neural = sorted((r for r in results if r.get("seed") is not None and r["config"] == "joint"), key=lambda r: r["run"])
    if not neural:
        return None
    export = storage.join(cfg.output, "runs", neural[0].get("train_run", neural[0]["run"]), "export")
    if not exports.export_exists(export):
        return None
    rows = training.read_rows(storage.join(cfg.output, "data", "test"), with_images=False)[:cfg.throughput_rows]
    src = storage.join(cfg.output, "throughput", "input", "part-00000.parquet")
    storage.write_table_atomic(pa.Table.from_pylist(rows, schema=schema.KEYPHRASE_SAMPLE), src, 1000)
    manifest = extraction.run(extraction.ExtractConfig(
        input=os.path.dirname(src), output=storage.join(cfg.output, "throughput", "out"), model=export,
        threads=cfg.extract_threads, overwrite=True))
    torch.set_num_threads(cfg.extract_threads)
    net, tok, spec = kp_model.load(export)
    ordered = sorted(rows, key=lambda r: len(r["post"]))
    batch = extraction.ExtractConfig().extract_batch_size
    started = time.perf_counter()
    for k in range(0, len(ordered), batch):
        training.predict_rows(net, tok, ordered[k:k + batch], spec, False, "cpu")
    raw = len(ordered) / (time.perf_counter() - started)
    job = manifest["this_run"]["written"] / manifest["wall_seconds"]
    stage = manifest["throughput_rows_per_s"].get("extract")
    return ("| rows | raw batched decoding rows/s | extract_keyphrases rows/s (whole job) | ratio | "
            "extract stage rows/s (busy) | ratio |\n|---|---|---|---|---|---|\n"
            f"| {len(rows)} | {raw:.1f} | {job:.1f} | {job / raw:.2f} | "
            f"{stage if stage is None else f'{stage:.1f}'} | {'-' if stage is None else f'{stage / raw:.2f}'} |")
