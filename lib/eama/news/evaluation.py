"""Scoring captions the way the news-captioning literature does: read a caption output, pick the
scorable rows, compute pycocoevalcap metrics and pooled entity P/R, render report.json/.md/.png."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa

from eama.engine import reports, storage
from eama.news import generations, metrics
from eama.engine.config import ConfigError, to_dict
from eama.engine.entities import DEFAULT_SPACY_MODEL
from eama.engine.schema import SchemaError

log = logging.getLogger("eama.evaluate")

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
REPORT_FILES = ("report.json", "report.md", "report.png")
PREPROCESSING = (
    "Transform-and-Tell's: characters that are neither word characters nor whitespace removed "
    "(re [^\\w\\s]), case kept, no PTB tokenizer, whitespace collapsed; BLEU with 'closest' "
    "reference length; CIDEr is pycocoevalcap's Cider (CIDEr-D, idf from the scored references)"
)
ENTITY_RULE = (
    "spaCy entity mentions (lists, duplicates kept) of reference and generation; a mention matches "
    "when the same sample's other side has the exact, case-sensitive same (text, label); counts "
    "pooled over the set: precision = matched generated / generated, recall = matched reference / "
    "reference; rare = reference (or generated) mentions whose text is not among training-caption "
    "entity texts"
)
SCALE = (
    "report.json 'metrics' and 'entities' hold raw values: fractions in [0, 1], CIDEr on its own "
    "scale; 'metrics_x100', report.md and report.png show every score x100, as the "
    "Transform-and-Tell papers report them"
)


@dataclass
class EvaluateConfig:
    input: str = ""
    output: str = ""
    input_format: str = "auto"  # auto | parquet | jsonl (auto: .jsonl/.json/.ndjson are JSONL)
    id_column: str = "sample_id"
    reference_column: str = "caption"
    generated_column: str = "generated_caption"
    # Stored entities, used only with use_stored_entities (a missing column falls back to spaCy).
    reference_entities_column: str = "reference_entities"
    generated_entities_column: str = "caption_entities"
    use_stored_entities: bool = False
    train_captions: str = ""  # Parquet / JSONL of training captions: enables rare-entity scores
    train_caption_column: str = "caption"
    spacy_model: str = DEFAULT_SPACY_MODEL
    ray_min_rows: int = 200  # more rows than this: spaCy runs on a Ray Data actor pool
    ray_pool_size: int = 1
    ray_num_cpus: float = 0.5
    ray_batch_size: int = 256
    meteor: bool = True
    meteor_timeout_s: float = 600.0
    max_skipped_examples: int = 20


def validate(cfg: EvaluateConfig) -> EvaluateConfig:
    if not cfg.input or not cfg.output:
        raise ConfigError("--input and --output are required")
    if cfg.input_format not in ("auto", "parquet", "jsonl"):
        raise ConfigError(f"input_format: expected auto, parquet or jsonl, got {cfg.input_format!r}")
    return cfg


# ---------------------------------------------------------------- reading


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.lower().endswith(JSON_SUFFIXES) else "parquet"


def _read_parquet(path: str, columns: Sequence[str]) -> pa.Table:
    files = storage.list_files(path, ".parquet")
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    tables = []
    for f in files:
        names = storage.read_schema(f).names
        tables.append(storage.read_table(f, columns=[c for c in columns if c in names]))
    return pa.concat_tables(tables, promote_options="default")


def read_rows(path: str, fmt: str, columns: Sequence[str], required: Sequence[str]) -> pa.Table:
    """The wanted `columns` that exist in `path` (Parquet or JSONL); `required` ones must exist."""
    if _format(path, fmt) == "jsonl":
        table = generations.read_generations(path)
        table = table.select([c for c in columns if c in table.column_names])
    else:
        table = _read_parquet(path, columns)
    for name in required:
        if name not in table.column_names:
            raise SchemaError(f"{path}: missing column '{name}' (has: {', '.join(table.column_names)})")
    return table


def _texts(table: pa.Table, column: str) -> list[str | None]:
    return table.column(column).to_pylist()


def _entities(table: pa.Table, column: str, rows: Sequence[int]) -> list[list[dict]]:
    values = table.column(column).to_pylist()
    return [values[i] or [] for i in rows]


# ---------------------------------------------------------------- rows, entities


def skip_reason(reference: str | None, generated: str | None) -> str | None:
    """Why a row cannot be scored, or None."""
    if reference is None or not reference.strip():
        return "empty_reference"
    if generated is None or not generated.strip():
        return "empty_generation"
    if not metrics.preprocess(reference):
        return "reference_without_words"
    return None


def select_rows(table: pa.Table, cfg: EvaluateConfig) -> tuple[list[int], dict[str, Any]]:
    """Indices of the scorable rows, and the skipped rows' counts by reason with a few examples."""
    refs, gens = _texts(table, cfg.reference_column), _texts(table, cfg.generated_column)
    ids = _texts(table, cfg.id_column) if cfg.id_column in table.column_names else [f"row-{i}" for i in range(len(refs))]
    kept, reasons, examples = [], Counter(), []
    for i, (ref, gen) in enumerate(zip(refs, gens)):
        reason = skip_reason(ref, gen)
        if reason is None:
            kept.append(i)
            continue
        reasons[reason] += 1
        if len(examples) < cfg.max_skipped_examples:
            examples.append({"sample_id": ids[i], "reason": reason})
    return kept, {"total": len(refs), "scored": len(kept), "skipped": len(refs) - len(kept),
                  "skipped_by_reason": dict(reasons), "skipped_examples": examples}


