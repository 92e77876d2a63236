"""Keyphrase baselines trained on the same posts as the model.

* `most_frequent`: every post gets the training set's most frequent keyphrases.
* `TfidfLinear`: TF-IDF of the input text (word 1-2-grams, sublinear tf) and one linear SVM per
  training keyphrase (one-vs-rest); a post's keyphrases are ranked by decision value. C is chosen
  on the held-out posts (the headline metric), never on the test set.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from eama.keyphrase import metric

Row = dict[str, Any]


def input_text(row: Row, inputs: str = "all") -> str:
    """The text a baseline sees: the post, with OCR and visual entities for inputs=all."""
    parts = [row["post"]]
    if inputs == "all":
        parts += [row.get("ocr") or "", " ; ".join(row.get("visual_entities") or [])]
    return " ".join(p for p in parts if p)


def most_frequent(train: Sequence[Row], n: int = 10) -> list[str]:
    counts = collections.Counter(k for r in train for k in set(r.get("keyphrases") or []))
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def score_rows(rows: Sequence[Row], predictions: Sequence[Sequence[str]]) -> dict[str, Any]:
    return metric.score([r["post"] for r in rows], [r.get("keyphrases") or [] for r in rows], predictions)


class TfidfLinear:
    """TF-IDF + one-vs-rest linear SVMs over the training keyphrases."""

    def __init__(self, c: float = 1.0, inputs: str = "all"):
        self.c, self.inputs = c, inputs

    def fit(self, train: Sequence[Row]) -> "TfidfLinear":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.preprocessing import MultiLabelBinarizer
        from sklearn.svm import LinearSVC

        rows = [r for r in train if r.get("keyphrases")]
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        x = self.vectorizer.fit_transform([input_text(r, self.inputs) for r in rows])
        self.labels = MultiLabelBinarizer()
        y = self.labels.fit_transform([sorted(set(r["keyphrases"])) for r in rows])
        self.model = OneVsRestClassifier(LinearSVC(C=self.c)).fit(x, y)
        return self

    def predict(self, rows: Sequence[Row], n: int = 10) -> list[list[str]]:
        import numpy as np

        scores = self.model.decision_function(self.vectorizer.transform([input_text(r, self.inputs) for r in rows]))
        order = np.argsort(-scores, axis=1)[:, :n]
        classes = self.labels.classes_
        return [[classes[j] for j in row] for row in order]


def select_tfidf(train: Sequence[Row], holdout: Sequence[Row], cs: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
                 inputs: str = "all") -> tuple[TfidfLinear, dict[float, float]]:
    """The TF-IDF model whose C scores best on `holdout` (mean of F1@1, F1@3, MAP@5), refitted on
    nothing else; returns it and every C's held-out score."""
    tried: dict[float, float] = {}
    best: TfidfLinear | None = None
    for c in cs:
        model = TfidfLinear(c, inputs).fit(train)
        tried[c] = metric.headline(score_rows(holdout, model.predict(holdout)))
        if best is None or tried[c] > tried[best.c]:
            best = model
    assert best is not None
    return best, tried
