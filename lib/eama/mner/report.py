"""Scoring a tag_entities output: entity-level micro P / R / F1 and per-type P / R / F1 (ITA's
Table 4 layout), written as report.json + report.md + report.png."""

from __future__ import annotations

import dataclasses
from typing import Any

from eama.engine import reports, schema, storage
from eama.mner import spans


@dataclasses.dataclass
class ScoreConfig:
    input: str = ""  # tag_entities output (directory, file or glob), local or s3://
    output: str = ""  # report directory, local or s3://


def read_tagged(path: str) -> tuple[list[list[str]], list[list[str]], int]:
    """(gold, predicted) tag sequences of a tag_entities output and how many rows had no gold tags."""
    gold, predicted, unlabelled = [], [], 0
    files = storage.list_files(path)
    if not files:
        raise SystemExit(f"no Parquet files under {path}")
    for f in files:
        schema.check_schema(storage.read_schema(f), schema.MNER_OUTPUT, f, ("sample_id", "predicted_tags"))
        table = storage.read_table(f, [c for c in ("tags", "predicted_tags") if c in storage.read_schema(f).names])
        for row in table.to_pylist():
            if row.get("tags") is None:
                unlabelled += 1
                continue
            gold.append(row["tags"])
            predicted.append(row["predicted_tags"])
    return gold, predicted, unlabelled


def score_output(cfg: ScoreConfig) -> dict[str, Any]:
    gold, predicted, unlabelled = read_tagged(cfg.input)
    if not gold:
        raise SystemExit(f"{cfg.input}: no row has gold tags to score against")
    report = spans.score(gold, predicted)
    report.update(input=cfg.input, unlabelled_rows=unlabelled,
                  convention="seqeval default mode (conlleval): I-X after O or another type starts a span")
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Entity-level scores of {report['posts']} posts ({report['gold_spans']} gold spans, "
             f"{report['predicted_spans']} predicted)", "",
             "| | P | R | F1 | gold spans |", "|---|---|---|---|---|",
             f"| all (micro) | {100 * report['precision']:.2f} | {100 * report['recall']:.2f} | "
             f"{100 * report['f1']:.2f} | {report['gold_spans']} |"]
    for kind, s in sorted(report["per_type"].items()):
        lines.append(f"| {kind} | {100 * s['precision']:.2f} | {100 * s['recall']:.2f} | {100 * s['f1']:.2f} | "
                     f"{s['support']} |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], output: str) -> str:
    items = [("micro F1", report["f1"])] + [(f"{k} F1", v["f1"]) for k, v in sorted(report["per_type"].items())]
    png = reports.bar_chart_png(items, f"entity F1, {report['posts']} posts")
    return reports.write_report(report, markdown(report), png, output)
