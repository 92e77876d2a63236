"""The MNER benchmark: ITA's text / caption (GA) / caption + CVA matrix on Twitter-2015 and -2017,
and BGA-MNER's rows (bga, bga_no_scs, bga_no_cycle) with the captions as the image side (a caption
proxy: these sets ship no images here), and the controls the claims need: caption + CVA with every
post's caption swapped for another post's (caption_shuffled, ITA's ITA-Random control), BGA without
its generation losses (bga_no_gen) and ITA with its emission layer at BGA's rate
(text_emission_bgalr), BGA with a keep budget on its samplers (bga_keep_budget), and ITA's schedule
(text_ita_schedule, caption_cva_ita_schedule).

Every run trains on train, selects its epoch on valid (mean of both evaluation views), tags test in
both evaluation views (text-only input, and text+view input; BGA: text-only inference and inference
with the caption proxy) with tag_entities, and scores it with
the span scorer. A finished run leaves RESULTS/<run>.json (a folder kept in git, with the run's
provenance) and is skipped by the next invocation, so the matrix can be spread over several sessions
and machines. `table` prints mean ± std over seeds beside ITA's numbers (refusing to average runs of
different versions unless told), the runs it averaged and each component's gain over its control
under the "shown" rule; `report` writes that into the docs' marked block. `throughput` compares
tag_entities with the tagger's raw batched forward on the same rows. Runs checkpoint every epoch:
one cut short resumes from its last finished epoch.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import time
from typing import Any, Sequence

from eama.engine import benchmarks, exports, importing, schema, storage
from eama.engine.config import ConfigError, UserError
from eama.engine.training import config as trainer_config
from eama.engine.training.metrics import read_metrics
from eama.engine.training.order import steps_per_epoch
from eama.mner import bga_tagger, bga_training, conll, methods, spans, tagger, tagging, training
from eama.mner import report as scoring  # `report` below is this benchmark's docs report

# ITA (NAACL 2022), Table 1: test F1, BERT-base-cased CRF rows (text-only eval / text+view eval).
ITA_BERT = {
    ("twitter2015", "text"): (74.79, None), ("twitter2017", "text"): (85.18, None),
    ("twitter2015", "caption"): (None, 75.17), ("twitter2017", "caption"): (None, 85.75),
    ("twitter2015", "caption_cva"): (75.45, 75.52), ("twitter2017", "caption_cva"): (85.96, 85.85),
}
# ITA with XLM-R-large: ITA-All+CVA (the paper's best row).
ITA_XLMR_ALL_CVA = {"twitter2015": (78.25, 78.03), "twitter2017": (89.47, 89.75)}
TEMPERATURE = {"twitter2015": 4.0, "twitter2017": 2.0}  # ITA's CVA temperatures
# BGA-MNER (arXiv 2308.02570), Table 2: BERT-base + CLIP ViT-B/32, with images.
BGA_PAPER = {"twitter2015": 76.31, "twitter2017": 87.71}
BGA_LR = training.MnerTrainConfig.bga_lr
ITA_SCHEDULE = {"epochs": 10, "warmup_ratio": 0.05}  # ITA's 10 epochs, and a short warm-up (5% of the steps: our choice)
# each config: train_mner settings (the rest, and epochs / lr where a config does not set them, are the
# benchmark's); BGA reads captions as its image side
CONFIGS: dict[str, dict[str, Any]] = {
    "text": {"view": "text"},
    "caption": {"view": "caption"},
    "caption_cva": {"view": "caption", "cva": True},
    "caption_shuffled": {"view": "caption", "cva": True},  # on SHUFFLED data: each post reads another post's caption
    "text_emission_bgalr": {"view": "text", "emission_lr": BGA_LR},
    "caption_cva_emission_bgalr": {"view": "caption", "cva": True, "emission_lr": BGA_LR},
    "text_ita_schedule": {"view": "text", **ITA_SCHEDULE},
    "caption_cva_ita_schedule": {"view": "caption", "cva": True, **ITA_SCHEDULE},
    "bga": {"method": "bga", "vision": "none"},
    "bga_no_scs": {"method": "bga", "vision": "none", "scs": False},
    "bga_no_cycle": {"method": "bga", "vision": "none", "cycle_weight": 0.0},
    "bga_no_gen": {"method": "bga", "vision": "none", "rec_weight": 0.0, "cycle_weight": 0.0},
    "bga_keep_budget": {"method": "bga", "vision": "none", "keep_budget": 1.0},
}
SHUFFLED = ("caption_shuffled",)  # configs trained, selected and tested on the dataset with deranged captions
# (treatment, control, what the gain measures): the comparisons the table judges with the "shown" rule
COMPARISONS = (
    ("caption", "text", "the caption view (GA)"),
    ("caption_cva", "text", "caption + CVA"),
    ("caption_cva", "caption", "CVA beside the caption"),
    ("caption_cva", "caption_shuffled", "the caption's content (own caption vs another post's, same recipe)"),
    ("caption_shuffled", "text", "a second segment with CVA whose content is another post's"),
    ("text_emission_bgalr", "text", "the emission layer at bga_lr"),
    ("bga", "text", "BGA-MNER"),
    ("bga", "bga_no_gen", "BGA's generation losses (same layers and learning rates)"),
    ("bga_no_gen", "text_emission_bgalr", "BGA's layers without generation (vs ITA at bga_lr)"),
    ("bga", "bga_no_scs", "SCS"),
    ("bga", "bga_no_cycle", "the cycle loss"),
    ("bga_keep_budget", "bga", "SCS with a keep budget"),
    ("text_ita_schedule", "text", "ITA's schedule (10 epochs, warm-up), text"),
    ("caption_cva_ita_schedule", "caption_cva", "ITA's schedule (10 epochs, warm-up), caption + CVA"),
)
SCHEDULES = (("text_ita_schedule", "text"), ("caption_cva_ita_schedule", "caption_cva"))  # valid picks one of each pair
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class BenchmarkConfig:
    """benchmark_mner settings."""

    data: str = "../shared/data/mner"  # folder with twitter2015/ and twitter2017/ (UMT CoNLL files + blip2_captions.txt)
    output: str = "bench_out/mner"  # imports, runs (checkpoints, exports) and tagged outputs
    results: str = "jobs/results/benchmark_mner"  # one JSON per finished run (kept in git, so later sessions skip it)
    datasets: str = "twitter2015,twitter2017"  # comma-separated
    configs: str = "text,caption,caption_cva"  # comma-separated: text | caption (GA) | caption_cva (GA + CVA) | bga | bga_no_scs | bga_no_cycle, and the controls (docs/benchmarks.md)
    seeds: str = "0,1"  # comma-separated training seeds
    encoder: str = "minilm"  # minilm | mpnet | a Hugging Face id or folder
    epochs: int = 5  # ITA trains 10 (the *_ita_schedule configs set their own)
    lr: float = 5e-5  # encoder learning rate (ITA: 5e-6 with XLM-R-large)
    micro_batch_size: int = 16  # posts per worker per forward pass
    group_by_length: int = 0  # > 0: micro-batches of posts of similar length, in random buckets of this many (the trainer's setting; recorded in each result)
    num_workers: int = 1  # training workers
    cpus_per_worker: float = 1.0  # CPUs each training worker reserves
    torch_threads: int = 2  # per training worker
    tag_threads: int = 2  # torch threads of the tag_entities actor and of the raw-forward baseline
    launcher: str = "ray"  # ray: train on Ray Train + DeepSpeed, tag test with tag_entities | local: train (trainer launcher=local) and tag test in this process, no Ray or DeepSpeed
    use_gpu: bool = False  # train on GPUs (launcher=local: this process's GPU, fp32, which also tags the test set)
    max_runs: int = 0  # stop after this many new runs (0 = all); finished ones never count
    throughput: bool = True  # also measure tag_entities against the raw forward (needs one finished run and launcher=ray)
    throughput_rows: int = 6000  # rows for the throughput comparison (test posts repeated with new ids)
    shuffle_seed: int = 0  # seed of the caption derangement of caption_shuffled (one per dataset, for all its splits and training seeds)
    mix_versions: bool = False  # let the table average runs of different or unknown code versions or settings (marked †)
    report: bool = False  # train nothing: write the table of RESULTS into report_file's block <!-- NAME:begin --> ... <!-- NAME:end --> (NAME: the results folder's name) and print it
    report_file: str = "docs/benchmarks.md"  # the markdown page holding the report's block


def run_name(cfg: BenchmarkConfig, dataset: str, config: str, seed: int) -> str:
    return f"{os.path.basename(cfg.encoder.rstrip('/'))}-{dataset}-{config}-s{seed}"


def import_dataset(cfg: BenchmarkConfig, dataset: str) -> dict[str, str]:
    """The dataset's splits as MNER Parquet (imported once, BLIP-2 captions joined)."""
    paths = {}
    for split in SPLITS:
        out = storage.join(cfg.output, "data", dataset, split)
        if not storage.exists(storage.join(out, "part-00000.parquet")):
            items = conll.twitter_samples(os.path.join(cfg.data, dataset, f"{split}.txt"),
                                          os.path.join(cfg.data, dataset, "blip2_captions.txt"))
            importing.write_shards(items, out, 5000, schema.MNER_SAMPLE)
        paths[split] = out
    return paths


