"""Decoding and normalising news images: any mode in, bounded RGB out, a clear reason when not."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

DEFAULT_MAX_SIDE = 448  # the 7B presets resize to 224 / 336; keep a little more for processors
DEFAULT_MAX_PIXELS = 80_000_000  # refuse decompression bombs before decoding them


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason recorded in the error row."""


def fetch(image: bytes | None, image_uri: str | None) -> bytes | None:
    """A sample's encoded image: the bytes column, else the file at image_uri (local or s3://),
    else None; a missing file raises ImageError naming the URI."""
    if image is not None:
        return image
    if not image_uri:
        return None
    from eama.engine import storage

    try:
        return storage.read_bytes(image_uri)
    except FileNotFoundError:
        raise ImageError(f"image_uri not found: {image_uri}") from None


def open_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    if data is None:
        raise ImageError("no image: both image and image_uri are null")
    if len(data) == 0:
        raise ImageError("empty image (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} exceeds {max_pixels} pixels")
            return img
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many types for undecodable data
        raise ImageError(f"undecodable image: {type(exc).__name__}: {exc}") from None


def to_rgb(img: Image.Image, max_side: int = DEFAULT_MAX_SIDE) -> Image.Image:
    """RGB, at most `max_side` pixels on the long side; alpha composited on white, 16-bit scaled."""
    try:
        if img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))  # decode big JPEGs at reduced scale
        img.load()
    except Exception as exc:
        raise ImageError(f"undecodable image: {type(exc).__name__}: {exc}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) or 1.0
        img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    if min(img.size) < 1:
        raise ImageError(f"degenerate image size {img.size}")
    return img


def normalize_image(data: bytes | None, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Decode, validate and re-encode as a bounded RGB JPEG (what the model stages read)."""
    img = to_rgb(open_image(data, max_pixels), max_side)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def load_rgb(data: bytes) -> Image.Image:
    """Open an image produced by `normalize_image`."""
    return Image.open(io.BytesIO(data)).convert("RGB")
