"""Score generated captions: BLEU-4, METEOR, ROUGE-L, CIDEr and named-entity precision / recall.

    python jobs/evaluate.py --input CAPTIONED --output REPORT_DIR \
        [--train-captions PATH] [--use-stored-entities] [key=value ...]

CAPTIONED is caption_corpus output (a Parquet file or a directory of them, local or s3://) or a
JSONL / Transform-and-Tell generations file. Writes report.json (raw scores), report.md and
report.png (scores x100) into REPORT_DIR and prints the table. A mistake in the settings or an
unreadable input ends in one line `error: ...` (exit status 2 for settings, 1 for the rest). See
the README's evaluate section.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from eama.engine import config
from eama.engine.config import Flag, parse_args
from eama.news.evaluation import REPORT_FILES, EvaluateConfig, evaluate, validate, write_report  # noqa: F401

FLAGS = [
    Flag("--input", "input", "caption output: Parquet file/dir or JSONL (local or s3://)"),
    Flag("--output", "output", "report directory (local or s3://)"),
    Flag("--train-captions", "train_captions", "training captions (Parquet/JSONL) for rare-entity recall"),
    Flag("--use-stored-entities", "use_stored_entities", "score stored entities instead of running spaCy", switch=True),
]


def _shutdown_ray_if_started(was_up: bool) -> None:
    ray = sys.modules.get("ray")
    if not was_up and ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = validate(parse_args(EvaluateConfig, __doc__.splitlines()[0], FLAGS, argv))
    ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        report = evaluate(cfg)
    except (FileNotFoundError, ValueError) as exc:  # SchemaError and bad JSON are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return config.FAILURE_EXIT
    finally:
        _shutdown_ray_if_started(ray_up)
    print(write_report(report, cfg.output))
    return 0


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
