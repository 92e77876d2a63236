"""evaluate_keyphrases: F1@k, MAP@k (all / present / absent keyphrases) of predicted keyphrases, as CMKP and MM-MKP compute them.

    python jobs/evaluate_keyphrases.py --input EXTRACTED --output REPORT_DIR
    python jobs/evaluate_keyphrases.py --predictions PRED.txt --source test_src.txt --output REPORT_DIR

Lowercase, Porter stems, predictions deduplicated after stemming, exact match of whole phrases;
P@k over min(k, #predictions), R@k over #targets, F1@k from the macro P and R; AP@k over #targets.
Writes report.json, report.md and report.png and prints the table.
"""

from __future__ import annotations

import sys
from typing import Sequence

from eama.engine import config
from eama.keyphrase import report

FLAGS = [
    config.Flag("--input", "input", "extract_keyphrases output (Parquet directory, file or glob), local or s3://"),
    config.Flag("--predictions", "predictions", "instead of --input: `kp1;kp2;...` lines, one per post"),
    config.Flag("--source", "source", "with --predictions: the post<sep>keyphrases<sep>... file they align with"),
    config.Flag("--output", "output", "report directory, local or s3://"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = config.parse_args(report.ScoreConfig, __doc__.splitlines()[0], FLAGS, argv)
    if not (cfg.input or cfg.predictions) or not cfg.output:
        raise config.ConfigError("--output and either --input or --predictions with --source are required")
    scores = report.score_output(cfg)
    print(report.write(scores, cfg.output))
    return scores


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
