"""tag_entities: tag named entities in MNER Parquet posts with a trained tagger, exactly once, on Ray Data.

    python jobs/tag_entities.py --model RUNS/NAME/export --input PARQUET --output OUT
        [--view model|text|caption|ocr|tags|all|visual] [--overwrite] [--config FILE.yaml] [key=value ...]

Views: an ITA tagger reads the post alone (text) or with an image-text view (caption, ocr, tags,
all); a BGA-MNER tagger reads the post alone (text, the paper's inference) or with each row's real
image or caption (visual). `model` is the view the tagger was trained with.

Output rows keep sample_id, tokens and the gold tags when the input has them, and add predicted_tags
(one BIO tag per token) and entities (text, label, token start / end exclusive). A re-run tags only
what is not committed yet. Score the output with jobs/evaluate_mner.py.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from eama.engine import config, console
from eama.mner.tagging import TagConfig, run

FLAGS = [
    config.Flag("--model", "model", "a train_mner export folder, local or s3://"),
    config.Flag("--input", "input", "MNER Parquet rows: file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "output directory, local or s3://"),
    config.Flag("--view", "view", "model (the view it was trained with) | text | caption | ocr | tags | all (ITA) | visual (BGA)"),
    config.Flag("--overwrite", "overwrite", "discard committed output and redo everything", switch=True),
]


def print_summary(m: dict) -> None:
    print("\n".join(console.summary_lines(m, f"model {m['model']}  view {m['view']}", "tagged")))


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.parse_args(TagConfig, __doc__.splitlines()[0], FLAGS, argv)
    manifest = run(cfg)
    print_summary(manifest)
    return manifest


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
