"""extract_keyphrases as a batch-runner job: exactly-once keyphrase prediction with a trained model.

One stage: a pool of extractor actors (one model replica each; GPUs when there are) that decode
posts in length-sorted batches with beam search. Output rows (schema.KEYPHRASE_OUTPUT) keep
sample_id, the post and the gold keyphrases when the input has them, and add predicted_keyphrases
(ranked, best first) with their scores. An empty post or a keyphrase list holding an empty phrase
becomes an error row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pyarrow as pa

from eama.engine import enrichment, exports, resources, runner, schema
from eama.engine import views as image_views
from eama.keyphrase import model as kp_model
from eama.keyphrase import training

Row = dict[str, Any]

WORK = schema.work_schema(list(schema.KEYPHRASE_SAMPLE) + [
    pa.field("predicted_keyphrases", pa.list_(pa.string())),
    pa.field("predicted_scores", pa.list_(pa.float32()))], ("extract",))


@dataclasses.dataclass
class ExtractConfig(runner.ModelJobConfig):
    """extract_keyphrases settings; the runner's keys (input, output, commit_rows, ...) and the model
    job's (model, device, actors, threads) come first."""

    mode: str = "model"  # model (the one it was trained with) | joint | classify | generate
    top_n: int = 0  # keyphrases per post; 0 = the model's
    beam_size: int = 0  # beams; 0 = the model's
    images: bool = True  # region features for rows with an image (when the model was trained with them)
    extract_batch_size: int = 32  # posts per beam search (sorted by length within a block)
    joint_rank: str = "model"  # mode=joint: model (the export's) | sum | beams_first


def validate(cfg: ExtractConfig) -> None:
    if cfg.mode != "model" and cfg.mode not in kp_model.MODES:
        raise SystemExit(f"mode must be model or one of {', '.join(kp_model.MODES)}, got {cfg.mode!r}")
    if cfg.joint_rank != "model" and cfg.joint_rank not in kp_model.JOINT_RANKS:
        raise SystemExit(f"joint_rank must be model or one of {', '.join(kp_model.JOINT_RANKS)}, got {cfg.joint_rank!r}")
    if cfg.top_n < 0 or cfg.beam_size < 0 or cfg.extract_batch_size < 1:
        raise SystemExit("top_n and beam_size must be >= 0 (0: the model's), extract_batch_size >= 1")
    cfg.model = exports.resolve_export(cfg.model)  # RUN/export: the export it points to now, for every actor
    runner.validate_model_job(cfg, "extract_keyphrases", "train_keyphrase")


def effective_spec(spec: kp_model.KeyphraseSpec, cfg: ExtractConfig) -> kp_model.KeyphraseSpec:
    """The export's spec with this run's mode / top_n / beam_size / joint_rank where they are set."""
    return dataclasses.replace(spec, mode=spec.mode if cfg.mode == "model" else cfg.mode,
                               joint_rank=spec.joint_rank if cfg.joint_rank == "model" else cfg.joint_rank,
                               top_n=cfg.top_n or spec.top_n, beam_size=cfg.beam_size or spec.beam_size,
                               images=spec.images and cfg.images)


def check_post(row: Row) -> str | None:
    """Per-row check after read (a reason makes the row an error row)."""
    if not (row.get("post") or "").strip():
        return "empty post"
    gold = row.get("keyphrases")
    if gold is not None and any(not (k or "").strip() for k in gold):
        return "gold keyphrases hold an empty phrase"
    return None