def derangement(values: Sequence[Any], seed: int) -> list[Any]:
    """`values` reordered, seeded, so that no position keeps its own item (Sattolo's shuffle: one
    cycle) nor, where a swap can avoid it, an equal one (two posts may share a caption)."""
    n = len(values)
    if n < 2:
        raise UserError(f"cannot give each of {n} post(s) another post's caption")
    rng = random.Random(seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    for i in range(n):
        if values[order[i]] != values[i]:
            continue
        start = rng.randrange(n)
        for j in ((start + k) % n for k in range(n)):
            if values[order[j]] != values[i] and values[order[i]] != values[j]:
                order[i], order[j] = order[j], order[i]
                break
    return [values[k] for k in order]


def shuffled_dataset(cfg: BenchmarkConfig, dataset: str, data: dict[str, str]) -> dict[str, str]:
    """The dataset with every post's caption replaced by another post's of the same split (a seeded
    derangement, written once: the same shuffled captions for every config and training seed)."""
    import pyarrow as pa

    paths = {}
    for split in SPLITS:
        out = storage.join(cfg.output, "data", f"{dataset}-captions_deranged-{cfg.shuffle_seed}", split)
        part = storage.join(out, "part-00000.parquet")
        if not storage.exists(part):
            table = pa.concat_tables([storage.read_table(f) for f in storage.list_files(data[split])])
            captions = derangement(table.column("caption").to_pylist(), cfg.shuffle_seed)
            at = table.schema.get_field_index("caption")
            table = table.set_column(at, table.schema.field(at), pa.array(captions, table.schema.field(at).type))
            storage.write_table_atomic(table, part, storage.ROW_GROUP_ROWS)
        paths[split] = out
    return paths


def train_settings(cfg: BenchmarkConfig, dataset: str, config: str) -> dict[str, Any]:
    """The training settings of a config: the benchmark's recipe, then what the config sets."""
    if config not in CONFIGS:
        raise config_error(config)
    return {"epochs": cfg.epochs, "lr": cfg.lr, "temperature": TEMPERATURE.get(dataset, 2.0), **CONFIGS[config]}


def config_error(name: str) -> ConfigError:
    return ConfigError(f"unknown config {name!r}: configs are {', '.join(CONFIGS)}")


def train_one(cfg: BenchmarkConfig, data: dict[str, str], dataset: str, config: str, seed: int) -> training.MnerTrainConfig:
    tcfg = training.MnerTrainConfig(
        train=data["train"], valid=data["valid"], output=storage.join(cfg.output, "runs"),
        run_name=run_name(cfg, dataset, config, seed), encoder=cfg.encoder, seed=seed,
        micro_batch_size=cfg.micro_batch_size, group_by_length=cfg.group_by_length,
        num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
        torch_threads=cfg.torch_threads, launcher=cfg.launcher, use_gpu=cfg.use_gpu,
        **train_settings(cfg, dataset, config))
    # a checkpoint per epoch: an interrupted run resumes from its last epoch at the next invocation
    tcfg.checkpoint_every = steps_per_epoch(training.mner_files(data["train"])[1], tcfg)
    tcfg.keep_checkpoints = 1
    result = methods.fit(tcfg)
    if result.error:
        raise RuntimeError(f"training {tcfg.run_name} failed: {result.error}")
    return tcfg


def eval_views(config: str) -> list[str]:
    """The test-set evaluation views of a config: text-only input, and its view (BGA: the caption proxy)."""
    settings = CONFIGS[config]
    return list(bga_tagger.VIEWS) if settings.get("method") == "bga" else tagger.evaluation_views(settings["view"])


def second_view(result: dict[str, Any]) -> str | None:
    return next((v for v in result["test"] if v != "text"), None)


def tag_and_score(cfg: BenchmarkConfig, model: str, test: str, out: str, view: str) -> dict[str, Any]:
    """Test scores of an export in one evaluation view: tag_entities on Ray, or (launcher=local) the
    same model code in this process."""
    if cfg.launcher == "local":
        return tag_and_score_here(cfg, model, test, view)
    tag_cfg = tagging.TagConfig(input=test, output=storage.join(out, view), model=model, view=view,
                                threads=cfg.tag_threads)
    manifest = tagging.run(tag_cfg)
    scores = scoring.score_output(scoring.ScoreConfig(input=tag_cfg.output))
    return {"f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
            "gold_spans": scores["gold_spans"], "per_type": scores["per_type"],
            "tag_seconds": manifest["wall_seconds"]}


def tag_in_batches(loaded: tuple[Any, Any, tagger.TaggerSpec], rows: list[dict[str, Any]], view: str,
                   device: str = "cpu", batch: int = 64) -> list[list[str]]:
    """BIO tags of `rows`, in their order, by a loaded export (methods.load), `batch` posts a forward."""
    import torch

    net, tok, spec = loaded
    predicted: list[list[str]] = []
    with torch.inference_mode():
        for k in range(0, len(rows), batch):
            predicted.extend(methods.tag_with(net, tok, spec, rows[k:k + batch], view, device))
    return predicted


def tag_and_score_here(cfg: BenchmarkConfig, model: str, test: str, view: str, batch: int = 64) -> dict[str, Any]:
    """tag_entities' work without Ray: the rows its checks pass, length-sorted batches through the
    export (methods.tag_with), scored like its output."""
    import torch

    device = "cuda" if cfg.use_gpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(cfg.tag_threads)
    started = time.time()
    rows = sorted((r for f in storage.list_files(test) for r in storage.read_table(f).to_pylist()
                   if tagging.check_post(r) is None and r.get("tags") is not None), key=lambda r: len(r["tokens"]))
    predicted = tag_in_batches(methods.load(model, device), rows, view, device, batch)
    scores = spans.score([r["tags"] for r in rows], predicted)
    return {"f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
            "gold_spans": scores["gold_spans"], "per_type": scores["per_type"],
            "tag_seconds": round(time.time() - started, 1)}


def device_name(cfg: BenchmarkConfig) -> str:
    """What trained the runs: the GPU's name, or the CPU count."""
    if cfg.use_gpu:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
    return f"cpu ({os.cpu_count()} cores)"


def run_matrix(cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """Every (dataset, config, seed) run not finished yet; returns all finished results."""
    benchmarks.code_version()  # the code as this process loaded it, before the files can change under a long matrix
    configs = benchmarks.split_list(cfg.configs)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise config_error(unknown[0])
    new = 0
    for dataset in benchmarks.split_list(cfg.datasets):
        data: dict[bool, dict[str, str]] = {}
        for seed in map(int, benchmarks.split_list(cfg.seeds)):  # every config once before any second seed
            for config in configs:
                name = run_name(cfg, dataset, config, seed)
                if benchmarks.is_done(cfg.results, name):
                    continue
                if cfg.max_runs and new >= cfg.max_runs:
                    return read_results(cfg)
                splits = prepared(cfg, dataset, config, data)
                print(f"benchmark_mner: run {name}", flush=True)
                benchmarks.save_result(cfg.results, name, one_run(cfg, splits, dataset, config, seed))
                new += 1
    return read_results(cfg)


def prepared(cfg: BenchmarkConfig, dataset: str, config: str, cache: dict[bool, dict[str, str]]) -> dict[str, str]:
    """The splits a config trains and tests on: the imported dataset, or its caption-deranged copy
    for the SHUFFLED configs (each prepared once per invocation, kept in `cache`)."""
    shuffled = config in SHUFFLED
    if False not in cache:
        cache[False] = import_dataset(cfg, dataset)
    if shuffled and True not in cache:
        cache[True] = shuffled_dataset(cfg, dataset, cache[False])
    return cache[shuffled]


def one_run(cfg: BenchmarkConfig, data: dict[str, str], dataset: str, config: str, seed: int) -> dict[str, Any]:
    """Train one (dataset, config, seed), tag test in its evaluation views; the result to save."""
    name = run_name(cfg, dataset, config, seed)
    started = time.time()
    tcfg = train_one(cfg, data, dataset, config, seed)
    train_wall = time.time() - started
    history = read_metrics(trainer_config.run_dir(tcfg))
    evals = [r for r in history if "eval/dev_f1" in r]
    best = max(evals, key=lambda r: r["eval/dev_f1"])
    model = trainer_config.export_dir(tcfg)
    test = {v: tag_and_score(cfg, model, data["test"], storage.join(cfg.output, "tagged", name), v)
            for v in eval_views(config)}
    result = {"run": name, "dataset": dataset, "config": config, "seed": seed, "encoder": cfg.encoder,
              "epochs": tcfg.epochs, "lr": tcfg.lr, "warmup_ratio": tcfg.warmup_ratio,
              "group_by_length": cfg.group_by_length, "launcher": cfg.launcher, "device": device_name(cfg),
              "selected_step": best["step"],
              "dev": {k.removeprefix("eval/"): v for k, v in best.items() if k.startswith("eval/")},
              "test": test, "train_seconds": round(sum(r["step_seconds"] for r in history), 1),
              "train_wall_seconds": round(train_wall, 1),
              "provenance": benchmarks.provenance(resolved(cfg, tcfg, config))}
    rates = keep_rates(history, best["step"], tcfg.checkpoint_every)
    return {**result, "keep_rates": rates} if rates else result


def resolved(cfg: BenchmarkConfig, tcfg: training.MnerTrainConfig, config: str) -> dict[str, Any]:
    """The settings a run's result records: its training config, and the derangement's seed where
    the data were shuffled."""
    settings = dataclasses.asdict(tcfg)
    return {**settings, "shuffle_seed": cfg.shuffle_seed} if config in SHUFFLED else settings


def keep_rates(history: list[dict[str, Any]], step: int, epoch_steps: int) -> dict[str, float]:
    """BGA's samplers' keep rates (stage and modality -> share kept) over the selected epoch's steps."""
    prefix = bga_training.KEEP_METRIC + "/"
    window = [r for r in history if step - epoch_steps < r["step"] <= step]
    keys = sorted({k for r in window for k in r if k.startswith(prefix)})
    rates = {k.removeprefix(prefix): [r[k] for r in window if r.get(k) is not None] for k in keys}
    return {k: round(statistics.fmean(v), 4) for k, v in rates.items() if v}


def read_results(cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    return benchmarks.read_results(cfg.results)


def _anchor(pair: tuple[float | None, float | None] | None) -> str:
    if not pair:
        return "-"
    return " / ".join("-" if v is None else f"{v:.2f}" for v in pair)


def collapsed(result: dict[str, Any]) -> bool:
    """A run that never learned: the epoch model selection kept scored 0 F1 on valid (it tags
    everything O). It is counted beside the row, not averaged into it."""
    return result.get("dev", {}).get("dev_f1", 1.0) == 0.0


Key = tuple[str, str, str]  # (encoder, dataset, config)


def rows_by_key(results: list[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    """Results per (encoder, dataset, config), in the table's order (CONFIGS' order within a dataset)."""
    order = list(CONFIGS)
    keys = sorted({(r["encoder"], r["dataset"], r["config"]) for r in results},
                  key=lambda k: (k[0], k[1], order.index(k[2]) if k[2] in order else len(order), k[2]))
    return {k: sorted((r for r in results if (r["encoder"], r["dataset"], r["config"]) == k), key=lambda r: r["seed"])
            for k in keys}


def per_type(rows: list[dict[str, Any]]) -> str:
    """Mean per-type F1 of the text-only evaluation ('-' where the results do not hold it)."""
    found = [r["test"]["text"]["per_type"] for r in rows if r["test"]["text"].get("per_type")]
    first = ("PER", "LOC", "ORG")  # ITA's order; OTHER / MISC last
    types = sorted({t for p in found for t in p}, key=lambda t: (first.index(t) if t in first else len(first), t))
    return ", ".join(f"{t} {100 * statistics.fmean(p[t]['f1'] for p in found if t in p):.2f}" for t in types) or "-"


def table(results: list[dict[str, Any]], mix_versions: bool = False) -> str:
    """Markdown: per encoder, dataset and config, test F1 mean ± std for both evaluation views
    (collapsed runs named beside the mean, not in it) and the version averaged; then the runs each
    row averaged, each component's gain over its control with the "shown" rule, BGA's keep rates and
    which schedule valid picks. A row mixing versions is refused unless `mix_versions`."""
    if not results:
        return "No finished runs yet."
    lines = ["| encoder | dataset | config | test F1, text-only eval | test F1, text+caption eval | train s/run | "
             "paper (ITA BERT-base T / I+T; BGA-MNER) | per type, text-only eval (mean) | version |",
             "|---|---|---|---|---|---|---|---|---|"]
    averaged = []
    for (enc, ds, conf), every in rows_by_key(results).items():
        rows = [r for r in every if not collapsed(r)]
        failed = f" + {len(every) - len(rows)} collapsed (seed {', '.join(str(r['seed']) for r in every if collapsed(r))})" \
            if len(rows) < len(every) else ""
        version = benchmarks.check_versions(f"{enc} {ds} {conf}", rows, mix_versions)
        text = [r["test"]["text"]["f1"] for r in rows]
        view = [r["test"][second_view(r)]["f1"] for r in rows if second_view(r)]
        secs = statistics.fmean(r["train_seconds"] for r in every)
        paper = BGA_PAPER[ds] if conf == "bga" and ds in BGA_PAPER else _anchor(ITA_BERT.get((ds, conf)))
        lines.append(f"| {enc} | {ds} | {conf} | {benchmarks.mean_std(text)}{failed} | {benchmarks.mean_std(view)} | "
                     f"{secs:.0f} | {paper} | {per_type(rows)} | {version} |")
        averaged.append(benchmarks.runs_line(f"{enc} {ds} {conf}", rows, text))
    parts = ["\n".join(lines), "Runs averaged (run, version, test F1 text-only eval):\n\n" + "\n".join(averaged)]
    gains = comparisons(results)
    if gains:
        parts.append(benchmarks.gains_table(gains, "test F1 (text-only eval)"))
    parts += [p for p in (keep_table(results), schedule_choice(results)) if p]
    return "\n\n".join(parts)


def comparisons(results: list[dict[str, Any]]) -> list[tuple[str, str, benchmarks.Gain]]:
    """Each COMPARISONS pair present for an encoder and dataset: the gain in text-only test F1,
    paired by seed (collapsed runs left out)."""
    f1 = {k: {r["seed"]: r["test"]["text"]["f1"] for r in rows if not collapsed(r)}
          for k, rows in rows_by_key(results).items()}
    out = []
    for enc, ds in dict.fromkeys((k[0], k[1]) for k in f1):
        for treatment, control, what in COMPARISONS:
            gain = benchmarks.seed_gain(f1.get((enc, ds, treatment), {}), f1.get((enc, ds, control), {}))
            if gain:
                out.append((f"{enc} {ds}", f"{what}: {treatment} vs {control}", gain))
    return out


def keep_table(results: list[dict[str, Any]]) -> str:
    """BGA's keep rates (share of elements its samplers keep, per modality and stage, over the
    selected epoch), mean over seeds; '' when no result holds them."""
    rows = {k: [r["keep_rates"] for r in v if r.get("keep_rates")] for k, v in rows_by_key(results).items()}
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return ""
    names = sorted({n for v in rows.values() for rates in v for n in rates})
    lines = ["| encoder | dataset | config | " + " | ".join(f"kept, {n.replace('/', ' ')}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for (enc, ds, conf), v in rows.items():
        cells = [f"{statistics.fmean(r[n] for r in v if n in r):.3f}" if any(n in r for r in v) else "-" for n in names]
        lines.append(f"| {enc} | {ds} | {conf} | " + " | ".join(cells) + " |")
    return "SCS keep rates (share kept, selected epoch, mean over seeds):\n\n" + "\n".join(lines)


def schedule_choice(results: list[dict[str, Any]]) -> str:
    """Which of each SCHEDULES pair valid picks (mean dev_f1 over seeds; test is not read)."""
    by = rows_by_key(results)
    out = []
    for enc, ds in dict.fromkeys((k[0], k[1]) for k in by):
        for longer, shorter in SCHEDULES:
            a, b = by.get((enc, ds, longer)), by.get((enc, ds, shorter))
            if a and b:
                dev_a, dev_b = (statistics.fmean(r["dev"]["dev_f1"] for r in x) for x in (a, b))
                pick = longer if dev_a > dev_b else shorter
                out.append(f"- {enc} {ds}: valid picks **{pick}** (mean valid F1 {100 * dev_a:.2f} for {longer} over "
                           f"{len(a)} seeds, {100 * dev_b:.2f} for {shorter} over {len(b)})")
    return "Schedule kept on valid (never on test):\n\n" + "\n".join(out) if out else ""


def report(cfg: BenchmarkConfig) -> str:
    """The table of every result in RESULTS, written into report_file's block named after the
    results folder (no training); returns it."""
    return benchmarks.write_report("benchmark_mner", cfg.results, BenchmarkConfig.results, cfg.report_file,
                                   cfg.mix_versions, table)


def export_of(cfg: BenchmarkConfig, result: dict[str, Any]) -> str:
    """The export folder of a finished run (absent where its result came from another machine)."""
    return storage.join(cfg.output, "runs", result["run"], "export")


def throughput(cfg: BenchmarkConfig, results: list[dict[str, Any]]) -> str | None:
    """tag_entities rows/s (whole job, and the tag stage's busy time) against the same export's raw
    batched forward (tokenise + forward + Viterbi in one process) on the same rows and threads."""
    import pyarrow as pa

    here = [r for r in results if exports.export_exists(export_of(cfg, r))]  # results may come from another machine
    if not here:
        return None
    first = sorted(here, key=lambda r: (r["config"].startswith("bga"), r["run"]))[0]
    model = export_of(cfg, first)
    rows = test_rows(cfg, first["dataset"])
    copies = [dict(r, sample_id=f"{r['sample_id']}#{k}") for k in range(-(-cfg.throughput_rows // len(rows)))
              for r in rows][:cfg.throughput_rows]
    src = storage.join(cfg.output, "throughput", "input", "part-00000.parquet")
    storage.write_table_atomic(pa.Table.from_pylist(copies, schema=schema.MNER_SAMPLE), src, 1000)
    view = second_view(first) or "text"
    manifest = tagging.run(tagging.TagConfig(input=os.path.dirname(src), output=storage.join(cfg.output, "throughput", "out"),
                                             model=model, view=view, threads=cfg.tag_threads, overwrite=True))
    raw = raw_rate(cfg, model, copies, view)
    job = manifest["this_run"]["written"] / manifest["wall_seconds"]
    stage = manifest["throughput_rows_per_s"].get("tag")
    return ("| rows | raw batched forward rows/s | tag_entities rows/s (whole job) | ratio | tag stage rows/s (busy) | ratio |\n"
            "|---|---|---|---|---|---|\n"
            f"| {len(copies)} | {raw:.1f} | {job:.1f} | {job / raw:.2f} | "
            f"{stage if stage is None else f'{stage:.1f}'} | {'-' if stage is None else f'{stage / raw:.2f}'} |")


def test_rows(cfg: BenchmarkConfig, dataset: str) -> list[dict[str, Any]]:
    return [r for f in storage.list_files(storage.join(cfg.output, "data", dataset, "test"))
            for r in storage.read_table(f, ["sample_id", "tokens", "tags", "caption"]).to_pylist()]


def raw_rate(cfg: BenchmarkConfig, model: str, rows: list[dict[str, Any]], view: str) -> float:
    """Rows/s of an export's batched inference in one process (tokenise + forward + Viterbi), 64
    length-sorted posts a batch, `tag_threads` threads."""
    import torch

    torch.set_num_threads(cfg.tag_threads)
    loaded = methods.load(model)
    ordered = sorted(rows, key=lambda r: len(r["tokens"]))
    started = time.perf_counter()
    tag_in_batches(loaded, ordered, view)
    return len(ordered) / (time.perf_counter() - started)


def bga_cost(cfg: BenchmarkConfig, results: list[dict[str, Any]]) -> str | None:
    """BGA-MNER's text-only inference against the text-only CRF (same encoder, dataset and seed) on
    the same test posts: rows/s of each and BGA's cost ratio (the goal: at most 1.5x)."""
    pairs = [(b, t) for b in results if b["config"] == "bga" for t in results
             if t["config"] == "text" and (t["encoder"], t["dataset"], t["seed"]) == (b["encoder"], b["dataset"], b["seed"])
             and exports.export_exists(export_of(cfg, b)) and exports.export_exists(export_of(cfg, t))]
    if not pairs:
        return None
    lines = ["| dataset | rows | text-only CRF rows/s | BGA text-only inference rows/s | BGA cost (x CRF) |",
             "|---|---|---|---|---|"]
    for b, t in pairs[:1]:
        rows = test_rows(cfg, b["dataset"])
        crf, gen = raw_rate(cfg, export_of(cfg, t), rows, "text"), raw_rate(cfg, export_of(cfg, b), rows, "text")
        lines.append(f"| {b['dataset']} | {len(rows)} | {crf:.1f} | {gen:.1f} | {crf / gen:.2f} |")
    return "\n".join(lines)
