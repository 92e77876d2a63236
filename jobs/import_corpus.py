"""import_corpus: GoodNews-style JSON + image folder, JSONL, or multimodal NER CoNLL files into Parquet shards.

    python jobs/import_corpus.py --format goodnews --source caption.json --images IMAGE_DIR --output OUT
    python jobs/import_corpus.py --format jsonl --source samples.jsonl --output s3://bucket/corpus
    python jobs/import_corpus.py --format twitter-mner --source DIR/train.txt [--captions FILE] [--images DIR] --output OUT
    python jobs/import_corpus.py --format twitter-keyphrase --source test_ocr_kw.txt [--images DIR] --output OUT
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

from eama.engine import config, importing, schema, storage
from eama.keyphrase import corpus as keyphrase_corpus
from eama.mner import conll
from eama.news import importers


@dataclasses.dataclass
class ImportConfig:
    format: str = "goodnews"  # goodnews | jsonl | twitter-mner | twitter-keyphrase
    source: str = ""  # caption.json (goodnews), a .jsonl file, a CoNLL file (twitter-mner) or a post<sep>keyphrases file (twitter-keyphrase); local or s3://
    images: str = ""  # goodnews: folder of {article_id}_{index}.jpg; jsonl: root of relative image paths; twitter-mner: folder of {imgid}.jpg; twitter-keyphrase: folder of the URLs' file names (both optional)
    captions: str = ""  # twitter-mner: captions file of '<imgid>.jpg :<caption>' lines joined as the caption view (optional)
    output: str = "demo_out/imported"  # output directory for Parquet shards, local or s3://
    shard_size: int = 256  # rows per shard


FLAGS = [
    config.Flag("--format", "format", "goodnews | jsonl | twitter-mner | twitter-keyphrase"),
    config.Flag("--source", "source", "caption.json, .jsonl, CoNLL or post<sep>keyphrases file"),
    config.Flag("--images", "images", "image folder (goodnews, twitter-mner) or root for relative paths (jsonl)"),
    config.Flag("--captions", "captions", "twitter-mner: '<imgid>.jpg :<caption>' file joined as the caption view"),
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
    elif cfg.format in ("twitter-mner", "twitter-keyphrase"):
        for path in (cfg.source, cfg.captions, cfg.images):
            if path and not storage.exists(path):
                raise config.ConfigError(f"not found: {path}")
        if cfg.format == "twitter-mner":
            items = conll.twitter_samples(cfg.source, cfg.captions or None, cfg.images or None)
            return importing.write_shards(items, cfg.output, cfg.shard_size, schema.MNER_SAMPLE)
        items = keyphrase_corpus.twitter_samples(cfg.source, cfg.images or None)
        return importing.write_shards(items, cfg.output, cfg.shard_size, schema.KEYPHRASE_SAMPLE)
    else:
        raise config.ConfigError(f"format must be goodnews, jsonl, twitter-mner or twitter-keyphrase, got {cfg.format!r}")
    return importing.write_shards(items, cfg.output, cfg.shard_size)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    cfg = config.parse_args(ImportConfig, __doc__.splitlines()[0], FLAGS, argv)
    counts = run(cfg)
    print(json.dumps({"output": cfg.output, **counts}))
    return counts


if __name__ == "__main__":
    config.main(main, sys.argv[1:], user_errors=(FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                 json.JSONDecodeError))
