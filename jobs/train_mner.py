"""train_mner: train a multimodal NER tagger (ITA: encoder + CRF, optional image-text view and CVA; or BGA-MNER) on Ray Train + DeepSpeed.

    python jobs/train_mner.py --train TRAIN --valid VALID --output RUNS --run-name NAME
        [--method ita|bga] [--view text|caption|ocr|tags|all] [--cva] [--encoder minilm|mpnet|ID_OR_PATH]
        [--config FILE.yaml] [key=value ...]

--method bga trains BGA-MNER (bidirectional generative alignment of tokens and image regions): it
reads each post's image (through the frozen `vision` encoder) or, where there is none, its caption
(the caption proxy), and tags from the text alone at inference (tag_entities view=text) or with the
real visual source (view=visual).

TRAIN and VALID are MNER Parquet rows (import_corpus --format twitter-mner, or image_views output).
The model is evaluated on VALID after every epoch in both evaluation views (text-only input and
text+view input); RUNS/NAME/export holds the model of the epoch with the best mean of the two
(`select_metric=dev_f1`), a folder tag_entities loads with --model. The test set is never read.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from eama.engine import config
from eama.engine.training.launch import train_job
from eama.mner import methods, training

FLAGS = [
    config.Flag("--train", "train", "MNER Parquet rows to train on, local or s3://"),
    config.Flag("--valid", "valid", "MNER Parquet rows for model selection (never the test set)"),
    config.Flag("--output", "output", "storage root for checkpoints, metrics and the export, local or s3://"),
    config.Flag("--run-name", "run_name", "run folder under --output; the same name resumes"),
    config.Flag("--method", "method", "ita (encoder + CRF, optional view and CVA) | bga (BGA-MNER)"),
    config.Flag("--view", "view", "image-text view appended to each post: text | caption | ocr | tags | all"),
    config.Flag("--cva", "cva", "cross-view alignment (KL between text+view and text-only marginals)", switch=True),
    config.Flag("--encoder", "encoder", "minilm | mpnet | a Hugging Face id | a local or s3:// folder"),
    config.Flag("--num-workers", "num_workers", "training workers (one per GPU)"),
    config.Flag("--use-gpu", "use_gpu", "one GPU per worker, bf16", switch=True),
]


def main(argv: Sequence[str] | None = None) -> dict:
    return train_job(training.MnerTrainConfig, methods.fit, __doc__.splitlines()[0], FLAGS, argv)


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
