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
import os
from typing import Any

import pyarrow as pa

from eama.engine import config, exports, faults, generation, hf, images, resources, runner, schema, storage

Row = dict[str, Any]

VIEWS = ("caption", "ocr", "tags")  # --views names (and stage names); "tags" fills object_tags
DEFAULT_MAX_SIDE = 1280  # keep enough pixels for OCR; the tagger and captioner resize anyway


@dataclasses.dataclass
class ImageViewsConfig(generation.EngineConfig, runner.RunnerConfig):
    """image_views settings; the runner's keys (input, output, commit_rows, ...) come first, then the
    caption engine's (engine, max_model_len, vllm_kv_cache_gib)."""

    commit_rows: int = 500  # rows per committed file (rows carry their image bytes)
    views: str = "caption,ocr,tags"  # comma-separated views to fill: caption, ocr, tags (object_tags)
    model: str = ""  # captioning model: hub id, local path or s3:// URI (needed by the caption view)
    revision: str | None = None  # model revision (hub) recorded in views_model; none = the files' hash
    trust_remote_code: bool = False  # run a model's own Python code (off: only transformers' classes)
    device: str = "auto"  # captioner device: auto | cuda | cpu (cuda: ask the autoscaler for GPUs)
    caption_actors: int = 0  # captioner replicas; 0 = one per GPU (or 1 per 8 CPUs without GPUs)
    gpus_per_caption: float = 1.0  # GPUs each captioner replica reserves
    caption_prompt: str = "Describe the image in one sentence."  # instruction given with every image
    max_new_tokens: int = 40  # caption length limit in tokens
    generate_batch_size: int = 8  # images per generate call inside a captioner actor
    ocr_actors: int = 0  # OCR replicas; 0 = fill the CPUs the other stages leave
    ocr_min_score: float = 0.5  # OCR lines recognised with a lower confidence are dropped
    tags_k: int = 5  # ImageNet labels kept per image, most probable first
    max_image_side: int = DEFAULT_MAX_SIDE  # longer image side after normalising, pixels
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS  # larger images are refused before decoding