class Extractor:
    """One model replica per actor: length-sorted batches of posts -> ranked keyphrases.
    In enrich_posts (`decoded`) the region features come from the pixels decoded upstream, and a
    post with no visual entities of its own reads its ImageNet labels (object_tags) as them."""

    def __init__(self, model: str, config: dict[str, Any], device: str, threads: int, work: pa.Schema = WORK,
                 decoded: bool = False):
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        cfg = ExtractConfig(**config)
        self.model, self.tokenizer, spec = kp_model.load(model, device)
        self.spec = effective_spec(spec, cfg)
        self.device, self.batch_size, self.work, self.decoded = device, cfg.extract_batch_size, work, decoded

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = sorted(runner.pending(rows), key=lambda r: len(r["post"]))
        runner.isolate(todo, self.batch_size, self.extract, "extract")
        return pa.Table.from_pylist(rows, schema=self.work)

    def extract(self, chunk: list[Row]) -> None:
        pictures = None
        if self.decoded:
            for r in chunk:
                r["visual_entities"] = r.get("visual_entities") or r.get("object_tags")
            pictures = [image_views.picture(r) for r in chunk]
        ranked = training.predict_rows(self.model, self.tokenizer, chunk, self.spec, self.spec.images, self.device,
                                       pictures=pictures)
        for r, found in zip(chunk, ranked):
            r["predicted_keyphrases"] = [p for p, _ in found]
            r["predicted_scores"] = [s for _, s in found]


def post_model(model: str, settings: dict[str, Any] | None = None, threads: int = 0) -> enrichment.PostModel:
    """The keyphrase model as an enrich_posts stage; `settings`: ExtractConfig's decoding keys."""
    spec = effective_spec(kp_model.read_spec(model), ExtractConfig(**(settings or {})))

    def make(work: pa.Schema, pool: resources.ModelPool) -> runner.Stage:
        return runner.Stage("extract", Extractor, {"model": model, "config": settings or {}, "device": pool.device,
                                                    "threads": threads or pool.threads, "work": work, "decoded": True},
                            actors=pool.actors, cpus=pool.cpus, gpus=pool.gpus)

    views = {"all": ("ocr", "tags"), "ocr": ("ocr",), "entities": ("tags",)}.get(spec.inputs, ())  # tags: entities
    return enrichment.PostModel("extract", "keyphrase_model", model, views, spec.images, check_post, make)


def emit(row: Row, model: str, run_id: str) -> list[Row]:
    out = {k: row.get(k) for k in schema.KEYPHRASE_OUTPUT.names}
    out.update(model=model, run_id=run_id)
    return [out]


def count_keyphrases(rows: list[Row]) -> dict[str, Any]:
    return {"keyphrases": sum(len(r.get("predicted_keyphrases") or []) for r in rows)}


def extract_job(cfg: ExtractConfig, plan: resources.ModelPool, run_id: str) -> runner.BatchJob:
    settings = {k: getattr(cfg, k) for k in ("mode", "top_n", "beam_size", "images", "extract_batch_size")}
    stage = runner.Stage("extract", Extractor, {"model": cfg.model, "config": settings, "device": plan.device,
                                                "threads": cfg.threads or plan.threads},
                         actors=plan.actors, cpus=plan.cpus, gpus=plan.gpus)
    return runner.BatchJob(
        name="extract_keyphrases", input_schema=schema.KEYPHRASE_SAMPLE, required=schema.KEYPHRASE_REQUIRED,
        work_schema=WORK, output_schema=schema.KEYPHRASE_OUTPUT, stages=[stage],
        emit=functools.partial(emit, model=cfg.model, run_id=run_id),
        prepare=check_post, stats=count_keyphrases, io_cpus=plan.io_cpus,
        describe={"model": cfg.model, "mode": cfg.mode},
    )


def run(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract keyphrases for every uncommitted input post; return the run manifest."""
    import ray

    validate(cfg)
    kp_model.read_spec(cfg.model)  # a clear error before Ray starts when it is not an export
    if not ray.is_initialized():
        ray.init()
    res = ray.cluster_resources()
    plan = resources.plan_model_pool(res.get("CPU", 1), res.get("GPU", 0), cfg.device, cfg.actors)
    run_id = runner.new_run_id()
    return runner.run(extract_job(cfg, plan, run_id), cfg, run_id=run_id)
