"""enrich_posts: one pass over a post corpus: image views, entities and keyphrases together, each image decoded once, one row per post.

    python jobs/enrich_posts.py --input POSTS --output OUT --mner-model RUNS/A/export --keyphrase-model RUNS/B/export
        [--views ocr,tags,caption] [--caption-model ID_OR_PATH] [--overwrite] [--config FILE.yaml] [key=value ...]

Posts come as MNER rows (tokens), keyphrase rows (post) or plain text (text), with or without an
image. Only the views the two models read are computed (OCR, ImageNet labels, and captions when
--caption-model is given; else the input's caption column serves). Output rows (schema.ENRICHED_POST)
hold the post, its views, predicted_tags and entities, predicted_keyphrases with their scores, and
the model behind each. A re-run enriches only what is not committed yet; a post a stage fails is an
error row naming the stage.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from eama.engine import config, console, enrichment
from eama.keyphrase import extraction
from eama.mner import tagging

FLAGS = [
    config.Flag("--input", "input", "posts (tokens, post or text column): Parquet file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "output directory, local or s3://"),
    config.Flag("--mner-model", "mner_model", "a train_mner export folder (RUN/export), local or s3://"),
    config.Flag("--keyphrase-model", "keyphrase_model", "a train_keyphrase export folder (RUN/export), local or s3://"),
    config.Flag("--views", "views", "views to compute of those the models read: caption, ocr, tags (default: all they read)"),
    config.Flag("--caption-model", "caption_model", "hub id, local path or s3:// URI of the captioning model (caption view)"),
    config.Flag("--overwrite", "overwrite", "discard committed output and redo everything", switch=True),
]


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.parse_args(enrichment.EnrichConfig, __doc__.splitlines()[0], FLAGS, argv)
    enrichment.validate(cfg)
    models = []
    if cfg.mner_model:
        models.append(tagging.post_model(cfg.mner_model, threads=cfg.model_threads))
    if cfg.keyphrase_model:
        models.append(extraction.post_model(cfg.keyphrase_model, threads=cfg.model_threads))
    manifest = enrichment.run(cfg, models)
    print("\n".join(console.summary_lines(manifest, f"views {','.join(manifest['views']) or '-'}", "enriched")))
    return manifest


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