def parse_views(text: str) -> tuple[str, ...]:
    """'caption,ocr' -> ('caption', 'ocr') in canonical order; unknown or no names: a config error."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VIEWS]
    if bad or not names:
        raise config.ConfigError(f"views must be a comma-separated subset of {', '.join(VIEWS)}, got {text!r}")
    return tuple(v for v in VIEWS if v in names)


def validate(cfg: ImageViewsConfig) -> tuple[str, ...]:
    """Check the config before Ray starts; return the views to fill."""
    views = parse_views(cfg.views)
    if "caption" in views and not cfg.model:
        raise config.ConfigError("the caption view needs a captioning model: pass --model (hub id, local path "
                                 "or s3:// URI), or leave caption out of --views")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise config.ConfigError(f"device must be auto, cuda or cpu, got {cfg.device!r}")
    if cfg.engine not in generation.ENGINES:
        raise config.ConfigError(f"engine must be one of {', '.join(generation.ENGINES)}, got {cfg.engine!r}")
    if cfg.tags_k < 1 or cfg.max_new_tokens < 1 or cfg.generate_batch_size < 1:
        raise config.ConfigError("tags_k, max_new_tokens and generate_batch_size must be >= 1")
    if not cfg.input:
        raise config.ConfigError("an input path is needed (--input)")
    cfg.model = exports.resolve_export(cfg.model)  # RUN/export: the export it points to now, for every actor
    if cfg.model and os.path.isdir(cfg.model):
        cfg.model = storage.absolute(cfg.model)  # the actors may run in another directory
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


class ViewStage:
    """An actor-pool stage that fills one view of each pending row; a row whose view raises is
    failed alone (transient faults go to the runner's guard, which retries the batch)."""

    name = ""

    def __init__(self, work: pa.Schema) -> None:
        self.work = work

    def fill(self, todo: list[Row]) -> None:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = runner.pending(rows)
        if todo:
            try:
                self.fill(todo)
            except Exception as exc:
                if faults.is_transient(exc):
                    raise
                for r in todo:  # find the row that breaks the batch; the others still get their view
                    try:
                        self.fill([r])
                    except Exception as inner:
                        if faults.is_transient(inner):
                            raise
                        runner.fail(r, self.name, f"{type(inner).__name__}: {inner}")
        return pa.Table.from_pylist(rows, schema=self.work)


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


class OcrReader(ViewStage):
    """rapidocr with the PP-OCR detection, direction and recognition models its wheel ships (the
    model paths are given, so it never downloads); one engine per actor."""

    name = "ocr"

    def __init__(self, work: pa.Schema, threads: int = 1, min_score: float = 0.5) -> None:
        super().__init__(work)
        self.engine = ocr_engine(threads, min_score)

    def fill(self, todo: list[Row]) -> None:
        for r in todo:
            r["ocr"] = read_text(self.engine, r["image_rgb"])


def ocr_engine(threads: int = 1, min_score: float = 0.5) -> Any:
    """A RapidOCR engine on the packaged ONNX models (PP-OCRv6 small det / rec, mobile v2 cls)."""
    from pathlib import Path

    import rapidocr

    root = Path(rapidocr.__file__).resolve().parent / "models"
    paths = {"Det": "PP-OCRv6_det_small.onnx", "Rec": "PP-OCRv6_rec_small.onnx",
             "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx"}
    params: dict[str, Any] = {"Global.log_level": "error", "Global.text_score": min_score,
                              "EngineConfig.onnxruntime.intra_op_num_threads": max(1, threads),
                              "EngineConfig.onnxruntime.inter_op_num_threads": 1}
    for task, fname in paths.items():
        path = root / fname
        if not path.exists():
            raise FileNotFoundError(f"rapidocr's packaged model {path} is missing; reinstall rapidocr")
        params[f"{task}.model_path"] = str(path)
    return rapidocr.RapidOCR(params=params)


def read_text(engine: Any, image: bytes | Any) -> str:
    """The text lines the engine reads in an image (encoded bytes, PIL image or array), in reading
    order (top to bottom, left to right within a line), joined by spaces; "" when none."""
    result = engine(image)
    lines = [t.strip() for t in (getattr(result, "txts", None) or ()) if t and t.strip()]
    return " ".join(lines)


class ImageTagger(ViewStage):
    """EfficientNet-Lite0's top-k ImageNet-1k classifier labels (not VinVL region tags) per image."""

    name = "tags"

    def __init__(self, work: pa.Schema, k: int = 5, threads: int = 1) -> None:
        from eama.engine import vision

        super().__init__(work)
        _set_torch_threads(threads)
        self.k, self.model, self.vision = k, vision.load_model(), vision

    def fill(self, todo: list[Row]) -> None:
        pictures = [images.load_rgb(r["image_rgb"]) for r in todo]
        for r, labels in zip(todo, self.vision.top_labels(pictures, self.k, self.model)):
            r["object_tags"] = labels


class Captioner(ViewStage):
    """One image-text-to-text model replica per actor, on vLLM (engine/vllm_engine.py) or
    transformers (engine/hf.py); greedy captions."""

    name = "caption"

    def __init__(self, work: pa.Schema, model: str, prompt: str, device: str = "cpu", max_new_tokens: int = 40,
                 generate_batch_size: int = 8, trust_remote_code: bool = False, revision: str | None = None,
                 threads: int = 1, engine: str = "hf", max_model_len: int = 0, kv_cache_gib: float = 0.0) -> None:
        super().__init__(work)
        if device == "cpu":
            _set_torch_threads(threads)
        self.lm = self.vllm = None
        if engine == "vllm":
            from eama.engine import vllm_engine

            location = hf.resolve(model)
            self.vllm = vllm_engine.VllmGenerator(location, generation.model_family(location, trust_remote_code, revision),
                                                  device, max_model_len, kv_cache_gib, trust_remote_code, revision)
        else:
            self.lm = hf.load_image_text_model(model, device=device, trust_remote_code=trust_remote_code,
                                               revision=revision)
        self.prompt, self.max_new_tokens, self.size = prompt, max_new_tokens, generate_batch_size

    def fill(self, todo: list[Row]) -> None:
        for k in range(0, len(todo), self.size):
            chunk = todo[k : k + self.size]
            pictures = [images.load_rgb(r["image_rgb"]) for r in chunk]
            prompts = [self.prompt] * len(chunk)
            texts = (self.vllm.generate(prompts, pictures, self.max_new_tokens).texts if self.vllm
                     else hf.generate(self.lm, prompts, pictures, self.max_new_tokens))
            for r, text in zip(chunk, texts):
                r["caption"] = text


# ---------------------------------------------------------------- the job


def views_label(cfg: ImageViewsConfig, views: tuple[str, ...]) -> str:
    """What produced the views, e.g. 'caption=NAME@HASH;ocr=rapidocr-3.10.0/PP-OCRv6;tags=...'
    (computed once on the driver)."""
    import importlib.metadata

    parts = []
    if "caption" in views:
        parts.append("caption=" + hf.model_label(cfg.model, hf.resolve(cfg.model), cfg.revision))
    if "ocr" in views:
        parts.append(f"ocr=rapidocr-{importlib.metadata.version('rapidocr')}/PP-OCRv6-small")
    if "tags" in views:
        parts.append(f"tags=efficientnet-lite0-imagenet1k-top{cfg.tags_k}")
    return ";".join(parts)


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
    if "ocr" in views:
        stages.append(runner.Stage("ocr", OcrReader, {"work": work, "threads": max(1, int(plan.ocr_cpus)),
                                                      "min_score": cfg.ocr_min_score},
                                   actors=plan.ocr_actors, cpus=plan.ocr_cpus))
    if "tags" in views:
        stages.append(runner.Stage("tags", ImageTagger, {"work": work, "k": cfg.tags_k,
                                                         "threads": max(1, int(plan.tag_cpus))},
                                   actors=plan.tag_actors, cpus=plan.tag_cpus))
    if "caption" in views:
        stages.append(runner.Stage("caption", Captioner, {
            "work": work, "model": cfg.model, "prompt": cfg.caption_prompt, "device": plan.device,
            "max_new_tokens": cfg.max_new_tokens, "generate_batch_size": cfg.generate_batch_size,
            "trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision,
            "threads": max(1, int(plan.caption_cpus)), "engine": engine, "max_model_len": cfg.max_model_len,
            "kv_cache_gib": cfg.vllm_kv_cache_gib}, actors=plan.caption_actors, cpus=plan.caption_cpus,
            gpus=plan.caption_gpus))
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
    if not storage.exists(cfg.input) and not any(ch in cfg.input for ch in "*?["):
        raise SystemExit(f"input not found: {cfg.input}")
    label = views_label(cfg, views)
    if not ray.is_initialized():
        ray.init()
    res = ray.cluster_resources()
    plan = resources.plan_views(res.get("CPU", 1), res.get("GPU", 0), views, cfg.device, cfg.caption_actors,
                                cfg.gpus_per_caption, cfg.ocr_actors)
    run_id = runner.new_run_id()
    engine = "hf"
    if "caption" in views:
        engine = generation.pick_engine(cfg.engine, lambda: generation.model_family(
            hf.resolve(cfg.model), cfg.trust_remote_code, cfg.revision), "caption", plan.device)
    return runner.run(views_job(cfg, views, plan, label, run_id, engine), cfg, run_id=run_id)

