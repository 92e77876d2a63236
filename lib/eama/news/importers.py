"""Turn GoodNews-style JSON + image folders, or JSONL, into contract sample rows.

Images go in as their original encoded bytes. A sample whose image is missing or unreadable
becomes an error row (sample_id, stage='import', reason); it never stops the import.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import os
from typing import Any, Iterator

from eama.engine import images, storage
from eama.engine.importing import error as _error, write_shards  # noqa: F401  (write_shards: for callers)

Row = dict[str, Any]
Error = dict[str, Any]


def _literal(value: Any) -> Any:
    """GoodNews stores some fields as Python-literal strings ("{'main': ...}")."""
    if isinstance(value, str) and value[:1] in "{[(":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _clean(text: Any) -> str | None:
    if text is None:
        return None
    text = str(text).strip()
    return None if not text or text == "None" else text


def _headline(value: Any) -> str | None:
    value = _literal(value)
    if isinstance(value, dict):
        return _clean(value.get("main") or value.get("print_headline") or value.get("seo"))
    return _clean(value)


def _check_image(data: bytes) -> None:
    images.open_image(data).verify()


def goodnews_samples(json_path: str, image_dir: str) -> Iterator[tuple[Row | None, Error | None]]:
    """Yield (sample, None) or (None, error) for every (article, image) of a GoodNews caption.json."""
    articles = json.loads(storage.read_bytes(json_path))
    for article_id, entry in articles.items():
        caps = _literal(entry.get("images", {})) or {}
        for index, caption in sorted(caps.items(), key=lambda kv: str(kv[0])):
            sample_id = f"{article_id}_{index}"
            uri = storage.join(image_dir, f"{sample_id}.jpg")
            try:
                data = storage.read_bytes(uri)
                _check_image(data)
            except FileNotFoundError:
                yield None, _error(sample_id, json_path, f"image file not found: {uri}")
                continue
            except Exception as exc:
                yield None, _error(sample_id, json_path, f"unreadable image {uri}: {exc}")
                continue
            yield {
                "sample_id": sample_id,
                "article_id": str(article_id),
                "headline": _headline(entry.get("headline")),
                "article": str(entry.get("article") or ""),
                "image": data,
                "image_uri": None,
                "caption": _clean(caption),
            }, None


def jsonl_samples(jsonl_path: str, image_root: str | None = None) -> Iterator[tuple[Row | None, Error | None]]:
    """Yield samples from JSONL: one object per line with the contract fields; the image as
    `image_path` / `image_uri` (relative paths resolve against `image_root` or the file's folder)
    or `image_base64`. Bad lines (invalid UTF-8 or JSON, missing fields) become error rows."""
    base = image_root or os.path.dirname(jsonl_path)
    raw = storage.read_bytes(jsonl_path)
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{jsonl_path}:{lineno}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield None, _error(None, where, f"invalid UTF-8 at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            yield None, _error(None, where, f"invalid JSON: {exc.msg}")
            continue
        sample_id = _clean(obj.get("sample_id"))
        missing = [k for k in ("sample_id", "article") if not _clean(obj.get(k))]
        if missing:
            yield None, _error(sample_id, where, f"missing field(s): {', '.join(missing)}")
            continue
        try:
            data = _jsonl_image(obj, base)
        except Exception as exc:
            yield None, _error(sample_id, where, str(exc))
            continue
        yield {
            "sample_id": sample_id,
            "article_id": _clean(obj.get("article_id")) or sample_id,
            "headline": _clean(obj.get("headline")),
            "article": str(obj["article"]),
            "image": data,
            "image_uri": None,
            "caption": _clean(obj.get("caption")),
        }, None


def _jsonl_image(obj: dict, base: str) -> bytes:
    if obj.get("image_base64"):
        try:
            data = base64.b64decode(obj["image_base64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"invalid image_base64: {exc}") from None
    else:
        ref = obj.get("image_path") or obj.get("image_uri")
        if not ref:
            raise ValueError("no image: needs image_path, image_uri or image_base64")
        uri = ref if storage.is_remote(ref) or os.path.isabs(ref) else storage.join(base, ref)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise ValueError(f"image file not found: {uri}") from None
    try:
        _check_image(data)
    except Exception as exc:
        raise ValueError(f"unreadable image: {exc}") from None
    return data
