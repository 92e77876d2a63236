"""Image-text views of a post's image, as batch-runner stages: OCR text, ImageNet labels, a caption.

Shared by image_views (MNER rows) and enrich_posts (any post contract). Every view stage is an
actor class that reads each pending row's decoded picture (`picture`: a bounded RGB JPEG in
`image_rgb`, or raw RGB pixels in `pixels` + `pixel_size`, which enrich_posts decodes once per
image) and fills one column; rows without a picture keep the value they came with.

- `ocr` (OcrReader): the text rapidocr (PP-OCR ONNX models shipped in its wheel, run by
  onnxruntime) reads in the image, lines in reading order joined by spaces; "" when none.
- `tags` (ImageTagger, column object_tags): EfficientNet-Lite0's top-k ImageNet-1k labels
  (engine/vision.py): whole-image classifier labels, not the VinVL region tags ITA published with.
- `caption` (Captioner): any image-text-to-text model on vLLM or transformers (engine/hf.py,
  engine/vllm_engine.py), greedy.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from eama.engine import config, exports, faults, generation, hf, images, isolation, resources, runner, storage

Row = dict[str, Any]

VIEWS = ("caption", "ocr", "tags")  # view names (and stage names); "tags" fills object_tags
COLUMN = {"caption": "caption", "ocr": "ocr", "tags": "object_tags"}  # the column each view fills
DEFAULT_MAX_SIDE = 1280  # keep enough pixels for OCR; the tagger and captioner resize anyway
PIXELS = [pa.field("pixels", pa.binary()), pa.field("pixel_size", pa.list_(pa.int32()))]  # raw RGB, [width, height]


@dataclasses.dataclass
class ViewSettings(generation.EngineConfig):
    """The view stages' settings, shared by the jobs that fill views (each adds its own model key)."""

    revision: str | None = None  # captioning model revision (hub) recorded in views_model; none = the files' hash
    trust_remote_code: bool = False  # run the captioning model's own Python code (off: only transformers' classes)
    caption_actors: int = 0  # captioner replicas; 0 = one per GPU (or 1 per 8 CPUs without GPUs)
    gpus_per_caption: float = 1.0  # GPUs each captioner replica reserves
    caption_prompt: str = "Describe the image in one sentence."  # instruction given with every image
    max_new_tokens: int = 40  # caption length limit in tokens
    generate_batch_size: int = 8  # images per generate call inside a captioner actor
    ocr_actors: int = 0  # OCR replicas; 0 = fill the CPUs the other stages leave
    ocr_min_score: float = 0.5  # OCR lines recognised with a lower confidence are dropped
    tags_k: int = 5  # ImageNet labels kept per image, most probable first
    max_image_side: int = DEFAULT_MAX_SIDE  # longer image side after decoding, pixels
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS  # larger images are refused before decoding


def parse_views(text: str, allow_empty: bool = False) -> tuple[str, ...]:
    """'caption,ocr' -> ('caption', 'ocr') in canonical order; unknown (or, unless allowed, no)
    names: a config error."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VIEWS]
    if bad or not (names or allow_empty):
        raise config.ConfigError(f"views must be a comma-separated subset of {', '.join(VIEWS)}, got {text!r}")
    return tuple(v for v in VIEWS if v in names)


def caption_location(model: str) -> str:
    """Where the caption view's model is loaded from, the same for every actor: RUN/export resolved
    to the export it points to now, a local folder made absolute (the actors may run in another
    directory), a hub id, preset or s3:// URI as given."""
    path = exports.resolve_export(model)
    return storage.absolute(path) if path and os.path.isdir(path) else path


def check_settings(cfg: ViewSettings, views: tuple[str, ...], caption_model: str, model_key: str) -> None:
    """The view settings' checks before Ray starts (ConfigError naming the key)."""
    if "caption" in views and not caption_model:
        raise config.ConfigError(f"the caption view needs a captioning model: pass {model_key} (hub id, local "
                                 "path or s3:// URI), or leave caption out of --views")
    if cfg.engine not in generation.ENGINES:
        raise config.ConfigError(f"engine must be one of {', '.join(generation.ENGINES)}, got {cfg.engine!r}")
    if cfg.tags_k < 1 or cfg.max_new_tokens < 1 or cfg.generate_batch_size < 1:
        raise config.ConfigError("tags_k, max_new_tokens and generate_batch_size must be >= 1")


def picture(row: Row) -> Image.Image | None:
    """The row's decoded image: raw pixels (decoded once upstream) or the normalised JPEG; None when
    the row has neither (a post without an image)."""
    if row.get("pixels") is not None:
        width, height = row["pixel_size"]
        return Image.frombytes("RGB", (width, height), row["pixels"])
    if row.get("image_rgb") is not None:
        return images.load_rgb(row["image_rgb"])
    return None


def decode_pixels(data: bytes | None, max_side: int, max_pixels: int) -> tuple[bytes, list[int]]:
    """Decode an encoded image once into bounded raw RGB pixels and their [width, height]."""
    img = images.to_rgb(images.open_image(data, max_pixels), max_side)
    return img.tobytes(), list(img.size)


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


class ViewStage:
    """An actor-pool stage that fills one view of each pending row with a picture; a row whose
    view raises is failed alone (transient faults go to the runner's guard, which retries)."""

    name = ""

    def __init__(self, work: pa.Schema) -> None:
        self.work = work

    def fill(self, todo: list[Row], pictures: list[Image.Image]) -> None:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [(r, p) for r in isolation.pending(rows) if (p := picture(r)) is not None]
        if todo:
            try:
                self.fill([r for r, _ in todo], [p for _, p in todo])
            except Exception as exc:
                if faults.is_transient(exc):
                    raise
                for r, p in todo:  # find the row that breaks the batch; the others still get their view
                    try:
                        self.fill([r], [p])
                    except Exception as inner:
                        if faults.is_transient(inner):
                            raise
                        isolation.fail(r, self.name, f"{type(inner).__name__}: {inner}")
        return pa.Table.from_pylist(rows, schema=self.work)


