"""tag_entities as a batch-runner job: exactly-once tagging of MNER rows with a trained tagger.

One stage: a pool of tagger actors (one model replica each; GPUs when there are) that tag posts in
length-sorted batches. Output rows (schema.MNER_OUTPUT) keep sample_id, tokens and the gold tags
when the input has them, and add predicted_tags (one BIO tag per token) and entities (text, label,
token start / end). A post with no tokens, a token holding a tab or a line break, or gold tags that
do not match the tokens becomes an error row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pyarrow as pa

from eama.engine import enrichment, exports, resources, runner, schema
from eama.mner import methods, spans, tagger

Row = dict[str, Any]

WORK = schema.work_schema(list(schema.MNER_SAMPLE) + [pa.field("predicted_tags", pa.list_(pa.string())),
                                                      pa.field("entities", pa.list_(schema.ENTITY))], ("tag",))


@dataclasses.dataclass
class TagConfig(runner.ModelJobConfig):
    """tag_entities settings; the runner's keys (input, output, commit_rows, ...) and the model job's
    (model, device, actors, threads) come first."""

    view: str = "model"  # input view: model (the one it was trained with) | text | caption | ocr | tags | all (ITA); text | visual (BGA)
    tag_batch_size: int = 64  # posts per forward pass (sorted by length within a block)


def validate(cfg: TagConfig) -> None:
    if cfg.view != "model" and cfg.view not in methods.VIEWS:
        raise SystemExit(f"view must be model or one of {', '.join(methods.VIEWS)}, got {cfg.view!r}")
    cfg.model = exports.resolve_export(cfg.model)  # RUN/export: the export it points to now, for every actor
    runner.validate_model_job(cfg, "tag_entities", "train_mner")


def check_post(row: Row) -> str | None:
    """Per-row check after read (a reason makes the row an error row)."""
    tokens = row.get("tokens") or []
    if not tokens:
        return "empty post: no tokens"
    for i, tok in enumerate(tokens):
        if tok is None or tok == "":
            return f"token {i} is empty"
        if any(ch in tok for ch in "\t\n\r"):
            return f"token {i} ({tok[:40]!r}) holds a tab or line break"
    tags = row.get("tags")
    if tags is not None:
        if len(tags) != len(tokens):
            return f"{len(tags)} gold tags for {len(tokens)} tokens"
        if (why := spans.check_tags(tags)):
            return f"gold tags: {why}"
    return None


class Tagger:
    """One tagger replica per actor: length-sorted batches of posts -> BIO tags and entities.
    With `text_without_image` (enrich_posts) a post without an image is tagged on its text alone."""

    def __init__(self, model: str, view: str, device: str, batch_size: int, threads: int,
                 work: pa.Schema = WORK, text_without_image: bool = False):
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model, self.tokenizer, self.spec = methods.load(model, device)
        self.view = self.spec.view if view == "model" else view
        self.device, self.batch_size, self.work, self.text_without_image = device, batch_size, work, text_without_image

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = sorted(runner.pending(rows), key=lambda r: len(r["tokens"]))
        runner.isolate(todo, self.batch_size, self.tag, "tag")
        return pa.Table.from_pylist(rows, schema=self.work)

    def view_of(self, row: Row) -> str:
        return "text" if self.text_without_image and not enrichment.has_image(row) else self.view

    def tag(self, chunk: list[Row]) -> None:
        import torch

        for view in dict.fromkeys(self.view_of(r) for r in chunk):
            part = [r for r in chunk if self.view_of(r) == view]
            with torch.inference_mode():
                predicted = methods.tag_with(self.model, self.tokenizer, self.spec, part, view, self.device)
            for r, tags in zip(part, predicted):
                r["predicted_tags"] = tags
                r["entities"] = spans.entities(r["tokens"], spans.bio_spans(tags))


def emit(row: Row, model: str, view: str, run_id: str) -> list[Row]:
    out = {k: row.get(k) for k in schema.MNER_OUTPUT.names}
    out.update(model=model, view=view, run_id=run_id)
    return [out]


def count_entities(rows: list[Row]) -> dict[str, Any]:
    return {"entities": sum(len(r.get("entities") or []) for r in rows)}


def tag_job(cfg: TagConfig, plan: resources.ModelPool, view: str, run_id: str) -> runner.BatchJob:
    stage = runner.Stage("tag", Tagger, {"model": cfg.model, "view": cfg.view, "device": plan.device,
                                         "batch_size": cfg.tag_batch_size, "threads": cfg.threads or plan.threads},
                         actors=plan.actors, cpus=plan.cpus, gpus=plan.gpus)
    return runner.BatchJob(
        name="tag_entities", input_schema=schema.MNER_SAMPLE, required=schema.MNER_REQUIRED, work_schema=WORK,
        output_schema=schema.MNER_OUTPUT, stages=[stage],
        emit=functools.partial(emit, model=cfg.model, view=view, run_id=run_id),
        prepare=check_post, stats=count_entities, io_cpus=plan.io_cpus,
        describe={"model": cfg.model, "view": view},
    )


def views_read(spec: tagger.TaggerSpec, view: str) -> tuple[str, ...]:
    """The image views a tagger reads in `view`: ITA's view columns; BGA's caption proxy (visual)."""
    if spec.method == "bga":
        return ("caption",) if view == "visual" and (spec.bga or {}).get("caption_proxy") else ()
    return {"text": (), "caption": ("caption",), "ocr": ("ocr",), "tags": ("tags",),
            "all": ("caption", "ocr", "tags")}[view]


def post_model(model: str, view: str = "model", batch_size: int = 64, threads: int = 0) -> enrichment.PostModel:
    """The tagger as an enrich_posts stage: tags each post in `view` (model: the one it was trained
    with), text-only where the post has no image."""
    spec = tagger.read_spec(model)
    view = spec.view if view == "model" else view
    if view not in methods.views_of(spec):
        raise SystemExit(f"{model}: a {spec.method} tagger tags in view {' | '.join(methods.views_of(spec))}, "
                         f"not {view!r}")

    def make(work: pa.Schema, pool: resources.ModelPool) -> runner.Stage:
        return runner.Stage("tag", Tagger, {"model": model, "view": view, "device": pool.device,
                                            "batch_size": batch_size, "threads": threads or pool.threads,
                                            "work": work, "text_without_image": True},
                            actors=pool.actors, cpus=pool.cpus, gpus=pool.gpus)

    reads_images = spec.method == "bga" and view == "visual" and (spec.bga or {}).get("vision", "none") != "none"
    return enrichment.PostModel("tag", "mner_model", model, views_read(spec, view), reads_images, check_post, make)


def run(cfg: TagConfig) -> dict[str, Any]:
    """Tag every uncommitted input post; return the run manifest."""
    import ray

    validate(cfg)
    spec = tagger.read_spec(cfg.model)
    view = spec.view if cfg.view == "model" else cfg.view
    if view not in methods.views_of(spec):
        raise SystemExit(f"{cfg.model}: a {spec.method} tagger tags in view {' | '.join(methods.views_of(spec))}, "
                         f"not {view!r}")
    if not ray.is_initialized():
        ray.init()
    res = ray.cluster_resources()
    plan = resources.plan_model_pool(res.get("CPU", 1), res.get("GPU", 0), cfg.device, cfg.actors)
    run_id = runner.new_run_id()
    return runner.run(tag_job(cfg, plan, view, run_id), cfg, run_id=run_id)
