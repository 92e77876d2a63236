"""What EAMA offers the model to select from: candidate sentences and candidate entities.

Training shows one group of candidates per prompt (at most MAX_CANDIDATE_SENTENCES numbered
sentences and MAX_CANDIDATE_ENTITIES listed entities). Inference selects over the whole article by
asking the same questions once per group (`selection_groups`); group 0 is what training's
captioning and entity-selection prompts show, so the caption prompt keeps that layout. The limits
are set so that nearly every article is one group: its selection prompts and its caption prompt
then share one context, which an engine computes once.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence

from eama.engine.entities import sentence_entities, unique_texts, visual
from eama.news import prompts


def visual_sentence_ids(sentences: Sequence[str], entities: Sequence[dict]) -> list[int]:
    """Every sentence naming a visual entity (else every sentence), in article order."""
    vis = visual(entities)
    ids = [i for i, s in enumerate(sentences) if sentence_entities(s, vis)]
    return ids or list(range(len(sentences)))


def candidate_sentence_ids(sentences: Sequence[str], entities: Sequence[dict],
                           limit: int = prompts.MAX_CANDIDATE_SENTENCES) -> list[int]:
    """Sentences offered in one prompt: the first `limit` naming a visual entity (else the first ones)."""
    return visual_sentence_ids(sentences, entities)[:limit]


def candidate_entities(entities: Iterable[dict], limit: int = prompts.MAX_CANDIDATE_ENTITIES) -> list[str]:
    """Entities offered in one prompt: the article's unique entity texts (all labels), article order."""
    return unique_texts(entities)[:limit]


@dataclasses.dataclass
class Group:
    """One prompt's candidates: sentence indices (article order) and entity texts."""

    sentence_ids: list[int]
    entities: list[str]


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[k : k + size]) for k in range(0, len(items), size)]


def selection_groups(sentences: Sequence[str], entities: Sequence[dict], max_groups: int = 0,
                     sentence_limit: int = 0, entity_limit: int = 0) -> list[Group]:
    """The whole article's candidates cut into groups of at most `sentence_limit` sentences and
    `entity_limit` entities (0: prompts.MAX_CANDIDATE_*, what one training prompt shows), the k-th
    sentence chunk beside the k-th entity chunk; at most `max_groups` (0: all). Always at least one
    group (with the default limits group 0 is `candidate_sentence_ids` / `candidate_entities`),
    possibly with nothing to select."""
    sents = chunks(visual_sentence_ids(sentences, entities), sentence_limit or prompts.MAX_CANDIDATE_SENTENCES)
    names = chunks(unique_texts(entities), entity_limit or prompts.MAX_CANDIDATE_ENTITIES)
    pairs = itertools.zip_longest(sents, names, fillvalue=[])
    groups = [Group(s, e) for s, e in pairs] or [Group([], [])]
    return groups[:max_groups] if max_groups > 0 else groups
