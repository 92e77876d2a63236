"""train_alignment: EAMA multitask alignment training (Ray Train + DeepSpeed ZeRO-3).

    python jobs/train_alignment.py --data TASKS --model ID_OR_PATH --output STORAGE
        [--num-workers N] [--use-gpu] [--zero-stage 3] [--run-name NAME]
        [--task-weights sentence_selection=1,entity_selection=1,captioning=1]
        [--config FILE.yaml] [key=value ...]

TASKS is build_alignment_data output. STORAGE (local or s3://) receives STORAGE/RUN/checkpoint-*
(the newest keep_checkpoints), metrics/ (a file per checkpoint), loss_curves.png and the export (a
Hugging Face model folder export-<step>-<id>/ named by the pointer export.json, which caption_corpus
loads with --model STORAGE/RUN/export). Relaunching with the same run name resumes from the last
checkpoint, if the data and settings are those it was trained with. A mistake in the settings or a missing --data ends in one line
`error: ...` before Ray starts (exit status 2 for settings, 1 for the rest). See the README's
Alignment section.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from eama.engine import config, storage
from eama.news import alignment_training

FLAGS = [
    config.Flag("--data", "data", "task rows (build_alignment_data output), local or s3://"),
    config.Flag("--model", "model", "preset, hub id, local path or s3:// URI to start from"),
    config.Flag("--output", "output", "storage root for checkpoints, logs and the export, local or s3://"),
    config.Flag("--run-name", "run_name", "run folder under --output; the same name resumes"),
    config.Flag("--num-workers", "num_workers", "training workers (one per GPU)"),
    config.Flag("--use-gpu", "use_gpu", "one GPU per worker, bf16", switch=True),
    config.Flag("--zero-stage", "zero_stage", "DeepSpeed ZeRO stage (0-3)"),
    config.Flag("--task-weights", "task_weights", "per-task loss weights, task=w,..."),
    config.Flag("--max-steps", "max_steps", "stop after this many optimizer steps (0: all epochs)"),
]


def check(cfg: alignment_training.TrainConfig) -> None:
    """Settings (ConfigError) and the task data (UserError), before Ray starts."""
    with config.checking_settings():
        alignment_training.validate(cfg)
        if not cfg.output:
            raise ValueError("an output storage root is needed (--output)")
    config.require_path(cfg.data, "--data")
    config.require_local_if_named(cfg.model, "model")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config.parse_args(alignment_training.TrainConfig, __doc__.splitlines()[0], FLAGS, argv)
    check(cfg)
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = alignment_training.fit(cfg)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    history = alignment_training.read_metrics(alignment_training.run_dir(cfg))
    first, last = history[0], history[-1]
    print(json.dumps({
        "run": alignment_training.run_dir(cfg),
        "steps": last["step"],
        "loss_first": round(first["loss"], 4),
        "loss_last": round(last["loss"], 4),
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in history)[len(history) // 2],
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": alignment_training.export_dir(cfg) if cfg.export else None,
        "loss_curves": storage.join(alignment_training.run_dir(cfg), "loss_curves.png"),
    }, indent=2))


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
