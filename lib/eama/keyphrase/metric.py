"""The keyphrase metric as CMKP and MM-MKP report it.

Per post: keyphrases are lowercased, split on whitespace and Porter-stemmed word by word; targets
are deduplicated; predictions are deduplicated after stemming (first occurrence kept) and invalid
ones (empty after stripping) dropped. A prediction matches when its stemmed words equal a target's.
For each k: P@k = matches in the top k / min(k, #predictions) (0 without predictions), R@k =
matches in the top k / #targets; both are averaged over posts (macro) and F1@k is the harmonic mean
of the two averages. AP@k sums, over the top-k ranks i that match, the precision at i, and divides
by #targets; MAP@k is its mean. `present` / `absent` restrict targets and predictions to phrases
whose stemmed words do / do not occur contiguously in the stemmed post.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

KS = (1, 3, 5, 10)
SCOPES = ("all", "present", "absent")

Phrase = tuple[str, ...]


@functools.lru_cache(maxsize=1)
def _stemmer() -> Any:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=200_000)
def stem_word(word: str) -> str:
    return _stemmer().stem(word)


def stem_phrase(phrase: str) -> Phrase:
    """Lowercased, whitespace-split, Porter-stemmed words of one keyphrase."""
    return tuple(stem_word(w) for w in phrase.lower().split())


def unique_stems(phrases: Iterable[str]) -> list[Phrase]:
    """Stemmed phrases in order, empty ones dropped, each kept at its first occurrence."""
    seen: set[Phrase] = set()
    out: list[Phrase] = []
    for p in phrases:
        s = stem_phrase(p)
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def is_present(phrase: Phrase, post: Phrase) -> bool:
    n = len(phrase)
    return any(post[i:i + n] == phrase for i in range(len(post) - n + 1))


def post_scores(targets: Sequence[Phrase], predictions: Sequence[Phrase], ks: Sequence[int] = KS
                ) -> dict[str, float]:
    """P@k, R@k and AP@k of one post (stemmed, deduplicated phrases)."""
    gold = set(targets)
    hits = [p in gold for p in predictions]
    out: dict[str, float] = {}
    for k in ks:
        top = hits[:k]
        matches = sum(top)
        out[f"p@{k}"] = matches / len(top) if top else 0.0
        out[f"r@{k}"] = matches / len(gold) if gold else 0.0
        found, precision_sum = 0, 0.0
        for i, hit in enumerate(top):
            if hit:
                found += 1
                precision_sum += found / (i + 1)
        out[f"ap@{k}"] = precision_sum / len(gold) if gold else 0.0
    return out


SUM_KEYS = tuple(f"{m}@{k}" for k in KS for m in ("p", "r", "ap"))


def accumulate(posts: Sequence[str], targets: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]],
               ks: Sequence[int] = KS) -> dict[str, dict[str, float]]:
    """Per scope: the posts counted and the sums of P@k / R@k / AP@k (sums add up across shards).
    Posts without targets in a scope do not count in that scope."""
    if not (len(posts) == len(targets) == len(predictions)):
        raise ValueError(f"{len(posts)} posts, {len(targets)} target lists, {len(predictions)} prediction lists")
    sums = {s: {"posts": 0.0} for s in SCOPES}
    for post, gold, pred in zip(posts, targets, predictions):
        stemmed_post = stem_phrase(post)
        gold_s, pred_s = unique_stems(gold), unique_stems(pred)
        for scope in SCOPES:
            if scope == "all":
                g, p = gold_s, pred_s
            else:
                want = scope == "present"
                g = [x for x in gold_s if is_present(x, stemmed_post) == want]
                p = [x for x in pred_s if is_present(x, stemmed_post) == want]
            if not g:
                continue
            sums[scope]["posts"] += 1
            for key, value in post_scores(g, p, ks).items():
                sums[scope][key] = sums[scope].get(key, 0.0) + value
    return sums


def finish(sums: dict[str, dict[str, float]], ks: Sequence[int] = KS) -> dict[str, Any]:
    """Macro P@k, R@k, F1@k (harmonic mean of the macro P and R) and MAP@k per scope."""
    report: dict[str, Any] = {}
    for scope in SCOPES:
        n = sums[scope]["posts"]
        row: dict[str, float] = {"posts": int(n)}
        for k in ks:
            p = sums[scope].get(f"p@{k}", 0.0) / n if n else 0.0
            r = sums[scope].get(f"r@{k}", 0.0) / n if n else 0.0
            row[f"P@{k}"], row[f"R@{k}"] = p, r
            row[f"F1@{k}"] = 2 * p * r / (p + r) if p + r else 0.0
            row[f"MAP@{k}"] = sums[scope].get(f"ap@{k}", 0.0) / n if n else 0.0
        report[scope] = row
    return report


def score(posts: Sequence[str], targets: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]],
          ks: Sequence[int] = KS) -> dict[str, Any]:
    """The metric over aligned posts, gold keyphrases and ranked predictions (raw strings)."""
    return {"posts": len(posts)} | finish(accumulate(posts, targets, predictions, ks), ks)


def headline(report: dict[str, Any]) -> float:
    """One number for model selection: the mean of F1@1, F1@3 and MAP@5 over all keyphrases."""
    a = report["all"]
    return (a["F1@1"] + a["F1@3"] + a["MAP@5"]) / 3


def split_phrases(field: str) -> list[str]:
    """`kp1;kp2;...` -> stripped phrases (empty ones dropped)."""
    return [p.strip() for p in field.split(";") if p.strip()]
