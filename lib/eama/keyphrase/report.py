"""Scoring keyphrase predictions with the papers' metric (eama.keyphrase.metric): an
extract_keyphrases output, or plain files (one `kp1;kp2;...` line per post beside a source file of
either import layout), written as report.json + report.md + report.png."""

from __future__ import annotations

import dataclasses
from typing import Any

from eama.engine import reports, schema, storage
from eama.keyphrase import corpus, metric


@dataclasses.dataclass
class ScoreConfig:
    input: str = ""  # extract_keyphrases output (directory, file or glob), local or s3://
    predictions: str = ""  # instead of --input: a text file of `kp1;kp2;...` lines, ranked, one per post
    source: str = ""  # with --predictions: the posts and gold keyphrases (post<sep>keyphrases<sep>... lines)
    output: str = ""  # report directory, local or s3://


def read_output(path: str) -> tuple[list[str], list[list[str]], list[list[str]], int]:
    """(posts, gold, predicted) of an extract_keyphrases output and how many rows had no gold."""
    posts, gold, predicted, unlabelled = [], [], [], 0
    files = storage.list_files(path)
    if not files:
        raise SystemExit(f"no Parquet files under {path}")
    for f in files:
        schema.check_schema(storage.read_schema(f), schema.KEYPHRASE_OUTPUT, f,
                            ("sample_id", "post", "predicted_keyphrases"))
        names = storage.read_schema(f).names
        for row in storage.read_table(f, [c for c in ("post", "keyphrases", "predicted_keyphrases")
                                          if c in names]).to_pylist():
            if not row.get("keyphrases"):
                unlabelled += 1
                continue
            posts.append(row["post"])
            gold.append(row["keyphrases"])
            predicted.append(row["predicted_keyphrases"] or [])
    return posts, gold, predicted, unlabelled


def read_files(predictions: str, source: str) -> tuple[list[str], list[list[str]], list[list[str]], int]:
    """Aligned posts, gold and predictions of plain files (line i of each is post i)."""
    src = [line for _, line in corpus_lines(source)]
    pred = [line for _, line in corpus_lines(predictions)]
    if len(src) != len(pred):
        raise SystemExit(f"{predictions} has {len(pred)} lines, {source} has {len(src)}: they must align")
    posts, gold, predicted = [], [], []
    for i, (s, p) in enumerate(zip(src, pred), start=1):
        try:
            row = corpus.parse_line(s)
        except ValueError as exc:
            raise SystemExit(f"{source}:{i}: {exc}") from None
        posts.append(row["post"])
        gold.append(row["keyphrases"] or [])
        predicted.append(metric.split_phrases(p))
    return posts, gold, predicted, 0


def corpus_lines(path: str) -> list[tuple[int, str]]:
    from eama.engine import importing

    lines = list(importing.decoded_lines(path))
    while lines and not (lines[-1][1] or "").strip():
        lines.pop()  # the final newline
    for lineno, text in lines:
        if text is None:
            raise SystemExit(f"{path}:{lineno}: not valid UTF-8")
    return [(n, t or "") for n, t in lines]


def score_output(cfg: ScoreConfig) -> dict[str, Any]:
    if cfg.predictions or cfg.source:
        if not (cfg.predictions and cfg.source):
            raise SystemExit("--predictions and --source go together")
        posts, gold, predicted, unlabelled = read_files(cfg.predictions, cfg.source)
        what = cfg.predictions
    else:
        posts, gold, predicted, unlabelled = read_output(cfg.input)
        what = cfg.input
    if not posts:
        raise SystemExit(f"{what}: no row has gold keyphrases to score against")
    report = metric.score(posts, gold, predicted)
    report.update(input=what, unlabelled_rows=unlabelled,
                  convention="CMKP / MM-MKP: lowercase, Porter stems, exact match; P@k over min(k, #predictions), "
                             "R@k over #targets, F1@k from macro P and R; AP@k over #targets")
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Keyphrase scores of {report['posts']} posts (x100)", "",
             "| keyphrases | posts | F1@1 | F1@3 | F1@5 | MAP@5 | P@1 | R@3 |", "|---|---|---|---|---|---|---|---|"]
    for scope in metric.SCOPES:
        s = report[scope]
        lines.append(f"| {scope} | {s['posts']} | {100 * s['F1@1']:.2f} | {100 * s['F1@3']:.2f} | "
                     f"{100 * s['F1@5']:.2f} | {100 * s['MAP@5']:.2f} | {100 * s['P@1']:.2f} | {100 * s['R@3']:.2f} |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], output: str) -> str:
    items = [(f"{scope} {m}", report[scope][m]) for scope in metric.SCOPES for m in ("F1@1", "F1@3", "MAP@5")]
    png = reports.bar_chart_png(items, f"keyphrases, {report['posts']} posts")
    return reports.write_report(report, markdown(report), png, output)
