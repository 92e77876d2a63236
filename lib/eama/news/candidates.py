"""What EAMA offers the model to select from: candidate sentences and candidate entities."""

from __future__ import annotations

from typing import Iterable, Sequence

from eama.engine.entities import sentence_entities, unique_texts, visual
from eama.news import prompts


def candidate_sentence_ids(sentences: Sequence[str], entities: Sequence[dict],
                           limit: int = prompts.MAX_CANDIDATE_SENTENCES) -> list[int]:
    """Sentences offered for selection: the first `limit` naming a visual entity (else the first ones)."""
    vis = visual(entities)
    ids = [i for i, s in enumerate(sentences) if sentence_entities(s, vis)]
    return (ids or list(range(len(sentences))))[:limit]


def candidate_entities(entities: Iterable[dict], limit: int = prompts.MAX_CANDIDATE_ENTITIES) -> list[str]:
    """Entities offered for selection: the article's unique entity texts (all labels), article order."""
    return unique_texts(entities)[:limit]
