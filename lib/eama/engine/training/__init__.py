"""The generic trainer: any system's `TrainingTask`, trained on Ray Train workers running DeepSpeed
(ZeRO-2 or ZeRO-3), or in one process with torch's AdamW (`launcher=local`).

A system brings a `TrainingTask` (its data, model, collation, loss and export); the engine does
the rest, the same way for every task. The rooms, each importing only those above it:

* `config`: `TrainerConfig` (the settings every task shares), `validate`, `run_dir` / `export_dir`;
* `task`: the task interface (`TrainingTask`, `ModelParts`) and the helpers a task calls;
* `order`: the step plan and the seeded row order, cut into micro-batches so a global step holds
  the same rows for any world size (Ray Data's streaming split, or every worker reading itself);
* `checkpoints`: the trainer state, DeepSpeed's sharded checkpoint with every rank's random
  generators, the resume check (`plan_fingerprint` / `check_resume`) and the published export;
* `metrics`: `StepStats` all-reduced per optimizer step, the metrics files, the run summary, the
  loss PNG and MFU;
* `progress`: rank 0's step lines, relayed to the driver, and the logging setup;
* `loop`: `run_steps`, the step loop both launchers share (evaluation, model selection,
  checkpoints, export);
* `ray_launcher` (`fit_on_ray`, `train_loop_per_worker`) and `local_launcher` (`fit`);
* `launch`: `fit(task)`, which checks the settings and picks the launcher, and `train_job`.

Nothing here imports a system's code (eama.news, eama.mner, eama.keyphrase): tasks come in as
objects.
"""
