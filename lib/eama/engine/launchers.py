"""Where a task trains: `fit(task)` checks its settings, then hands it to the launcher that
`launcher` names: `ray` (trainer.fit_on_ray: Ray Train workers + DeepSpeed, nodes and GPUs) or
`local` (local_launcher.fit: this process, torch AdamW). Systems and jobs train through here."""

from __future__ import annotations

from typing import Any

from eama.engine import local_launcher, storage, trainer


def fit(task: trainer.TrainingTask) -> Any:
    """Train (or resume, when OUTPUT/RUN_NAME holds a checkpoint) the task; returns Ray's Result,
    or `local_launcher.LocalResult` with the same fields the jobs read (path, checkpoint, error)."""
    task.validate()
    task.config.output = storage.absolute(task.config.output)
    if task.config.launcher == "local":
        return local_launcher.fit(task)
    return trainer.fit_on_ray(task)
