"""What a batch job prints when it ends: the run, its input, what it wrote, every distinct error
reason (the first few, with counts, an example row and where all of them are), the output's totals
and each stage's throughput. One summary for every system's jobs."""

from __future__ import annotations

import collections
import json
import re
from typing import Any

from eama.engine import ledger, storage


MAX_REASONS = 10  # distinct error reasons printed on the console (the error files hold them all)
_VOLATILE = [(re.compile(r"0x[0-9a-fA-F]+"), "0x..."), (re.compile(r"sample_id '[^']*'"), "sample_id '...'")]


def _reason_key(stage: str, reason: str) -> tuple[str, str]:
    for pattern, repl in _VOLATILE:
        reason = pattern.sub(repl, reason)
    return stage, reason


def run_error_reasons(output: str, run_id: str, threads: int = 16) -> list[dict[str, Any]]:
    """The distinct (stage, reason) of the error rows run `run_id` committed to `output`, most
    frequent first: [{stage, reason, count, example}]. Reads only that run's error files (the
    ledger names them); object addresses and quoted sample ids are folded so alike rows group."""
    led = ledger.Ledger.load(output)
    files = [storage.join(output, ledger.ERRORS_DIR, f"{r.name}.parquet")
             for r in led.records.values() if r.run_id == run_id and r.error_rows]
    files = [f for f in files if storage.exists(f)]
    tables = storage.parallel_map(
        lambda f: storage.read_table(f, columns=["sample_id", "source_file", "row_group", "row", "stage", "reason"]),
        files, threads)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    examples: dict[tuple[str, str], str] = {}
    for table in tables:
        for row in table.to_pylist():
            key = _reason_key(row["stage"], row["reason"])
            counts[key] += 1
            if key not in examples:
                where = (f"file {row['source_file']}" if row["row_group"] == ledger.FILE_ROW_GROUP
                         else f"row {row['row']} of row group {row['row_group']} in {row['source_file']}")
                examples[key] = (f"sample {row['sample_id']!r}, " if row["sample_id"] else "") + where
    return [{"stage": s, "reason": r, "count": n, "example": examples[(s, r)]} for (s, r), n in counts.most_common()]


def error_report(output: str, run_id: str, errors: int, summary: list[dict[str, Any]] | None = None,
                 limit: int = MAX_REASONS, width: int = 300) -> list[str]:
    """Console lines naming each distinct reason of run `run_id`'s error rows in `output` (the first
    `limit`, with counts and an example row) and where the full list is; [] when `errors` is 0.
    `summary` is the runner manifest's this_run.error_summary where it has one; without it this
    run's error files are read."""
    if not errors:
        return []
    reasons = summary
    if reasons is None:
        try:
            reasons = run_error_reasons(output, run_id)
        except Exception as exc:  # the report must not fail a run that committed its rows
            return [f"{errors} error rows; could not read their reasons ({exc}); "
                    f"see {storage.join(output, ledger.ERRORS_DIR)}"]
    shown = f", the first {limit}" if len(reasons) > limit else ""
    lines = [f"errors of this run by reason ({len(reasons)} distinct{shown}):"]
    for item in reasons[:limit]:
        reason = item["reason"] if len(item["reason"]) <= width else item["reason"][: width - 3] + "..."
        lines.append(f"  {item['count']:>6} x {item['stage']}: {reason}  [e.g. {item['example']}]")
    if len(reasons) > limit:
        lines.append(f"  ... and {len(reasons) - limit} more distinct reasons")
    lines.append(f"every error row: {storage.join(output, ledger.ERRORS_DIR)} (Parquet: sample_id, source_file, "
                 f"row_group, row, stage, reason, retryable, run_id; this run's run_id is {run_id})")
    return lines


def manifest_error_report(manifest: dict[str, Any], limit: int = MAX_REASONS) -> list[str]:
    """error_report for a runner manifest (what runner.run returns)."""
    this = manifest.get("this_run", {})
    return error_report(manifest["config"]["output"], manifest["run_id"], this.get("errors", 0),
                        this.get("error_summary"), limit)


def summary_lines(m: dict[str, Any], title: str, done: str = "written") -> list[str]:
    """The end-of-run summary of a runner manifest; `title` follows the run id (model, mode, ...)
    and `done` names what happened to the written rows ('captioned', 'tagged')."""
    this = m["this_run"]
    counts = f" {json.dumps(this['counts'])}" if this.get("counts") else ""
    lines = [f"\nrun {m['run_id']}  {title}  {m['wall_seconds']} s",
             f"input: {m['input']['rows']} rows in {m['input']['files']} files "
             f"({m['input']['files_done_before']} already done, {m['input']['unusable_files']} unusable)",
             f"this run: {this['written']} {done}, {this['errors']} errors ({this['retryable_errors']} retryable) "
             f"{json.dumps(this['errors_by_stage'])}{counts}"]
    unusable = this["error_reasons"]
    lines += [f"  unusable: {reason}" for reason in unusable[:MAX_REASONS]]
    if len(unusable) > MAX_REASONS:
        lines.append(f"  ... and {len(unusable) - MAX_REASONS} more unusable files (all in the manifest)")
    lines += manifest_error_report(m)
    lines.append(f"output now holds {m['output_total']['rows']} rows + {m['output_total']['error_rows']} error rows")
    lines.append("\n| stage | rows/s (per actor, busy time) |\n|---|---|")
    lines += [f"| {stage} | {'-' if v is None else f'{v:.2f}'} |" for stage, v in m["throughput_rows_per_s"].items()]
    return lines
