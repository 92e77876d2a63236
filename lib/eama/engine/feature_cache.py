"""A memory-bounded cache of frozen encoders' features, keyed by image content: a trainer decodes
each image and runs its frozen image encoder once, not on every epoch. Keys are digests of the
image bytes (or the URI where a row holds one instead), so rows of different splits that reuse
sample ids never share features, and one image in several rows is encoded once.

Features are kept as they were computed (same dtype, on CPU), so a cached row gives exactly the
tensor an uncached one would. The least recently used entries leave first once the bytes held
pass `max_bytes`; one cache per training worker.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Callable, Hashable, Sequence

import torch


class FeatureCache:
    """key -> feature tensor, at most `max_mb` MiB held (0: nothing is kept)."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: collections.OrderedDict[Hashable, torch.Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= _size(self._items.pop(key))
        self._items[key] = value.detach().to("cpu")
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _size(old)

def image_key(image: bytes | None, uri: str | None = None) -> str | None:
    """The cache key of an image: a digest of its bytes, else its URI; None for neither."""
    if image:
        return hashlib.blake2b(image, digest_size=16).hexdigest()
    return f"uri:{uri}" if uri else None


def lookup(cache: FeatureCache | None, keys: Sequence[Hashable | None],
           compute: Callable[[list[int]], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Position -> features for the positions of `keys` that have any: cached ones as kept, the
    rest from `compute(positions)` (which may leave a position out: no features, nothing kept), then
    kept. A None key, or no cache, is computed every time."""
    found: dict[int, torch.Tensor] = {}
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key) if cache is not None and key is not None else None
        if hit is None:
            todo.append(i)
        else:
            found[i] = hit
    if todo:
        for i, value in compute(todo).items():
            found[i] = value
            if cache is not None and keys[i] is not None:
                cache.put(keys[i], value)
    return found


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
