"""Import multimodal NER posts from UMT's CoNLL files into MNER rows (schema.MNER_SAMPLE).

A post is an `IMGID:<id>` line, then one `token<TAB>tag` line per token, then a blank line. The
image id becomes the sample id. `captions` joins a captions file of `<imgid>.jpg :<caption>` lines
(the BLIP-2 captions beside the Twitter sets); `images` a folder of `<imgid>.jpg` files. A post that
cannot be used (no tokens, a line that is not token<TAB>tag, a tag that is not O / B-X / I-X, an image
that does not decode) becomes an error row naming file:line; the import never stops for one.
"""

from __future__ import annotations

from typing import Any, Iterator

from eama.engine import importing, storage
from eama.engine.importing import Item, error
from eama.mner import spans


def read_captions(path: str) -> dict[str, str]:
    """image id -> caption from `<imgid>.jpg :<caption>` lines (the extension is dropped)."""
    captions: dict[str, str] = {}
    for lineno, line in enumerate(storage.read_bytes(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, caption = line.partition(":")
        if not sep:
            raise ValueError(f"{path}:{lineno}: expected '<imgid>.jpg :<caption>', got {line[:80]!r}")
        captions[name.strip().rsplit(".", 1)[0]] = caption.strip()
    return captions


def _posts(path: str) -> Iterator[tuple[int, str | None, list[tuple[int, str]]]]:
    """(line of the post's first line, image id or None, [(line number, raw line)])."""
    raw = storage.read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 at byte {exc.start}") from None
    first, image_id, lines = 0, None, []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.startswith("IMGID:") or not line.strip():
            if image_id is not None or lines:
                yield first, image_id, lines
            first, image_id, lines = lineno, (line[len("IMGID:"):].strip() if line.strip() else None), []
            continue
        if not lines and image_id is None:
            first = lineno
        lines.append((lineno, line))
    if image_id is not None or lines:
        yield first, image_id, lines


def twitter_samples(path: str, captions: str | None = None, image_dir: str | None = None) -> Iterator[Item]:
    """Yield (row, None) per usable post and (None, error) per unusable one."""
    caption_of = read_captions(captions) if captions else {}
    for first, image_id, lines in _posts(path):
        where = f"{path}:{first}"
        if image_id is None:
            yield None, error(None, where, "post without an IMGID: line")
            continue
        tokens, tags, problem = [], [], None
        for lineno, line in lines:
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0]:
                problem = (f"{path}:{lineno}", f"expected token<TAB>tag, got {line[:80]!r}")
                break
            tokens.append(fields[0])
            tags.append(fields[1].strip())
        if problem is None and not tokens:
            problem = (where, f"post {image_id} has no tokens")
        if problem is None and (why := spans.check_tags(tags)):
            problem = (where, f"post {image_id}: {why}")
        if problem:
            yield None, error(image_id, *problem)
            continue
        row: dict[str, Any] = {"sample_id": image_id, "tokens": tokens, "tags": tags, "image_id": image_id,
                               "caption": caption_of.get(image_id)}
        if image_dir:
            data, why = importing.load_image(storage.join(image_dir, f"{image_id}.jpg"))
            if why:
                yield None, error(image_id, where, why)
                continue
            row["image"] = data
        yield row, None
