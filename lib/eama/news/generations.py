"""Read caption generations written by other systems, starting with Transform-and-Tell.

Transform-and-Tell writes `generations.jsonl` as JSON objects one after another (one per line, or
pretty-printed over many lines). Each holds the reference (`raw_caption` / `caption`), the
`generation`, the article (`context`), `web_url`, and spaCy entities it stored for the reference
(`caption_entities`) and the generation (`generated_entities`).

Rows come out in our caption-output naming (eama.schema.CAPTION_OUTPUT): `caption` is the reference,
`generated_caption` the generation and `caption_entities` the entities *of the generated caption*;
the stored reference entities go to `reference_entities`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Iterator

import pyarrow as pa

from eama.engine import schema, storage

TAT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("generated_caption", pa.string()),
        pa.field("article", pa.string()),
        pa.field("web_url", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("reference_entities", pa.list_(schema.ENTITY)),
        pa.field("caption_entities", pa.list_(schema.ENTITY)),
    ]
)


def iter_json_objects(text: str, source: str = "<text>") -> Iterator[Any]:
    """Every JSON value in `text`, whether one per line or concatenated / pretty-printed."""
    decoder = json.JSONDecoder()
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: invalid JSON at character {exc.pos}: {exc.msg}") from None
        yield obj


def read_json_objects(path: str) -> list[Any]:
    """All JSON objects of a (local or s3://) JSONL / concatenated-JSON file."""
    return list(iter_json_objects(storage.read_bytes(path).decode("utf-8"), source=path))


def is_tat_record(obj: Any) -> bool:
    return isinstance(obj, dict) and "generation" in obj and ("raw_caption" in obj or "caption" in obj)


def stable_sample_id(index: int, web_url: str | None) -> str:
    """`tat-<index>-<first 12 hex of sha256(web_url)>`: stable for a given file."""
    digest = hashlib.sha256((web_url or "").encode("utf-8")).hexdigest()[:12]
    return f"tat-{index:06d}-{digest}"


def _entities(value: Any) -> list[dict] | None:
    """Stored entities reduced to the contract's (text, label, start, end); None if absent."""
    if value is None:
        return None
    return [
        {"text": e.get("text"), "label": e.get("label"), "start": e.get("start"), "end": e.get("end")}
        for e in value
    ]


def tat_row(index: int, obj: dict) -> dict:
    """One Transform-and-Tell record as a row (the raw caption is the reference, as TaT scores it)."""
    reference = obj.get("raw_caption", obj.get("caption"))
    return {
        "sample_id": stable_sample_id(index, obj.get("web_url")),
        "caption": reference,
        "generated_caption": obj.get("generation"),
        "article": obj.get("context"),
        "web_url": obj.get("web_url"),
        "image_path": obj.get("image_path"),
        "reference_entities": _entities(obj.get("caption_entities")),
        "caption_entities": _entities(obj.get("generated_entities")),
    }


def tat_table(objects: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist([tat_row(i, o) for i, o in enumerate(objects)], schema=TAT_SCHEMA)


def read_generations(path: str) -> pa.Table:
    """A JSONL / concatenated-JSON file as a table: Transform-and-Tell records through `tat_row`,
    any other objects as they are (their keys become columns)."""
    objects = read_json_objects(path)
    if objects and all(is_tat_record(o) for o in objects):
        return tat_table(objects)
    if not all(isinstance(o, dict) for o in objects):
        raise ValueError(f"{path}: expected JSON objects")
    return pa.Table.from_pylist(objects)
