"""The keyphrase benchmark: MM-MKP's ablation rows and two baselines on the Twitter test set.

The public train split is not retrievable here, so every row trains on valid_ocr_kw.txt less a
seeded 10% held out for model selection (the same posts for every row and seed), and is scored on
test_ocr_kw.txt (5,372 posts). Neural rows train with train_keyphrase's task, decode the test set
with extract_keyphrases and are scored with the papers' metric; the baselines (TF-IDF + linear
SVMs with C chosen on the held-out posts; the most frequent training keyphrases) see the same posts.
A finished run leaves RESULTS/<run>.json (kept in git, with its provenance) and is skipped next
time; runs checkpoint every epoch, so one cut short resumes. `table` refuses to average runs of
different versions unless told, names the runs it averaged and judges each component's gain over its
control with the "shown" rule; `report` writes it into the docs' marked block. `throughput` compares
extract_keyphrases with the model's raw batched decoding on the same rows.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

from eama.engine import benchmarks, exports, importing, schema, storage
from eama.engine.config import ConfigError
from eama.engine.training import config as trainer_config
from eama.engine.training.metrics import run_summary
from eama.engine.training.order import plan_steps, steps_per_epoch
from eama.keyphrase import baselines, corpus, extraction, training
from eama.keyphrase import report as scoring  # `report` below is this benchmark's docs report

# (F1@1, F1@3, MAP@5) x100 on the same test set, trained on the 42,959-post train split.
ANCHORS = {"CMKP": (47.13, 33.22, 52.26), "MM-MKP": (48.19, 33.86, 53.28)}
CONFIGS: dict[str, dict[str, str]] = {  # name -> training settings besides the defaults (inputs=all, mode=joint, gate=match)
    "text": {"inputs": "text"},  # the post alone
    "joint": {},  # + OCR + visual entities: the full model
    "classify": {"mode": "classify"},
    "generate": {"mode": "generate"},
    "joint_gate_fixed": {"gate": "fixed"},  # the coarse gate off (g = 1)
    "ocr": {"inputs": "ocr"},  # the post + OCR, no visual entities
    "entities": {"inputs": "entities"},  # the post + visual entities, no OCR
}
# (treatment, control, what the gain measures): the comparisons the table judges with the "shown" rule
COMPARISONS = (
    ("joint", "text", "OCR + visual entities"),
    ("ocr", "text", "OCR"),
    ("entities", "text", "visual entities"),
    ("joint", "ocr", "visual entities beside OCR"),
    ("joint", "entities", "OCR beside visual entities"),
    ("joint", "joint_gate_fixed", "the coarse gate"),
    ("joint", "classify", "generation beside the classifier"),
    ("joint", "generate", "the classifier beside generation"),
)
BASELINES = ("tfidf", "most_frequent")


@dataclasses.dataclass
class BenchmarkConfig:
    """benchmark_keyphrase settings."""

    data: str = "../shared/data/keyphrase"  # folder with valid_ocr_kw.txt (training) and test_ocr_kw.txt (test)
    output: str = "bench_out/keyphrase"  # imports, runs (checkpoints, exports) and decoded outputs
    results: str = "jobs/results/benchmark_keyphrase"  # one JSON per finished run (kept in git, so later sessions skip it)
    configs: str = "joint,text,classify,generate,joint_gate_fixed,ocr,entities"  # neural rows: text | joint | classify | generate | joint_gate_fixed | ocr | entities
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
    mix_versions: bool = False  # let the table average runs of different or unknown code versions or settings (marked †)
    report: bool = False  # train nothing: write the table of RESULTS into report_file's block <!-- NAME:begin --> ... <!-- NAME:end --> (NAME: the results folder's name) and print it
    report_file: str = "docs/benchmarks.md"  # the markdown page holding the report's block


def train_name(cfg: BenchmarkConfig, config: str, seed: int | None) -> str:
    """The training run's folder name (shared by the rankings of one trained model)."""
    return f"{os.path.basename(cfg.encoder.rstrip('/'))}-{config}-s{seed}" + (f"-{cfg.tag}" if cfg.tag else "")


def run_name(cfg: BenchmarkConfig, config: str, seed: int | None) -> str:
    """The result's name: the training run's, plus the ranking where it is not the default."""
    if config in BASELINES:
        return f"baseline-{config}"
    ranked = settings(config)["mode"] == "joint" and cfg.joint_rank != "sum"
    return train_name(cfg, config, seed) + (f"-{cfg.joint_rank}" if ranked else "")


def settings(config: str) -> dict[str, str]:
    """A neural row's inputs, mode and gate."""
    return {"inputs": "all", "mode": "joint", "gate": "match", **CONFIGS[config]}


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
    tcfg = training.KeyphraseTrainConfig(
        train=data["train"], valid=data["holdout"], output=storage.join(cfg.output, "runs"),
        run_name=train_name(cfg, config, seed), encoder=cfg.encoder, **settings(config), epochs=cfg.epochs,
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
    full = scoring.score_output(scoring.ScoreConfig(input=out))
    best = next((d for d in summary["dev"] if d["step"] == summary["selected_step"]), {})
    return {"config": config, "seed": seed, "encoder": cfg.encoder, "inputs": tcfg.inputs, "mode": tcfg.mode,
            "gate": tcfg.gate, "train_run": tcfg.run_name, "joint_rank": cfg.joint_rank if tcfg.mode == "joint" else None,
            "epochs": cfg.epochs, "lr": cfg.lr, "head_lr": cfg.head_lr or cfg.lr, "tag": cfg.tag,
            "group_by_length": cfg.group_by_length,
            "selected_step": summary["selected_step"], "dev": best,
            "test": scores_of(full), "train_seconds": summary["train_seconds"],
            "train_wall_seconds": round(time.time() - started, 1), "extract_seconds": manifest["wall_seconds"],
            "provenance": benchmarks.provenance(dataclasses.asdict(tcfg))}


def baseline_run(cfg: BenchmarkConfig, data: dict[str, str], name: str) -> dict[str, Any]:
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
            "train_seconds": round(time.time() - started, 1), **extra,
            "provenance": benchmarks.provenance({"baseline": name, "data": cfg.data, "holdout": cfg.holdout})}


