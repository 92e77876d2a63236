"""Every prompt eama shows a model, and the parsers of its answers.

Training (alignment task rows) and inference (caption_corpus) both build their text here, so the
model is asked at inference exactly what it was trained on.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

WORD_BUDGET = 600  # EAMA: article context plus self-selected material stays within 600 words
SELECTION_WORDS = 100  # of the budget, what eama's caption prompt keeps for the selected material
# One prompt's candidates: enough that nearly every news article is one group (of 40 NYTimes800k
# test contexts, spaCy sm: at most 21 sentences name a visual entity; 39 have at most 60 entities),
# so every prompt about a sample shares one context, computed once (docs/captioning.md).
MAX_CANDIDATE_SENTENCES = 25
MAX_CANDIDATE_ENTITIES = 60
MAX_SENTENCE_WORDS = 60
MAX_HEADLINE_WORDS = 40
NONE_ANSWER = "none"

# A prompt is the sample's news context, CONTEXT_END, then the task: every prompt about one sample
# starts with the same context, so inference runs image + context once (models.image_prefix) and
# each task adds only its own lines, its instruction last.
CONTEXT_END = "\n\n"
LATER = "Later in the article:"
ENTITY_LIST = "Entities:"  # the line of candidate entities
SENTENCE_INSTRUCTION = (
    "Which numbered sentences name a person, organisation, place or event the image shows? "
    f"Answer with their numbers separated by commas, or '{NONE_ANSWER}'."
)
ENTITY_INSTRUCTION = (
    "Which of the entities belong in the caption of this image? Answer with them separated by semicolons, "
    f"or '{NONE_ANSWER}'."
)
CAPTION_INSTRUCTION = "Write the news caption of this image."
# What InstructBLIP's Q-Former reads with every prompt, in training and inference: one text for all
# tasks keeps a sample's visual tokens the same in its three prompts, so they share one cached head.
QFORMER_TEXT = CAPTION_INSTRUCTION
_NUMBERED = re.compile(r"^\[(\d+)\] (.*)$", re.MULTILINE)


def words(text: str) -> list[str]:
    return text.split()


def truncate_words(text: str, limit: int) -> str:
    parts = text.split()
    return text if len(parts) <= limit else " ".join(parts[:limit])


def one_line(text: str) -> str:
    return " ".join(text.split())


def _headline(headline: str | None) -> tuple[list[str], int]:
    """The headline line (if any) and the words it takes from the budget."""
    if not headline:
        return [], 0
    text = truncate_words(one_line(headline), MAX_HEADLINE_WORDS)
    return [f"Headline: {text}"], len(words(text))


def plain_context(article: str, headline: str | None = None, budget: int = WORD_BUDGET) -> str:
    """Headline and article as running text within the word budget: the 'Base' context."""
    head, used = _headline(headline)
    return "\n".join(head + [f"Article: {truncate_words(one_line(article), max(0, budget - used))}"])


def news_context(
    article: str,
    headline: str | None,
    sentences: Sequence[str],
    numbered: Sequence[int] = (),
    entities: Sequence[str] = (),
    budget: int = WORD_BUDGET - SELECTION_WORDS,
) -> str:
    """The context every eama prompt of a sample shares: headline, then the article one sentence a
    line from its start, with the sentences `numbered` (indices into `sentences`, article order)
    marked [1], [2], ..., then the candidate `entities` on one ENTITY_LIST line. Numbered sentences
    the passage does not reach follow under LATER (each cut to MAX_SENTENCE_WORDS): the passage
    stops early enough to leave room for them and the entity line within the word budget."""
    sentences = sentences or [article]
    number = {i: k + 1 for k, i in enumerate(numbered)}
    shown = {i: truncate_words(one_line(sentences[i]), MAX_SENTENCE_WORDS) for i in numbered}
    reserve = sum(len(words(s)) for s in shown.values())  # words of the numbered sentences not placed yet
    head, used = _headline(headline)
    entity_line = [f"{ENTITY_LIST} {'; '.join(one_line(e) for e in entities)}"] if entities else []
    room = budget - used - sum(len(words(x)) - 1 for x in entity_line)
    lines, placed = head + ["Article:"], set()
    for i, sentence in enumerate(sentences):
        text = one_line(sentence)
        rest = reserve - len(words(shown[i])) if i in number else reserve
        fits = room - rest
        if len(words(text)) <= fits:
            lines.append(f"[{number[i]}] {text}" if i in number else text)
            placed.add(i)
            room, reserve = room - len(words(text)), rest
        else:
            if i not in number and fits > 0:
                lines.append(truncate_words(text, fits))
            break
    later = [f"[{number[i]}] {shown[i]}" for i in numbered if i not in placed]
    return "\n".join(lines + ([LATER] + later if later else []) + entity_line)


def numbered_sentences(prompt: str) -> list[str]:
    """The numbered sentences of a prompt's context, in number order (as the model saw them)."""
    context = prompt.split(CONTEXT_END, 1)[0]
    found = {int(k): text for k, text in _NUMBERED.findall(context)}
    return [found[k] for k in sorted(found)]


