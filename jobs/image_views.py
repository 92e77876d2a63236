"""image_views: fill the image-text views (caption, OCR, ImageNet tags) of MNER Parquet rows, exactly once.

    python jobs/image_views.py --input MNER_PARQUET --output OUT [--views caption,ocr,tags] [--model ID_OR_PATH]
                               [--overwrite] [--retry-errors] [--config FILE.yaml] [key=value ...]

The caption view needs --model (a hub id, local path or s3:// URI of an image-text-to-text model);
`--views ocr,tags` runs without one. object_tags are ImageNet-1k classifier labels, not VinVL region
tags. Works the same under `ray job submit --working-dir . -- python jobs/image_views.py ...`.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

from eama.engine import config, ledger, storage
from eama.mner.views import ImageViewsConfig, run

FLAGS = [
    config.Flag("--input", "input", "MNER Parquet rows (schema.MNER_SAMPLE): file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "output directory, local or s3://"),
    config.Flag("--views", "views", "comma-separated views to fill: caption, ocr, tags (default all three)"),
    config.Flag("--model", "model", "hub id, local path or s3:// URI of the captioning model (caption view)"),
    config.Flag("--overwrite", "overwrite", "discard committed output and redo everything", switch=True),
    config.Flag("--retry-errors", "retry_errors", "also redo committed permanent error rows", switch=True),
]


def error_reasons(output: str, run_id: str, limit: int = 20) -> list[str]:
    """'stage: sample_id: reason' for the error rows this run committed (at most `limit`)."""
    folder = storage.join(output, ledger.ERRORS_DIR)
    out: list[str] = []
    for path in storage.list_files(folder) if storage.exists(folder) else []:
        for e in storage.read_table(path, columns=["sample_id", "stage", "reason", "run_id"]).to_pylist():
            if e["run_id"] == run_id and len(out) < limit:
                out.append(f"{e['stage']}: {e['sample_id']}: {e['reason']}")
    return out


def print_summary(m: dict) -> None:
    run_ = m["this_run"]
    print(f"\nrun {m['run_id']}  views {','.join(m['views'])}  {m['wall_seconds']} s\nviews_model {m['views_model']}")
    print(f"input: {m['input']['rows']} rows in {m['input']['files']} files "
          f"({m['input']['files_done_before']} already done, {m['input']['unusable_files']} unusable)")
    print(f"this run: {run_['written']} rows written, {run_['errors']} errors "
          f"({run_['retryable_errors']} retryable) {json.dumps(run_['errors_by_stage'])} {json.dumps(run_['counts'])}")
    for reason in error_reasons(m["config"]["output"], m["run_id"]):
        print(f"  error {reason}")
    print(f"output now holds {m['output_total']['rows']} rows + {m['output_total']['error_rows']} error rows")
    print("\n| stage | rows/s (busy time) |\n|---|---|")
    for stage, value in m["throughput_rows_per_s"].items():
        print(f"| {stage} | {'-' if value is None else f'{value:.2f}'} |")


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.parse_args(ImageViewsConfig, __doc__.splitlines()[0], FLAGS, argv)
    manifest = run(cfg)
    print_summary(manifest)
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
