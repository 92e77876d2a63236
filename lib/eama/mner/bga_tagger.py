"""BGA-MNER taggers as the jobs meet them: building one on a pretrained encoder, a batch of MNER
rows as model inputs (the post's subtokens, and its real visual source), tagging, loading an export.

A row's real visual source is its image (decoded, through the frozen image encoder of the spec)
where it has one, else its caption (the caption proxy: the caption's subtokens through a frozen
copy of the pretrained text encoder), else none. Inference view `text` (the paper's) reads no
visual input at all; view `visual` adds each row's real source where it has one, and a row whose
image does not decode fails (an error row in tag_entities) instead of quietly reading its caption.
In training such a row trains on its caption (or text alone), and is counted and named in the log.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from eama.engine import encoders, faults, feature_cache
from eama.engine import images as image_io
from eama.mner import bga, spans, tagger, visual

VIEWS = ("text", "visual")  # inference: text only (generated visual features) | with the real visual source


def bga_spec(spec: tagger.TaggerSpec) -> bga.BgaSpec:
    return bga.BgaSpec(**(spec.bga or {}))


def build(encoder_name: str, types: Sequence[str], spec: bga.BgaSpec, max_length: int, dropout: float = 0.1,
          dtype: Any = None) -> tuple[bga.BgaTagger, Any]:
    """A BGA tagger on a pretrained encoder (preset, hub id, local or s3:// folder) and its tokenizer;
    the caption proxy's frozen encoder is a copy of the pretrained one."""
    encoder, tokenizer = encoders.load_pretrained(encoder_name, dtype)
    proxy = copy.deepcopy(encoder) if spec.caption_proxy else None
    return bga.BgaTagger(encoder, proxy, len(spans.bioes_labels(types)), spec, max_length, dropout), tokenizer


def load(location: str, device: str = "cpu") -> tuple[bga.BgaTagger, Any, tagger.TaggerSpec]:
    """A BGA tagger export (local folder or s3://) ready for inference."""
    spec = tagger.read_spec(location)
    encoder, tokenizer, load_weights = encoders.load_model_folder(location)
    settings = bga_spec(spec)
    proxy = copy.deepcopy(encoder) if settings.caption_proxy else None
    model = bga.BgaTagger(encoder, proxy, len(spec.labels), settings, spec.max_length)
    load_weights(model)
    model.to(device).eval()
    return model, tokenizer, spec


def decoded_images(rows: Sequence[dict[str, Any]]) -> tuple[dict[int, Any], dict[int, str]]:
    """Row index -> RGB image for the rows whose image (bytes or URI) decodes, and row index ->
    reason for the rows whose image does not."""
    out, failed = {}, {}
    for i, r in enumerate(rows):
        if not (r.get("image") or r.get("image_uri")):
            continue
        try:
            out[i] = image_io.to_rgb(image_io.open_image(image_io.fetch(r.get("image"), r.get("image_uri"))))
        except (image_io.ImageError, OSError) as exc:
            if faults.is_transient(exc):
                raise  # a storage hiccup: the caller's retry, not a bad image
            failed[i] = f"{type(exc).__name__}: {exc}"
    return out, failed


def image_features(rows: Sequence[dict[str, Any]], encoder: Any,
                   cache: feature_cache.FeatureCache | None = None) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Row index -> frozen features [regions, width] of the rows with an image that decodes (kept
    in `cache`, so an image is decoded and encoded once), and row index -> reason for those whose
    image does not decode."""
    with_image = [i for i, r in enumerate(rows) if r.get("image") or r.get("image_uri")]
    failed: dict[int, str] = {}

    def compute(todo: list[int]) -> dict[int, torch.Tensor]:
        pictures, bad = decoded_images([rows[with_image[j]] for j in todo])
        failed.update({with_image[todo[k]]: why for k, why in bad.items()})
        order = sorted(pictures)
        return {todo[k]: f for k, f in zip(order, encoder([pictures[k] for k in order]))}

    keys = [feature_cache.image_key(rows[i].get("image"), rows[i].get("image_uri")) for i in with_image]
    found = feature_cache.lookup(cache, keys, compute)
    return {with_image[j]: f for j, f in found.items()}, failed


def visual_inputs(rows: Sequence[dict[str, Any]], tokenizer: Any, spec: bga.BgaSpec, device: Any = "cpu",
                  cache: feature_cache.FeatureCache | None = None) -> dict[str, Any]:
    """Model inputs of the rows' real visual sources: image features and mask (rows with an image),
    caption-proxy subtokens and mask (rows with a caption), `has_visual` [B], and `undecodable`
    (row index -> reason, the rows whose image did not decode; they read their caption if any)."""
    n = len(rows)
    out: dict[str, Any] = {}
    has = torch.zeros(n, dtype=torch.bool)
    if spec.vision != visual.NONE:
        encoder = visual.load(spec.vision)
        found, out["undecodable"] = image_features(rows, encoder, cache)
        features = torch.zeros(n, encoder.regions, encoder.width)
        mask = torch.zeros(n, encoder.regions, dtype=torch.bool)
        for i, f in found.items():
            features[i], mask[i] = f, True
        has |= mask.any(1)
        out.update(image_features=features.to(device), image_mask=mask.to(device))
    if spec.caption_proxy:
        captions = [(r.get("caption") or "").strip() for r in rows]
        enc = tokenizer(captions, padding=True, truncation=True, max_length=spec.proxy_tokens, return_tensors="pt")
        mask = enc["attention_mask"].bool() & torch.tensor([bool(c) for c in captions]).unsqueeze(1)
        has |= mask.any(1)
        out.update(proxy_ids=enc["input_ids"].to(device), proxy_mask=mask.to(device))
    out["has_visual"] = has.to(device)
    out.setdefault("undecodable", {})
    return out


def tag_rows(model: Any, tokenizer: Any, spec: tagger.TaggerSpec, rows: Sequence[dict[str, Any]], view: str,
             device: Any = "cpu", cache: feature_cache.FeatureCache | None = None) -> list[list[str]]:
    """BIO tags of MNER rows in inference view `text` or `visual`. `model` is a BgaTagger or
    anything called like one that has its `crf` (the DeepSpeed engine in training)."""
    words = [list(r["tokens"]) for r in rows]
    enc = tagger.encode(tokenizer, words, None, spec.max_length, device)
    extra = {}
    if view == "visual":
        extra = visual_inputs(rows, tokenizer, bga_spec(spec), device, cache)
        if (bad := extra.pop("undecodable")):
            i, why = next(iter(bad.items()))
            raise image_io.ImageError(f"sample {rows[i].get('sample_id')}: image does not decode ({why}); "
                                      f"view visual needs it (view text tags without images)")
        extra["use_real"] = extra.pop("has_visual")
    return tagger.predict(model, enc, spec.labels, [len(w) for w in words], extra)


def settings_of(cfg: Any) -> bga.BgaSpec:
    """The BgaSpec of training settings (train_mner's keys); region_slots 0 = as many as the
    larger real source (image regions, caption-proxy subtokens)."""
    regions, width = visual.shape_of(cfg.vision)
    slots = cfg.region_slots or max(regions, cfg.proxy_tokens if cfg.caption_proxy else 0, 1)
    return bga.BgaSpec(layers=cfg.bga_layers, scs=cfg.scs, scs_stages=cfg.scs_stages, gumbel_tau=cfg.gumbel_tau,
                       generator_layers=cfg.generator_layers, region_slots=slots, vision=cfg.vision,
                       image_width=width, caption_proxy=cfg.caption_proxy, proxy_tokens=cfg.proxy_tokens,
                       cycle=cfg.cycle_weight > 0)
