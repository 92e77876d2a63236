"""caption_corpus: EAMA captioning of Parquet sample shards on Ray Data, exactly once.

    python jobs/caption_corpus.py [--input PATH] [--output PATH] [--model ID_OR_PATH] [--mode eama|plain]
                                  [--overwrite] [--config FILE.yaml] [key=value ...]

With no arguments it captions the demo corpus with a tiny LLaVA. Works the same under
`ray job submit --working-dir . -- python jobs/caption_corpus.py ...` (give absolute or s3:// paths
there: relative ones resolve inside the uploaded working directory). A mistake in the settings or
a missing input ends in one line `error: ...` before Ray starts (exit status 2 for settings, 1 for
the rest); a second run on an output another run holds exits 3, naming the holder.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from eama.engine import config
from eama.news.caption_job import CaptionCorpusConfig, run, summary

FLAGS = [
    config.Flag("--input", "input", "Parquet shards: file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "output directory, local or s3://"),
    config.Flag("--model", "model", "preset, hub id, local path or s3:// URI of an image-text-to-text model"),
    config.Flag("--mode", "mode", "eama (self-supplemented, default) or plain (the 'Base' ablation)"),
    config.Flag("--overwrite", "overwrite", "discard committed output and redo everything", switch=True),
    config.Flag("--retry-errors", "retry_errors", "also redo committed permanent error rows", switch=True),
]


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.parse_args(CaptionCorpusConfig, __doc__.splitlines()[0], FLAGS, argv)
    manifest = run(cfg)
    print(summary(manifest))
    return manifest


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
