"""evaluate_mner: entity-level P / R / F1 (micro and per type) of a tag_entities output against its gold tags.

    python jobs/evaluate_mner.py --input TAGGED --output REPORT_DIR

Spans follow conlleval's lenient reading (seqeval's default mode): I-X after O or after another
type starts a new span. Writes report.json, report.md and report.png and prints the table.
"""

from __future__ import annotations

import sys
from typing import Sequence

from eama.engine import config
from eama.mner import report

FLAGS = [
    config.Flag("--input", "input", "tag_entities output (Parquet directory, file or glob), local or s3://"),
    config.Flag("--output", "output", "report directory, local or s3://"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = config.parse_args(report.ScoreConfig, __doc__.splitlines()[0], FLAGS, argv)
    if not cfg.input or not cfg.output:
        raise config.ConfigError("--input and --output are required")
    scores = report.score_output(cfg)
    print(report.write(scores, cfg.output))
    return scores


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
