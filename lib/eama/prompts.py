"""Every prompt eama shows a model, and the parsers of its answers.

Training (alignment task rows) and inference (caption_corpus) both build their text here, so the
model is asked at inference exactly what it was trained on.
"""

from __future__ import annotations

import re
from typing import Sequence

WORD_BUDGET = 600  # EAMA: article context plus self-selected material stays within 600 words
MAX_CANDIDATE_SENTENCES = 10
MAX_CANDIDATE_ENTITIES = 30
MAX_SENTENCE_WORDS = 60
NONE_ANSWER = "none"

SENTENCE_INSTRUCTION = (
    "Numbered sentences from the news article of this image follow. Which sentences mention a person, "
    "organisation, place or event that the image shows? Answer with the numbers separated by commas, "
    f"or '{NONE_ANSWER}'."
)
ENTITY_INSTRUCTION = (
    "Named entities from the news article of this image follow. Which of them belong in the caption of "
    f"this image? Answer with the entities separated by semicolons, or '{NONE_ANSWER}'."
)
CAPTION_INSTRUCTION = "Write the news caption of this image."


def words(text: str) -> list[str]:
    return text.split()


def truncate_words(text: str, limit: int) -> str:
    parts = text.split()
    return text if len(parts) <= limit else " ".join(parts[:limit])


def sentence_selection_prompt(candidates: Sequence[str]) -> str:
    lines = [f"[{i + 1}] {truncate_words(s, MAX_SENTENCE_WORDS)}" for i, s in enumerate(candidates)]
    return SENTENCE_INSTRUCTION + "\n" + "\n".join(lines)


def entity_selection_prompt(entities: Sequence[str]) -> str:
    return ENTITY_INSTRUCTION + "\n" + "; ".join(entities)


def caption_prompt(
    article: str,
    headline: str | None = None,
    selected_sentences: Sequence[str] = (),
    selected_entities: Sequence[str] = (),
    budget: int = WORD_BUDGET,
) -> str:
    """The captioning prompt: selected sentences and entities first, then as much article as the
    word budget leaves (EAMA's self-supplemented context). With nothing selected this is the plain
    'Base' prompt: image + truncated article."""
    parts = [CAPTION_INSTRUCTION]
    used = 0
    if headline:
        parts.append(f"Headline: {truncate_words(headline, 40)}")
        used += min(len(words(headline)), 40)
    if selected_entities:
        ents = "; ".join(selected_entities)
        parts.append(f"Key entities: {ents}")
        used += len(words(ents))
    if selected_sentences:
        sents = " ".join(truncate_words(s, MAX_SENTENCE_WORDS) for s in selected_sentences)
        sents = truncate_words(sents, max(0, budget - used))
        parts.append(f"Key sentences: {sents}")
        used += len(words(sents))
    remaining = max(0, budget - used)
    if remaining:
        parts.append(f"Article: {truncate_words(article, remaining)}")
    return "\n".join(parts)


def format_sentence_target(positive_ids: Sequence[int]) -> str:
    """Target text for sentence selection; ids are 0-based, shown 1-based."""
    return ", ".join(str(i + 1) for i in sorted(positive_ids)) if positive_ids else NONE_ANSWER


def format_entity_target(entities: Sequence[str]) -> str:
    return "; ".join(entities) if entities else NONE_ANSWER


def parse_sentence_ids(answer: str, num_candidates: int) -> tuple[list[int], int]:
    """0-based candidate ids named in `answer`, and how many named ids were out of range."""
    ids, dropped = [], 0
    for token in re.findall(r"-?\d+", answer):
        i = int(token) - 1
        if 0 <= i < num_candidates:
            if i not in ids:
                ids.append(i)
        else:
            dropped += 1
    return sorted(ids), dropped


_ITEM_EDGES = " .,;:'\"“”‘’"
SEPARATORS = {"sentences": ",;\n", "entities": ";\n"}  # what ends an item in each kind of list answer


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip(_ITEM_EDGES).casefold()


def sentence_choices(num_candidates: int) -> list[str]:
    """The items a sentence-selection answer may list (candidates are shown 1-based)."""
    return [str(i + 1) for i in range(num_candidates)]


def answer_choices(kind: str, candidates: Sequence[str]) -> list[str]:
    """The items a list answer of `kind` ('sentences' or 'entities') may name."""
    return sentence_choices(len(candidates)) if kind == "sentences" else list(candidates)


class ListAnswerGuard:
    """Whether a list answer being written is still worth decoding, for one row's choices (their
    normal forms are worked out once, not at every decoding step). Used to stop decoding early,
    never to judge an answer: the parsers do."""

    def __init__(self, choices: Sequence[str], kind: str, max_invalid: int = 2):
        self.split = re.compile(f"[{SEPARATORS[kind]}]")
        self.valid = {_norm(c) for c in choices}
        self.starts = self.valid | {re.sub(r"\s+", " ", c).strip().casefold() for c in choices} | {NONE_ANSWER}
        self.longest = max(len(s) for s in self.starts)
        self.max_invalid = max_invalid

    def can_grow(self, answer: str) -> bool:
        """False once the answer is finished or runaway: an item repeats (the model loops), it is a
        complete 'none', every choice is listed, `max_invalid` items name no choice, or the item
        being written is longer than every choice and starts none of them."""
        *done, partial = self.split.split(answer)
        seen: set[str] = set()
        invalid = 0
        for item in (_norm(x) for x in done):
            if not item:
                continue
            if item == NONE_ANSWER or item in seen:
                return False
            if item in self.valid:
                seen.add(item)
            else:
                invalid += 1
        if seen >= self.valid or invalid >= self.max_invalid:
            return False
        head = re.sub(r"\s+", " ", partial).strip().lstrip(_ITEM_EDGES).casefold()
        return len(head) <= self.longest or any(s.startswith(head) for s in self.starts)


def parse_entities(answer: str, candidates: Sequence[str]) -> tuple[list[int], int]:
    """Indices of `candidates` named in `answer` (split on ';' or newlines), and how many named
    items matched no candidate (never trusted, only counted)."""
    by_norm: dict[str, int] = {}
    for i, c in enumerate(candidates):
        by_norm.setdefault(_norm(c), i)
    chosen, dropped = [], 0
    for item in re.split(f"[{SEPARATORS['entities']}]", answer):
        key = _norm(item)
        if not key or key == NONE_ANSWER:
            continue
        if key in by_norm:
            if by_norm[key] not in chosen:
                chosen.append(by_norm[key])
        else:
            dropped += 1
    return sorted(chosen), dropped


def all_template_text() -> list[str]:
    """The fixed words of every template (used to train the tiny models' tokenizer)."""
    return [
        SENTENCE_INSTRUCTION, ENTITY_INSTRUCTION, CAPTION_INSTRUCTION,
        "Headline: Key entities: Key sentences: Article: USER: ASSISTANT: Answer:", NONE_ANSWER,
        "[1] [2] [3] [4] [5] [6] [7] [8] [9] [10] 1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    ]
