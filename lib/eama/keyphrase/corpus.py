"""Import multimodal keyphrase posts (CMKP / MM-MKP Twitter files) into keyphrase rows
(schema.KEYPHRASE_SAMPLE).

Two line layouts, told apart line by line:
* CMKP: `post<sep>kp1;kp2;...<sep>image URL`;
* MM-MKP: `post <seg> OCR <seg> entity ; entity ...<sep>kp1;kp2;...<sep>image URL<sep>tensor([[p0, p1]])<sep>...`,
  p1 being the image-text matching probability.
The sample id is `<split>-<line number>` (split: the file name up to its first '_' or '.'), so the
two layouts of the same split give the same ids. With `images`, the image is read from
`images/<basename of the URL>`. A line that cannot be used (not UTF-8, no `<sep>`, an empty post, a
matching probability that does not parse, a missing or undecodable image) becomes an error row
naming file:line; the import never stops for one.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from eama.engine import importing, storage
from eama.engine.importing import Item, error
from eama.keyphrase import metric

SEP, SEG = "<sep>", "<seg>"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def split_name(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return re.split(r"[_.]", base, maxsplit=1)[0] or base


def match_probability(field: str) -> float:
    """p1 of `tensor([[p0, p1]])` (the probability that image and post match)."""
    numbers = _NUMBER.findall(field)
    if len(numbers) != 2:
        raise ValueError(f"expected tensor([[p0, p1]]), got {field[:60]!r}")
    p = float(numbers[1])
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"matching probability {p} is not in [0, 1]")
    return p


def parse_line(line: str) -> dict[str, Any]:
    """One line of either layout -> row fields (no sample_id); ValueError says what is wrong."""
    fields = line.split(SEP)
    if len(fields) < 2:
        raise ValueError("no <sep>: expected post<sep>keyphrases<sep>image URL")
    text = fields[0]
    ocr, entities = None, None
    if SEG in text:
        parts = text.split(SEG)
        if len(parts) != 3:
            raise ValueError(f"expected post <seg> OCR <seg> entities, found {len(parts) - 1} <seg>")
        text, ocr_text, entity_text = (p.strip() for p in parts)
        ocr = ocr_text or None
        entities = [e.strip() for e in entity_text.split(";") if e.strip()]
    post = " ".join(text.split())
    if not post:
        raise ValueError("empty post")
    keyphrases = metric.split_phrases(fields[1])
    row: dict[str, Any] = {"post": post, "keyphrases": keyphrases or None, "ocr": ocr, "visual_entities": entities,
                           "image_uri": fields[2].strip() or None if len(fields) > 2 else None}
    if len(fields) > 3 and fields[3].strip():
        row["image_text_match"] = match_probability(fields[3])
    return row


def twitter_samples(path: str, image_dir: str | None = None) -> Iterator[Item]:
    """Yield (row, None) per usable line and (None, error) per unusable one; blank lines are skipped."""
    prefix = split_name(path)
    for lineno, line in importing.decoded_lines(path):
        where, sample_id = f"{path}:{lineno}", f"{prefix}-{lineno:06d}"
        if line is None:
            yield None, error(sample_id, where, "not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            row = parse_line(line)
        except ValueError as exc:
            yield None, error(sample_id, where, str(exc))
            continue
        row["sample_id"] = sample_id
        if image_dir:
            if not row.get("image_uri"):
                yield None, error(sample_id, where, "no image URL to find the image by")
                continue
            data, why = importing.load_image(storage.join(image_dir, os.path.basename(row["image_uri"])))
            if why:
                yield None, error(sample_id, where, why)
                continue
            row["image"] = data
        yield row, None
