"""import_corpus: GoodNews-style JSON + image folder, or JSONL, into Parquet sample shards.

    python jobs/import_corpus.py --format goodnews --source caption.json --images IMAGE_DIR --output OUT
    python jobs/import_corpus.py --format jsonl --source samples.jsonl --output s3://bucket/corpus
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

from eama.engine import config
from eama.news import importers


@dataclasses.dataclass
class ImportConfig:
    format: str = "goodnews"  # goodnews | jsonl
    source: str = ""  # caption.json (goodnews) or a .jsonl file, local or s3://
    images: str = ""  # goodnews: folder of {article_id}_{index}.jpg; jsonl: root of relative image paths
    output: str = "demo_out/imported"
    shard_size: int = 256


FLAGS = [
    config.Flag("--format", "format", "goodnews or jsonl"),
    config.Flag("--source", "source", "caption.json or .jsonl file"),
    config.Flag("--images", "images", "image folder (goodnews) or root for relative paths (jsonl)"),
    config.Flag("--output", "output", "output directory for Parquet shards, local or s3://"),
    config.Flag("--shard-size", "shard_size", "samples per shard"),
]


def run(cfg: ImportConfig) -> dict[str, int]:
    if not cfg.source:
        raise config.ConfigError("--source is required")
    if cfg.format == "goodnews":
        if not cfg.images:
            raise config.ConfigError("--images is required for --format goodnews")
        items = importers.goodnews_samples(cfg.source, cfg.images)
    elif cfg.format == "jsonl":
        items = importers.jsonl_samples(cfg.source, cfg.images or None)
    else:
        raise config.ConfigError(f"format must be goodnews or jsonl, got {cfg.format!r}")
    return importers.write_shards(items, cfg.output, cfg.shard_size)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    cfg = config.parse_args(ImportConfig, __doc__.splitlines()[0], FLAGS, argv)
    counts = run(cfg)
    print(json.dumps({"output": cfg.output, **counts}))
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
