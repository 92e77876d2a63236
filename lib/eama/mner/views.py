"""image_views: fill the ITA image-text views of MNER rows from each row's image, on the batch runner.

Views (`views` key, any of):
- `ocr`: the text rapidocr (PP-OCR ONNX models shipped in its wheel, run by onnxruntime) reads in
  the image, lines in reading order joined by spaces; "" when it reads nothing.
- `tags` (column object_tags): the top-k ImageNet-1k classifier labels of EfficientNet-Lite0
  (engine/vision.py). These are whole-image classifier labels, not the VinVL region tags ITA
  was published with.
- `caption`: a caption from any image-text-to-text model (`model`: hub id, local folder or s3://)
  loaded by engine/hf.py (safetensors only, trust_remote_code off unless set) and run on vLLM or
  transformers (`engine`: engine/generation.py decides auto).

Stages: decode (fetch + normalise, tasks) -> ocr -> tags -> caption (actor pools sized by
resources.plan_views). Exactly once and resumable like every runner job; a row without an image or
with an image that does not decode becomes an error row naming the stage and the reason.
Views not asked for keep the values the input row has.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pyarrow as pa

from eama.engine import config, faults, images, resources, runner, schema
from eama.engine import views as image_views
from eama.engine.views import VIEWS, ocr_engine, read_text  # noqa: F401 (this job's view names and OCR)

Row = dict[str, Any]


@dataclasses.dataclass
class ImageViewsConfig(image_views.ViewSettings, runner.RunnerConfig):
    """image_views settings; the runner's keys (input, output, commit_rows, ...) come first, then the
    caption engine's (engine, max_model_len, vllm_kv_cache_gib) and the view stages'."""

    commit_rows: int = 500  # rows per committed file (rows carry their image bytes)
    views: str = "caption,ocr,tags"  # comma-separated views to fill: caption, ocr, tags (object_tags)
    model: str = ""  # captioning model: hub id, local path or s3:// URI (needed by the caption view)
    device: str = "auto"  # captioner device: auto | cuda | cpu (cuda: ask the autoscaler for GPUs)


def validate(cfg: ImageViewsConfig) -> tuple[str, ...]:
    """Check the config before Ray starts; return the views to fill."""
    views = image_views.parse_views(cfg.views)
    image_views.check_settings(cfg, views, cfg.model, "--model")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise config.ConfigError(f"device must be auto, cuda or cpu, got {cfg.device!r}")
    if not cfg.input:
        raise config.ConfigError("an input path is needed (--input)")
    cfg.model = image_views.caption_location(cfg.model)
    runner.validate(cfg)
    return views


def work_schema(views: tuple[str, ...]) -> pa.Schema:
    """The MNER sample, its normalised image (caption_corpus' image_rgb column) and the bookkeeping."""
    stages = ("decode",) + views
    return schema.work_schema(list(schema.MNER_SAMPLE) + [schema.WORK.field("image_rgb")], stages)


def prepare_row(row: Row) -> str | None:
    """Per-row check after read: a row needs an image (bytes or a URI)."""
    if row.get("image") is None and not row.get("image_uri"):
        return "no image: both image and image_uri are null"
    return None


# ---------------------------------------------------------------- stages


def decode_images(batch: pa.Table, max_side: int, max_pixels: int, work: pa.Schema) -> pa.Table:
    """Fetch each row's image and keep a bounded RGB JPEG of it in image_rgb (the original bytes
    stay in `image` for the output); an unusable image fails its row."""
    rows = batch.to_pylist()
    for r in runner.pending(rows):
        try:
            r["image_rgb"] = images.normalize_image(images.fetch(r["image"], r["image_uri"]), max_side, max_pixels)
        except Exception as exc:
            if faults.is_transient(exc):
                raise  # the runner retries the batch
            runner.fail(r, "decode", str(exc))
    return pa.Table.from_pylist(rows, schema=work)


# ---------------------------------------------------------------- the job


def views_label(cfg: ImageViewsConfig, views: tuple[str, ...]) -> str:
    """What produced the views (engine/views.label), computed once on the driver."""
    return image_views.label(views, cfg.model, cfg.revision, cfg.tags_k)


def emit_views(row: Row, label: str, run_id: str) -> list[Row]:
    """The output row of one finished sample: the input row with its views filled."""
    out = {k: row.get(k) for k in schema.MNER_VIEWS_OUTPUT.names}
    out.update(views_model=label, run_id=run_id)
    return [out]


def count_views(rows: list[Row]) -> dict[str, int]:
    """Job counters for the manifest: rows with some OCR text, with a caption."""
    done = runner.pending(rows)
    return {"ocr_nonempty": sum(bool(r.get("ocr")) for r in done),
            "captioned": sum(bool(r.get("caption")) for r in done)}


def views_job(cfg: ImageViewsConfig, views: tuple[str, ...], plan: resources.ViewsPlan, label: str,
              run_id: str, engine: str = "hf") -> runner.BatchJob:
    """decode -> ocr -> tags -> caption (the asked-for views; captions on `engine`), sized by `plan`."""
    work = work_schema(views)
    stages = [runner.Stage("decode", decode_images, {"max_side": cfg.max_image_side, "max_pixels": cfg.max_image_pixels,
                                                     "work": work}, cpus=plan.io_cpus)]
    stages += image_views.stages(views, cfg, cfg.model, plan, work, engine)
    return runner.BatchJob(
        name="image_views", input_schema=schema.MNER_SAMPLE, required=schema.MNER_REQUIRED, work_schema=work,
        output_schema=schema.MNER_VIEWS_OUTPUT, stages=stages,
        emit=functools.partial(emit_views, label=label, run_id=run_id), prepare=prepare_row,
        check_table=schema.check_sample_images, stats=count_views, io_cpus=plan.io_cpus,
        describe={"views": list(views), "views_model": label},
    )


def run(cfg: ImageViewsConfig) -> dict[str, Any]:
    """Fill the views of every uncommitted input row; return the run manifest."""
    import ray

    views = validate(cfg)
    runner.check_input(cfg.input)
    label = views_label(cfg, views)
    if not ray.is_initialized():
        ray.init()
    res = ray.cluster_resources()
    plan = resources.plan_views(res.get("CPU", 1), res.get("GPU", 0), views, cfg.device, cfg.caption_actors,
                                cfg.gpus_per_caption, cfg.ocr_actors)
    run_id = runner.new_run_id()
    engine = image_views.pick_engine(cfg, views, cfg.model, plan.device)
    return runner.run(views_job(cfg, views, plan, label, run_id, engine), cfg, run_id=run_id)