def listed_entities(prompt: str) -> list[str]:
    """The candidate entities a prompt's context lists (its last ENTITY_LIST line)."""
    for line in reversed(prompt.split(CONTEXT_END, 1)[0].split("\n")):
        if line.startswith(ENTITY_LIST + " "):
            return line[len(ENTITY_LIST) + 1:].split("; ")
    return []


def sentence_selection_prompt(context: str) -> str:
    return context + CONTEXT_END + SENTENCE_INSTRUCTION


def entity_selection_prompt(context: str) -> str:
    return context + CONTEXT_END + ENTITY_INSTRUCTION


def caption_prompt(
    context: str,
    selected_sentences: Sequence[str] = (),
    selected_entities: Sequence[str] = (),
    budget: int = SELECTION_WORDS,
) -> str:
    """The captioning prompt: the context, then the selected entities and sentences within their
    share of the word budget (EAMA's self-supplemented context), then the instruction. With nothing
    selected and a plain_context this is the 'Base' prompt: image + truncated article."""
    lines = []
    if selected_entities:
        ents = truncate_words("; ".join(one_line(e) for e in selected_entities), budget)
        lines.append(f"Key entities: {ents}")
        budget -= len(words(ents))
    if selected_sentences and budget > 0:
        sents = " ".join(truncate_words(one_line(s), MAX_SENTENCE_WORDS) for s in selected_sentences)
        lines.append(f"Key sentences: {truncate_words(sents, budget)}")
    return context + CONTEXT_END + "\n".join(lines + [CAPTION_INSTRUCTION])


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


_REGEX_SPECIAL = set("\\.^$*+?{}[]|()")
LIST_SEPARATOR = {"sentences": ", ", "entities": "; "}  # how the training targets join items (format_*_target)


def _literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def answer_regex(kind: str, choices: Sequence[str]) -> str:
    """The answers a list question of `kind` may get, as a regex for structured output: 'none', or
    one to len(choices) of the choices joined as the training targets join them ('2, 5' or
    'A; B'). Guided decoding keeps the answer in this language; the parsers still judge it."""
    if not choices:
        return NONE_ANSWER
    item = "(" + "|".join(sorted({_literal(one_line(c)) for c in choices}, key=lambda x: (-len(x), x))) + ")"
    more = f"({_literal(LIST_SEPARATOR[kind])}{item}){{0,{len(choices) - 1}}}"
    return f"({NONE_ANSWER}|{item}{more})"


def fit_words(build: Callable[[int], T], budget: int, over: Callable[[T], int]) -> T | None:
    """The one rule for prompts longer than a model allows: build(b) for the largest word budget
    b <= `budget` whose `over(...)` (tokens past the model's limit) is <= 0, found by bisection;
    None when even b = 0 does not fit (the row is an error naming its tokens)."""
    best = build(budget)
    if over(best) <= 0:
        return best
    lo, hi = 0, budget  # invariant: build(hi) does not fit; build(lo) is checked first
    best = build(0)
    if over(best) > 0:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = build(mid)
        if over(candidate) <= 0:
            lo, best = mid, candidate
        else:
            hi = mid
    return best


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
        f"Headline: Key entities: Key sentences: Article: {LATER} {ENTITY_LIST} USER: ASSISTANT: Answer:", NONE_ANSWER,
        "[1] [2] [3] [4] [5] [6] [7] [8] [9] [10] 1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    ]
