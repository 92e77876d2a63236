"""image_views: fill the image-text views (caption, OCR, ImageNet tags) of MNER Parquet rows, exactly once.

    python jobs/image_views.py --input MNER_PARQUET --output OUT [--views caption,ocr,tags] [--model ID_OR_PATH]
                               [--overwrite] [--retry-errors] [--config FILE.yaml] [key=value ...]

The caption view needs --model (a hub id, local path or s3:// URI of an image-text-to-text model);
`--views ocr,tags` runs without one. object_tags are ImageNet-1k classifier labels, not VinVL region
tags. Works the same under `ray job submit --working-dir . -- python jobs/image_views.py ...`.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from eama.engine import config, console
from eama.mner.views import ImageViewsConfig, run

FLAGS = [
    config.Flag("--input", "input", "MNER Parquet rows (schema.MNER_SAMPLE): file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "output directory, local or s3://"),
    config.Flag("--views", "views", "comma-separated views to fill: caption, ocr, tags (default all three)"),
    config.Flag("--model", "model", "hub id, local path or s3:// URI of the captioning model (caption view)"),
    config.Flag("--overwrite", "overwrite", "discard committed output and redo everything", switch=True),
    config.Flag("--retry-errors", "retry_errors", "also redo committed permanent error rows", switch=True),
]


def print_summary(m: dict) -> None:
    print("\n".join(console.summary_lines(m, f"views {','.join(m['views'])}  views_model {m['views_model']}")))


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.parse_args(ImageViewsConfig, __doc__.splitlines()[0], FLAGS, argv)
    manifest = run(cfg)
    print_summary(manifest)
    return manifest


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