def _tag(cfg: EvaluateConfig, texts: dict[str, list[str]]) -> dict[str, list[list[dict]]]:
    n = max(len(v) for v in texts.values())
    use_ray = n > cfg.ray_min_rows
    log.info("spaCy entities of %d rows x %d columns %s", n, len(texts), "on Ray Data" if use_ray else "in-process")
    return metrics.tag_entities(
        texts, cfg.spacy_model, use_ray=use_ray, batch_size=cfg.ray_batch_size,
        pool_size=cfg.ray_pool_size, num_cpus=cfg.ray_num_cpus,
    )


def _stored_column(table: pa.Table, cfg: EvaluateConfig, column: str) -> str | None:
    if not cfg.use_stored_entities:
        return None
    if column and column in table.column_names:
        return column
    log.warning("use_stored_entities: column '%s' absent, running spaCy instead", column)
    return None


def row_entities(table: pa.Table, rows: list[int], cfg: EvaluateConfig) -> tuple[dict[str, list], dict[str, str]]:
    """Entities of the scored rows' references and generations: stored or spaCy; and their sources."""
    sides = {"reference": (cfg.reference_column, cfg.reference_entities_column),
             "generated": (cfg.generated_column, cfg.generated_entities_column)}
    entities, sources, to_tag = {}, {}, {}
    for side, (text_col, ent_col) in sides.items():
        stored = _stored_column(table, cfg, ent_col)
        if stored:
            entities[side], sources[side] = _entities(table, stored, rows), f"stored column '{stored}'"
        else:
            texts = _texts(table, text_col)
            to_tag[side], sources[side] = [texts[i] for i in rows], f"spaCy {cfg.spacy_model}"
    if to_tag:
        entities.update(_tag(cfg, to_tag))
    return entities, sources


def known_entity_texts(cfg: EvaluateConfig) -> tuple[set[str], dict[str, Any]]:
    """Entity texts of the training captions (for rare-entity scores), with a summary."""
    col, ent_col = cfg.train_caption_column, cfg.reference_entities_column
    table = read_rows(cfg.train_captions, "auto", [col, ent_col], [col])
    stored = _stored_column(table, cfg, ent_col)
    rows = [i for i, t in enumerate(_texts(table, col)) if t and t.strip()]
    if stored:
        ents, source = _entities(table, stored, rows), f"stored column '{stored}'"
    else:
        texts = _texts(table, col)
        ents, source = _tag(cfg, {"train": [texts[i] for i in rows]})["train"], f"spaCy {cfg.spacy_model}"
    known = {e["text"] for mentions in ents for e in mentions}
    return known, {"path": cfg.train_captions, "captions": len(rows), "entity_texts": len(known), "entity_source": source}


