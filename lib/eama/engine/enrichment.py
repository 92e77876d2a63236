"""enrich_posts: one batch-runner pass that gives every post its image views, its entities and its
keyphrases, each image fetched and decoded once, one output row per post.

The systems describe their trained models as `PostModel`s (mner.tagging.post_model,
keyphrase.extraction.post_model): the stage that runs the model, the image views it reads, the
row checks it needs. This module joins them into one job:

    read -> decode (each image fetched and decoded once into raw RGB pixels; tasks)
         -> ocr -> tags -> caption   (only the views some model reads; engine/views.py)
         -> tag -> extract           (the models, in the order given)
         -> one schema.ENRICHED_POST row per post

Posts come in any post contract (schema.ENRICH_INPUT): `tokens` (MNER rows), `post` (keyphrase
rows, already tokenized: split on spaces) or `text` (raw text, tokenized by `tokenize`). A post
without an image gets its entities and keyphrases from its text; a row that any stage fails (an
empty post, a token holding a tab, an undecodable image) is an error row naming the stage, never
a half-enriched row. Exactly once, resumable and leased like every runner job.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable, Sequence

import pyarrow as pa

from eama.engine import config, exports, faults, images, resources, runner, schema
from eama.engine import views as image_views

log = logging.getLogger("eama.enrich")
Row = dict[str, Any]

DEVICES = ("auto", "cuda", "cpu")
# Raw text -> words as the Twitter sets are tokenized: URLs whole, words (with inner apostrophes)
# and every other symbol on its own ('@user' -> '@', 'user'; '#tag' -> '#', 'tag').
_TOKEN = re.compile(r"https?://\S+|\w+(?:['’]\w+)*|[^\w\s]")


@dataclasses.dataclass
class EnrichConfig(image_views.ViewSettings, runner.RunnerConfig):
    """enrich_posts settings; the runner's keys (input, output, commit_rows, ...) come first, then the
    caption engine's and the view stages', then the models'."""

    commit_rows: int = 500  # rows per committed file
    mner_model: str = ""  # a train_mner export (RUN/export), local or s3://; empty: no entities
    keyphrase_model: str = ""  # a train_keyphrase export (RUN/export), local or s3://; empty: no keyphrases
    views: str = ""  # views to compute, of those the models read (caption, ocr, tags); empty: all they read
    caption_model: str = ""  # captioning model for the caption view; empty: the input's caption column is used
    device: str = "auto"  # captioner device: auto | cuda | cpu (cuda: ask the autoscaler for GPUs)
    model_device: str = "cpu"  # tagger / keyphrase replicas: cpu | cuda | auto (GPUs the captioner leaves)
    model_actors: int = 0  # replicas of each model stage; 0 = one per GPU on cuda, else sized from the CPUs
    model_threads: int = 0  # torch threads per model replica on CPU; 0 = the CPUs it reserves


@dataclasses.dataclass
class PostModel:
    """One trained model's stage, as its system describes it to enrich_posts."""

    stage: str  # the stage's name in error rows and the manifest ("tag", "extract")
    label_column: str  # the output column naming the model (schema.ENRICHED_POST)
    label: str  # the model id written there
    views: tuple[str, ...]  # the image views it reads (engine/views.VIEWS)
    reads_pixels: bool  # whether it reads the decoded image itself
    check: Callable[[Row], str | None]  # per-row check after the post contract is resolved
    make: Callable[[pa.Schema, resources.ModelPool], runner.Stage]  # its stage, in the job's work schema


def tokenize(text: str) -> list[str]:
    """Raw post text -> words the way the Twitter sets are tokenized (URLs whole, symbols apart)."""
    return _TOKEN.findall(text)


def resolve_post(row: Row) -> str | None:
    """Give the row both `tokens` and `post` from whichever contract it came in; a reason when it
    holds no text at all."""
    tokens = row.get("tokens")
    if tokens:
        row["post"] = row.get("post") or " ".join(t or "" for t in tokens)
    elif (row.get("post") or "").strip():
        row["tokens"] = row["post"].split()
    elif (row.get("text") or "").strip():
        row["tokens"] = tokenize(row["text"])
        row["post"] = " ".join(row["tokens"])
    else:
        return "empty post: no tokens, post or text"
    return None


def has_image(row: Row) -> bool:
    return row.get("image") is not None or bool(row.get("image_uri"))


def prepare_post(row: Row, checks: Sequence[Callable[[Row], str | None]]) -> str | None:
    """Per-row check after read: the post contract, then every model's own check."""
    why = resolve_post(row)
    for check in checks:
        why = why or check(row)
    return why


def check_table(table: pa.Table, source: str) -> None:
    """An input file must hold the post's text in one of the post contracts."""
    if not any(c in table.column_names for c in schema.POST_TEXT_COLUMNS):
        raise schema.SchemaError(f"{source}: needs one of the columns {', '.join(schema.POST_TEXT_COLUMNS)} "
                                 f"(has: {', '.join(table.column_names)})")


def decode_posts(batch: pa.Table, max_side: int, max_pixels: int, work: pa.Schema) -> pa.Table:
    """Fetch and decode each pending row's image once into raw RGB pixels (every later stage reads
    them); a row without an image passes, one whose image cannot be used fails here."""
    rows = batch.to_pylist()
    for r in runner.pending(rows):
        if not has_image(r):
            continue
        try:
            r["pixels"], r["pixel_size"] = image_views.decode_pixels(
                images.fetch(r["image"], r["image_uri"]), max_side, max_pixels)
        except Exception as exc:
            if faults.is_transient(exc):
                raise  # the runner retries the batch
            runner.fail(r, "decode", str(exc))
    return pa.Table.from_pylist(rows, schema=work)


