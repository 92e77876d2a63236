"""train_keyphrase: train an MM-MKP keyphrase model (classifier + copy generator, image noise filtering) on Ray Train + DeepSpeed.

    python jobs/train_keyphrase.py --train TRAIN [--valid VALID] --output RUNS --run-name NAME
        [--encoder minilm|mpnet|ID_OR_PATH] [--mode joint|classify|generate] [--inputs text|all|ocr|entities]
        [--config FILE.yaml] [key=value ...]

TRAIN (and VALID) are keyphrase Parquet rows (import_corpus --format twitter-keyphrase). Without
--valid, a seeded 10% of TRAIN (holdout=0.1; the same posts for every seed) is held out and written
under RUNS/NAME/data. After every epoch the held-out posts are decoded with beam search and scored
(F1@1, F1@3, MAP@5); RUNS/NAME/export holds the epoch with the best mean of the three, a folder
extract_keyphrases loads with --model. The test set is never read.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from eama.engine import config
from eama.engine.training.launch import train_job
from eama.keyphrase import training

FLAGS = [
    config.Flag("--train", "train", "keyphrase Parquet rows to train on, local or s3://"),
    config.Flag("--valid", "valid", "keyphrase Parquet rows for model selection (default: hold out 10% of --train)"),
    config.Flag("--output", "output", "storage root for checkpoints, metrics and the export, local or s3://"),
    config.Flag("--run-name", "run_name", "run folder under --output; the same name resumes"),
    config.Flag("--encoder", "encoder", "minilm | mpnet | a Hugging Face id | a local or s3:// folder"),
    config.Flag("--mode", "mode", "joint | classify | generate"),
    config.Flag("--inputs", "inputs", "text (post alone) | all (post + OCR + visual entities) | ocr (post + OCR) | entities (post + visual entities)"),
    config.Flag("--num-workers", "num_workers", "training workers (one per GPU)"),
    config.Flag("--use-gpu", "use_gpu", "one GPU per worker, bf16", switch=True),
]


def main(argv: Sequence[str] | None = None) -> dict:
    return train_job(training.KeyphraseTrainConfig, training.fit, __doc__.splitlines()[0], FLAGS, argv)


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
