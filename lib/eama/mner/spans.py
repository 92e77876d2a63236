"""Entity spans from tag sequences, the tagger's label scheme, and entity-level scores.

Span convention (conlleval's lenient reading, also seqeval's default mode): `B-X` starts a span;
`I-X` continues a span of type X, and starts a new one after `O` or after a span of another type.
Twitter-2015's test set has 135 spans that start with `I-`; they count as spans.

The tagger works in BIOES internally (as ITA's code does): gold BIO tags are read into spans with
the convention above and re-written as BIOES; predictions are read back into spans and BIO tags.
Scores use seqeval (`seqeval.metrics` in its default, conlleval-compatible mode).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

Span = tuple[str, int, int]  # (type, start token, end token exclusive)


def bio_spans(tags: Sequence[str]) -> list[Span]:
    """Spans of a BIO sequence under the lenient convention (see the module docstring)."""
    spans: list[Span] = []
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and kind == label
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans


def bioes_spans(tags: Sequence[str]) -> list[Span]:
    """Spans of a (possibly ill-formed) BIOES sequence: B and S start a span, S and E end one, I and
    E continue a span of their type (and start one otherwise)."""
    spans: list[Span] = []
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix in ("I", "E") and kind == label
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix in ("B", "I", "E", "S") and not continues:
            kind, start = label, i
        if prefix in ("E", "S") and kind is not None:
            spans.append((kind, start, i + 1))
            kind = None
    return spans


def to_bioes(spans: Iterable[Span], length: int) -> list[str]:
    tags = ["O"] * length
    for kind, start, end in spans:
        if end - start == 1:
            tags[start] = f"S-{kind}"
        else:
            tags[start] = f"B-{kind}"
            tags[end - 1] = f"E-{kind}"
            for j in range(start + 1, end - 1):
                tags[j] = f"I-{kind}"
    return tags


def to_bio(spans: Iterable[Span], length: int) -> list[str]:
    tags = ["O"] * length
    for kind, start, end in spans:
        tags[start] = f"B-{kind}"
        for j in range(start + 1, end):
            tags[j] = f"I-{kind}"
    return tags


def entity_types(tag_sequences: Iterable[Sequence[str]]) -> list[str]:
    """The entity types named in BIO tag sequences, sorted."""
    return sorted({t.partition("-")[2] for tags in tag_sequences for t in tags if t != "O"})


def bioes_labels(types: Sequence[str]) -> list[str]:
    """The tagger's label list: O, then B/I/E/S of every type."""
    return ["O"] + [f"{p}-{t}" for t in types for p in "BIES"]


def entities(tokens: Sequence[str], spans: Iterable[Span]) -> list[dict[str, Any]]:
    """schema.ENTITY rows of the spans: the tokens joined by spaces and token offsets."""
    return [{"text": " ".join(tokens[s:e]), "label": kind, "start": s, "end": e} for kind, s, e in spans]


def check_tags(tags: Sequence[str]) -> str | None:
    """Why a gold tag sequence is unusable (None when it is fine)."""
    for i, tag in enumerate(tags):
        prefix, sep, label = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not sep or not label):
            return f"token {i}: tag {tag!r} is not O, B-TYPE or I-TYPE"
    return None


def score(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level micro precision / recall / F1 and per-type scores of BIO sequences (seqeval,
    default mode), with the span counts."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    gold_l, pred_l = [list(g) for g in gold], [list(p) for p in predicted]
    if any(len(g) != len(p) for g, p in zip(gold_l, pred_l)) or len(gold_l) != len(pred_l):
        raise ValueError("gold and predicted tag sequences differ in length")
    report = classification_report(gold_l, pred_l, output_dict=True, zero_division=0)
    per_type = {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    return {
        "precision": precision_score(gold_l, pred_l, zero_division=0),
        "recall": recall_score(gold_l, pred_l, zero_division=0),
        "f1": f1_score(gold_l, pred_l, zero_division=0),
        "gold_spans": sum(len(bio_spans(g)) for g in gold_l),
        "predicted_spans": sum(len(bio_spans(p)) for p in pred_l),
        "posts": len(gold_l),
        "per_type": per_type,
    }


def span_counts(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> tuple[int, int, int]:
    """(correct, predicted, gold) span counts with the same convention, for summing over shards."""
    correct = n_pred = n_gold = 0
    for g, p in zip(gold, predicted):
        gs, ps = set(bio_spans(g)), set(bio_spans(p))
        correct += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
    return correct, n_pred, n_gold


def f1(correct: int, predicted: int, gold: int) -> float:
    return 2 * correct / (predicted + gold) if predicted + gold else 0.0