def run_matrix(cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """Every baseline and (seed, config) run not finished yet; returns all finished results."""
    benchmarks.code_version()  # the code as this process loaded it, before the files can change under a long matrix
    data: dict[str, str] | None = None
    new = 0
    todo: list[tuple[str, int | None]] = [(b, None) for b in benchmarks.split_list(cfg.baselines)]
    todo += [(c, int(s)) for s in benchmarks.split_list(cfg.seeds) for c in benchmarks.split_list(cfg.configs)]
    for config, seed in todo:
        if config not in CONFIGS and config not in BASELINES:
            raise ConfigError(f"unknown row {config!r}: configs are {', '.join(CONFIGS)}, baselines {', '.join(BASELINES)}")
        name = run_name(cfg, config, seed)
        if benchmarks.is_done(cfg.results, name):
            continue
        if cfg.max_runs and new >= cfg.max_runs:
            break
        data = data or import_data(cfg)
        print(f"benchmark_keyphrase: run {name}", flush=True)
        result = baseline_run(cfg, data, config) if seed is None else neural_run(cfg, data, config, seed)
        benchmarks.save_result(cfg.results, name, {"run": name, **result})
        new += 1
    return benchmarks.read_results(cfg.results)


Key = tuple[str, str, str]  # (config, notes: the tag and a ranking other than sum, encoder)
COLUMNS = (("all", "F1@1"), ("all", "F1@3"), ("all", "MAP@5"), ("present", "F1@1"), ("absent", "F1@1"))


def key_of(result: dict[str, Any]) -> Key:
    notes = [n for n in (result.get("tag"), result.get("joint_rank") if result.get("joint_rank") != "sum" else None) if n]
    return result["config"], ", ".join(notes), result.get("encoder") or "-"


def rows_by_key(results: list[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    """Results per row, baselines first, then CONFIGS' order."""
    order = list(BASELINES) + list(CONFIGS)
    keys = sorted({key_of(r) for r in results},
                  key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k))
    return {k: sorted((r for r in results if key_of(r) == k), key=lambda r: r.get("seed") or 0) for k in keys}


def table(results: list[dict[str, Any]], mix_versions: bool = False) -> str:
    """Markdown: per row, test F1@1 / F1@3 / MAP@5 mean ± std over seeds and the version averaged,
    then the papers' anchors, the runs each row averaged, and each component's gain in F1@1 over its
    control with the "shown" rule. A row mixing versions is refused unless `mix_versions`."""
    if not results:
        return "No finished runs yet."
    lines = ["| row | encoder | F1@1 | F1@3 | MAP@5 | present F1@1 | absent F1@1 | train s/run | version |",
             "|---|---|---|---|---|---|---|---|---|"]
    averaged = []
    for (conf, notes, enc), rows in rows_by_key(results).items():
        label = conf + (f" ({notes})" if notes else "")
        version = benchmarks.check_versions(f"{label} {enc}", rows, mix_versions)
        cell = [benchmarks.mean_std([r["test"][scope][m] for r in rows]) for scope, m in COLUMNS]
        secs = statistics.fmean(r["train_seconds"] for r in rows)
        lines.append(f"| {label} | {enc} | " + " | ".join(cell) + f" | {secs:.0f} | {version} |")
        averaged.append(benchmarks.runs_line(f"{label} {enc}", rows, [r["test"]["all"]["F1@1"] for r in rows]))
    for name, (f1, f3, m5) in ANCHORS.items():
        lines.append(f"| {name} (paper, 42,959 training posts) | - | {f1:.2f} | {f3:.2f} | {m5:.2f} | - | - | - | - |")
    parts = ["\n".join(lines), "Runs averaged (run, version, test F1@1):\n\n" + "\n".join(averaged)]
    gains = comparisons(results)
    if gains:
        parts.append(benchmarks.gains_table(gains, "test F1@1"))
    return "\n\n".join(parts)


def comparisons(results: list[dict[str, Any]]) -> list[tuple[str, str, benchmarks.Gain]]:
    """Each COMPARISONS pair present with the same notes and encoder: the gain in test F1@1, paired by seed."""
    f1 = {k: {r["seed"]: r["test"]["all"]["F1@1"] for r in rows} for k, rows in rows_by_key(results).items()}
    out = []
    for notes, enc in dict.fromkeys((k[1], k[2]) for k in f1):
        for treatment, control, what in COMPARISONS:
            gain = benchmarks.seed_gain(f1.get((treatment, notes, enc), {}), f1.get((control, notes, enc), {}))
            if gain:
                out.append((f"{enc}" + (f" ({notes})" if notes else ""), f"{what}: {treatment} vs {control}", gain))
    return out


def report(cfg: BenchmarkConfig) -> str:
    """The table of every result in RESULTS, written into report_file's block named after the
    results folder (no training); returns it."""
    return benchmarks.write_report("benchmark_keyphrase", cfg.results, BenchmarkConfig.results, cfg.report_file,
                                   cfg.mix_versions, table)


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
