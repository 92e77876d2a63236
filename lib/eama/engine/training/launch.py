"""Where a task trains: `fit(task)` checks its settings, then hands it to the launcher that
`launcher` names: `ray` (ray_launcher.fit_on_ray: Ray Train workers + DeepSpeed, nodes and GPUs) or
`local` (local_launcher.fit: this process, torch AdamW). Systems and jobs train through here;
`train_job` is a training job's main around it."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

from eama.engine import storage
from eama.engine.training import local_launcher, ray_launcher
from eama.engine.training.metrics import run_summary
from eama.engine.training.task import TrainingTask


def fit(task: TrainingTask) -> Any:
    """Train (or resume, when OUTPUT/RUN_NAME holds a checkpoint) the task; returns Ray's Result,
    or `local_launcher.LocalResult` with the same fields the jobs read (path, checkpoint, error)."""
    task.validate()
    task.config.output = storage.absolute(task.config.output)
    if task.config.launcher == "local":
        return local_launcher.fit(task)
    return ray_launcher.fit_on_ray(task)


def train_job(config_class: type, fit_fn: Any, description: str, flags: Sequence[Any],
              argv: Sequence[str] | None = None) -> dict[str, Any]:
    """A training job's main: parse the settings, train (or resume), print and return the summary."""
    from eama.engine import config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config.parse_args(config_class, description, flags, argv)
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = fit_fn(cfg)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    out = run_summary(cfg)
    print(json.dumps(out, indent=2))
    return out