# ---------------------------------------------------------------- evaluation


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Read, score and return the report (raw values)."""
    columns = [cfg.id_column, cfg.reference_column, cfg.generated_column,
               cfg.reference_entities_column, cfg.generated_entities_column]
    table = read_rows(cfg.input, cfg.input_format, columns, [cfg.reference_column, cfg.generated_column])
    rows, row_summary = select_rows(table, cfg)
    log.info("scoring %d of %d rows", len(rows), table.num_rows)
    refs, gens = _texts(table, cfg.reference_column), _texts(table, cfg.generated_column)
    # a model that writes one caption for every image scores n-grams of a shared template, not its inputs
    row_summary["distinct_generations"] = len({" ".join(gens[i].split()) for i in rows})
    scores, unavailable = metrics.caption_scores(
        [refs[i] for i in rows], [gens[i] for i in rows], cfg.meteor, cfg.meteor_timeout_s
    )
    entities, sources = row_entities(table, rows, cfg)
    known, train = known_entity_texts(cfg) if cfg.train_captions else (None, None)
    counts = metrics.pooled_entity_counts(entities["reference"], entities["generated"], known)
    return {
        "input": cfg.input,
        "rows": row_summary,
        "scale": SCALE,
        "preprocessing": PREPROCESSING,
        "metrics": scores,
        "metrics_x100": {k: None if v is None else 100 * v for k, v in scores.items()},
        "unavailable": unavailable,
        "entities": {"rule": ENTITY_RULE, "source": sources, "train_captions": train,
                     **metrics.entity_summary(counts)},
        "config": to_dict(cfg),
    }


# ---------------------------------------------------------------- rendering


def pct(value: float | None) -> str:
    """A raw score x100 with two decimals, as the reports show it; n/a for None."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """(name, raw value, detail) of every headline number, in table order."""
    out = [(k, v, report["unavailable"].get(k, "")) for k, v in report["metrics"].items()]
    ent = report["entities"]
    for prefix, block in (("Entity", ent["all"]), ("Rare entity", ent["rare"])):
        if block is None:
            continue
        out += [
            (f"{prefix} precision", block["precision"], f"{block['generated_matched']}/{block['generated']}"),
            (f"{prefix} recall", block["recall"], f"{block['reference_matched']}/{block['reference']}"),
            (f"{prefix} F1", block["f1"], ""),
        ]
    return out


def markdown_report(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        f"## Caption evaluation: `{report['input']}`",
        "",
        f"Scored {rows['scored']} of {rows['total']} rows; skipped {rows['skipped']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in rows['skipped_by_reason'].items())})" if rows["skipped"] else "")
        + f"; {rows['distinct_generations']} distinct generations"
        + ". Scores x100 (report.json holds the raw values).",
        "",
        "| Metric | Score x100 | Detail |",
        "|---|---:|---|",
        *(f"| {name} | {pct(value)} | {detail} |" for name, value, detail in summary_rows(report)),
        "",
        f"Entities: reference from {report['entities']['source']['reference']}, "
        f"generated from {report['entities']['source']['generated']}.",
        "",
        "| Label | Precision | Recall | F1 | Generated matched/total | Reference matched/total |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, b in report["entities"]["by_label"].items():
        lines.append(f"| {label} | {pct(b['precision'])} | {pct(b['recall'])} | {pct(b['f1'])} | "
                     f"{b['generated_matched']}/{b['generated']} | {b['reference_matched']}/{b['reference']} |")
    return "\n".join(lines) + "\n"


def chart_png(report: dict[str, Any]) -> bytes:
    """A bar chart of the headline scores (x100); unavailable ones are marked n/a."""
    items = [(n, v) for n, v, _ in summary_rows(report) if n not in ("BLEU-1", "BLEU-2", "BLEU-3")]
    return reports.bar_chart_png(items, f"{report['rows']['scored']} captions scored")


def write_report(report: dict[str, Any], output: str) -> str:
    """Write report.json / .md / .png under `output`; returns the markdown."""
    return reports.write_report(report, markdown_report(report), chart_png(report), output)