# ---------------------------------------------------------------- the job


def needed_views(cfg: EnrichConfig, models: Sequence[PostModel]) -> tuple[str, ...]:
    """The views to compute: those the models read, narrowed by `views`, without the caption when
    no captioning model is given (the input's caption column serves then)."""
    read = {v for m in models for v in m.views}
    asked = set(image_views.parse_views(cfg.views, allow_empty=True)) if cfg.views.strip() else set(image_views.VIEWS)
    unused = asked - read
    if unused and cfg.views.strip():
        log.info("views %s: no model reads them, not computed", ",".join(sorted(unused)))
    if "caption" in read & asked and not cfg.caption_model:
        log.info("caption view: no --caption-model, so the input's caption column is used")
        asked.discard("caption")
    return tuple(v for v in image_views.VIEWS if v in read & asked)


def validate(cfg: EnrichConfig) -> None:
    """Check the config before Ray starts (ConfigError naming the key)."""
    if not (cfg.mner_model or cfg.keyphrase_model):
        raise config.ConfigError("enrich_posts needs --mner-model or --keyphrase-model (or both)")
    for key in ("device", "model_device"):
        if getattr(cfg, key) not in DEVICES:
            raise config.ConfigError(f"{key} must be one of {', '.join(DEVICES)}, got {getattr(cfg, key)!r}")
    image_views.check_settings(cfg, image_views.parse_views(cfg.views, allow_empty=True), cfg.caption_model,
                               "--caption-model")  # --views caption asks for a captioner
    runner.check_input(cfg.input, config.ConfigError)
    for key in ("mner_model", "keyphrase_model"):
        path = exports.resolve_export(getattr(cfg, key))
        setattr(cfg, key, runner.model_folder(path, key, config.ConfigError) if path else path)
    cfg.caption_model = image_views.caption_location(cfg.caption_model)
    runner.validate(cfg)


def work_schema(stages: tuple[str, ...]) -> pa.Schema:
    """The input contract, the decoded pixels, what the models add, and the runner's bookkeeping."""
    names = set(schema.ENRICH_INPUT.names)
    added = [f for f in schema.ENRICHED_POST if f.name not in names and f.name not in ("run_id", "source_file")]
    return schema.work_schema(list(schema.ENRICH_INPUT) + image_views.PIXELS + added, stages)


def emit_post(row: Row, labels: dict[str, str], run_id: str) -> list[Row]:
    """The output row of one enriched post."""
    out = {k: row.get(k) for k in schema.ENRICHED_POST.names}
    out.update(labels, has_image=has_image(row), run_id=run_id)
    return [out]


def count_posts(rows: list[Row]) -> dict[str, int]:
    """Job counters: posts done, images decoded (once each), posts with entities, with keyphrases."""
    done = runner.pending(rows)
    return {"posts": len(done), "images_decoded": sum(r.get("pixels") is not None for r in done),
            "with_entities": sum(bool(r.get("entities")) for r in done),
            "with_keyphrases": sum(bool(r.get("predicted_keyphrases")) for r in done)}


def enrich_job(cfg: EnrichConfig, models: Sequence[PostModel], views: tuple[str, ...], plan: resources.EnrichPlan,
               label: str, run_id: str, engine: str = "hf") -> runner.BatchJob:
    """decode -> the views the models read -> the models, sized by `plan`."""
    decode = bool(views) or any(m.reads_pixels for m in models)
    work = work_schema((("decode",) if decode else ()) + views + tuple(m.stage for m in models))
    stages = [runner.Stage("decode", decode_posts, {"max_side": cfg.max_image_side, "max_pixels": cfg.max_image_pixels,
                                                    "work": work}, cpus=plan.views.io_cpus)] if decode else []
    stages += image_views.stages(views, cfg, cfg.caption_model, plan.views, work, engine)
    stages += [m.make(work, plan.models) for m in models]
    labels = {"views_model": label, **{m.label_column: m.label for m in models}}
    return runner.BatchJob(
        name="enrich_posts", input_schema=schema.ENRICH_INPUT, required=schema.ENRICH_REQUIRED, work_schema=work,
        output_schema=schema.ENRICHED_POST, stages=stages,
        emit=functools.partial(emit_post, labels=labels, run_id=run_id),
        prepare=functools.partial(prepare_post, checks=[m.check for m in models]), check_table=check_table,
        stats=count_posts, io_cpus=plan.views.io_cpus, describe={"views": list(views), **labels},
    )


def run(cfg: EnrichConfig, models: Sequence[PostModel]) -> dict[str, Any]:
    """Enrich every uncommitted input post; return the run manifest."""
    import ray

    views = needed_views(cfg, models)
    label = image_views.label(views, cfg.caption_model, cfg.revision, cfg.tags_k)
    if not ray.is_initialized():
        ray.init()
    res = ray.cluster_resources()
    plan = resources.plan_enrich(res.get("CPU", 1), res.get("GPU", 0), views, len(models), cfg.device,
                                 cfg.caption_actors, cfg.gpus_per_caption, cfg.ocr_actors, cfg.model_device,
                                 cfg.model_actors)
    for name, value in plan.rows():
        log.info("plan: %s: %s", name, value)
    engine = image_views.pick_engine(cfg, views, cfg.caption_model, plan.views.device)
    run_id = runner.new_run_id()
    return runner.run(enrich_job(cfg, models, views, plan, label, run_id, engine), cfg, run_id=run_id)
