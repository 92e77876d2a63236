"""extract_keyphrases: predict ranked keyphrases for keyphrase Parquet posts with a trained model, exactly once, on Ray Data.

    python jobs/extract_keyphrases.py --model RUNS/NAME/export --input PARQUET --output OUT
        [--mode model|joint|classify|generate] [--overwrite] [--config FILE.yaml] [key=value ...]

Output rows keep sample_id, the post and the gold keyphrases when the input has them, and add
predicted_keyphrases (ranked, best first) and predicted_scores. A re-run decodes only what is not
committed yet. Score the output with jobs/evaluate_keyphrases.py.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from eama.engine import config, console
from eama.keyphrase.extraction import ExtractConfig, run

FLAGS = [
    config.Flag("--model", "model", "a train_keyphrase export folder, local or s3://"),
    config.Flag("--input", "input", "keyphrase Parquet rows: file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "output directory, local or s3://"),
    config.Flag("--mode", "mode", "model (as trained) | joint | classify | generate"),
    config.Flag("--overwrite", "overwrite", "discard committed output and redo everything", switch=True),
]


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.parse_args(ExtractConfig, __doc__.splitlines()[0], FLAGS, argv)
    manifest = run(cfg)
    print("\n".join(console.summary_lines(manifest, f"model {manifest['model']}  mode {manifest['mode']}",
                                          "decoded")))
    return manifest


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