class OcrReader(ViewStage):
    """rapidocr with the PP-OCR detection, direction and recognition models its wheel ships (the
    model paths are given, so it never downloads); one engine per actor."""

    name = "ocr"

    def __init__(self, work: pa.Schema, threads: int = 1, min_score: float = 0.5) -> None:
        super().__init__(work)
        self.engine = ocr_engine(threads, min_score)

    def fill(self, todo: list[Row], pictures: list[Image.Image]) -> None:
        for r, p in zip(todo, pictures):
            r["ocr"] = read_text(self.engine, p)


OCR_MODELS = {"Det": "PP-OCRv6_det_small.onnx", "Rec": "PP-OCRv6_rec_small.onnx",
              "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx"}


def ocr_engine(threads: int = 1, min_score: float = 0.5) -> Any:
    """A RapidOCR engine on the packaged ONNX models (PP-OCRv6 small det / rec, mobile v2 cls)."""
    import rapidocr

    root = Path(rapidocr.__file__).resolve().parent / "models"
    params: dict[str, Any] = {"Global.log_level": "error", "Global.text_score": min_score,
                              "EngineConfig.onnxruntime.intra_op_num_threads": max(1, threads),
                              "EngineConfig.onnxruntime.inter_op_num_threads": 1}
    for task, fname in OCR_MODELS.items():
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
        set_torch_threads(threads)
        self.k, self.model, self.vision = k, vision.load_model(), vision

    def fill(self, todo: list[Row], pictures: list[Image.Image]) -> None:
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
            set_torch_threads(threads)
        self.lm = self.vllm = None
        if engine == "vllm":
            from eama.engine import vllm_engine

            location = hf.resolve(model)
            self.vllm = vllm_engine.VllmGenerator(location, generation.model_family(location, trust_remote_code, revision),
                                                  device, max_model_len, kv_cache_gib, trust_remote_code, revision,
                                                  max(1, threads))
        else:
            self.lm = hf.load_image_text_model(model, device=device, trust_remote_code=trust_remote_code,
                                               revision=revision)
        self.prompt, self.max_new_tokens, self.size = prompt, max_new_tokens, generate_batch_size

    def fill(self, todo: list[Row], pictures: list[Image.Image]) -> None:
        for k in range(0, len(todo), self.size):
            chunk, shown = todo[k : k + self.size], pictures[k : k + self.size]
            prompts = [self.prompt] * len(chunk)
            texts = (self.vllm.generate(prompts, shown, self.max_new_tokens).texts if self.vllm
                     else hf.generate(self.lm, prompts, shown, self.max_new_tokens))
            for r, text in zip(chunk, texts):
                r["caption"] = text


def pick_engine(cfg: ViewSettings, views: tuple[str, ...], caption_model: str, device: str) -> str:
    """The caption engine (logged once): hf when no caption is computed."""
    if "caption" not in views:
        return "hf"
    return generation.pick_engine(cfg.engine, lambda: generation.model_family(
        hf.config_folder(caption_model), cfg.trust_remote_code, cfg.revision), "caption", device)


def stages(views: tuple[str, ...], cfg: ViewSettings, caption_model: str, plan: resources.ViewsPlan,
           work: pa.Schema, engine: str = "hf") -> list[runner.Stage]:
    """The actor-pool stages of `views` (ocr -> tags -> caption), sized by `plan`."""
    out = []
    if "ocr" in views:
        out.append(runner.Stage("ocr", OcrReader, {"work": work, "threads": max(1, int(plan.ocr_cpus)),
                                                   "min_score": cfg.ocr_min_score},
                                actors=plan.ocr_actors, cpus=plan.ocr_cpus))
    if "tags" in views:
        out.append(runner.Stage("tags", ImageTagger, {"work": work, "k": cfg.tags_k,
                                                      "threads": max(1, int(plan.tag_cpus))},
                                actors=plan.tag_actors, cpus=plan.tag_cpus))
    if "caption" in views:
        out.append(runner.Stage("caption", Captioner, {
            "work": work, "model": caption_model, "prompt": cfg.caption_prompt, "device": plan.device,
            "max_new_tokens": cfg.max_new_tokens, "generate_batch_size": cfg.generate_batch_size,
            "trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision,
            "threads": max(1, int(plan.caption_cpus)), "engine": engine, "max_model_len": cfg.max_model_len,
            "kv_cache_gib": cfg.vllm_kv_cache_gib}, actors=plan.caption_actors, cpus=plan.caption_cpus,
            gpus=plan.caption_gpus))
    return out


def label(views: tuple[str, ...], caption_model: str = "", revision: str | None = None, tags_k: int = 5) -> str:
    """What produced the views, e.g. 'caption=NAME@HASH;ocr=rapidocr-3.10.0/PP-OCRv6-small;tags=...'
    (computed once on the driver)."""
    parts = []
    if "caption" in views:
        location = exports.resolve_export(caption_model)  # s3://: labelled by its listing, not downloaded
        parts.append("caption=" + hf.model_label(caption_model, location, revision))
    if "ocr" in views:
        parts.append(f"ocr=rapidocr-{importlib.metadata.version('rapidocr')}/PP-OCRv6-small")
    if "tags" in views:
        parts.append(f"tags=efficientnet-lite0-imagenet1k-top{tags_k}")
    return ";".join(parts)
