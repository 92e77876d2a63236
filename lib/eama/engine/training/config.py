"""The settings every training task shares (`TrainerConfig`), their checks, and where a run lives.

A task's config subclasses `TrainerConfig` and adds its own keys; `validate` rejects settings no
run can use; `run_dir` / `export_dir` name OUTPUT/RUN_NAME and its export.
"""

from __future__ import annotations

import dataclasses
import re

from eama.engine import deepspeed_config, exports, storage

DATA_LOADING = ("auto", "local", "stream")
LAUNCHERS = ("ray", "local")


@dataclasses.dataclass
class TrainerConfig:
    """Settings every task shares; a task's config subclasses this dataclass and adds its own keys."""

    output: str = "runs"  # storage root, local or s3://; the run lives in OUTPUT/RUN_NAME
    run_name: str = "run"  # a relaunch with the same name resumes from its last checkpoint
    launcher: str = "ray"  # ray (Ray Train workers + DeepSpeed: nodes, GPUs, ZeRO, retries) | local (this process alone, torch AdamW, fp32, no Ray or DeepSpeed: one GPU, a laptop, debugging; a step still holds num_workers x grad_accum micro-batches)
    num_workers: int = 2  # one per GPU (or per CPU slot without GPUs)
    use_gpu: bool = False  # one GPU per worker, bf16 (else fp32 on CPU); launcher=local: this process's GPU, fp32
    cpus_per_worker: float = 0.5  # keep CPUs free for Ray Data's read tasks on small machines
    torch_threads: int = 0  # torch threads per worker on CPU; 0 = the CPUs it reserves (at least 1)
    zero_stage: int = 3  # DeepSpeed ZeRO stage 0-3 (3 partitions parameters, gradients and optimizer state)
    micro_batch_size: int = 2  # rows per worker per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step on every worker
    epochs: int = 1  # passes over the training rows, each in its own seeded order
    max_steps: int = 0  # 0 = as many as the epochs give
    lr: float = 2e-5  # peak learning rate (after warm-up)
    min_lr_ratio: float = 0.0  # the schedule ends at lr x this
    schedule: str = "cosine"  # decay after warm-up: cosine | linear
    warmup_ratio: float = 0.03  # share of the steps spent on the linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global norm)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more time)
    offload_optimizer: bool = False  # keep optimizer state in CPU memory (ZeRO >= 1)
    offload_params: bool = False  # keep parameters in CPU memory (ZeRO-3)
    param_persistence_threshold: int = -1  # ZeRO-3: params below this many elements stay whole; -1 = DeepSpeed's
    shuffle: bool = True  # one seeded global shuffle per epoch
    group_by_length: int = 0  # > 0: rows of similar length share micro-batches (less padding), sorted by length inside random buckets of about this many micro-batches; 0 = off
    data_loading: str = "auto"  # local (every worker reads the files and orders them in memory) | stream (Ray Data streaming split, any size) | auto (local when the files total <= local_data_bytes)
    local_data_bytes: int = 1 << 30  # data_loading=auto: Parquet bytes up to which every worker holds the data itself
    seed: int = 0  # data order and initialisation
    checkpoint_every: int = 50  # optimizer steps (and at the end); 0 = never (benchmarks)
    keep_checkpoints: int = 2  # newest checkpoints kept in storage
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    eval_every: int = 0  # optimizer steps between the task's evaluate calls (it also runs at the end); 0 = end only
    export: bool = True  # write OUTPUT/RUN_NAME/export (a Hugging Face-style model folder, behind the pointer RUN/export.json)
    select_metric: str = ""  # an evaluate() key (higher is better): export the model at the eval where it peaked (model selection on validation data); empty = the last step
    # Test hook: rank `fail_rank` (-1 = last) exits hard after step `fail_at_step`, once: the
    # marker file `fail_marker` records that it happened.
    fail_at_step: int = 0  # test hook: a worker exits hard after this step, once (0 = never)
    fail_rank: int = -1  # test hook: which rank fails (-1 = the last)
    fail_marker: str = ""  # test hook: file recording that the failure happened


def validate(cfg: TrainerConfig) -> None:
    """Reject settings no run can use (SystemExit with the reason)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.run_name):
        raise SystemExit(f"run_name may hold letters, digits, '_', '-' and '.', got {cfg.run_name!r}")
    if min(cfg.num_workers, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs) < 1 or cfg.checkpoint_every < 0:
        raise SystemExit("num_workers, micro_batch_size, grad_accum and epochs must be >= 1, checkpoint_every >= 0")
    if cfg.eval_every < 0:
        raise SystemExit("eval_every must be >= 0")
    if cfg.schedule not in deepspeed_config.SCHEDULES:
        raise SystemExit(f"schedule must be one of {', '.join(deepspeed_config.SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.epochs > 1 and not cfg.shuffle:
        raise SystemExit("epochs > 1 needs shuffle=true (each epoch is a seeded order of the rows)")
    if cfg.group_by_length < 0 or (cfg.group_by_length and not cfg.shuffle):
        raise SystemExit("group_by_length must be >= 0 and needs shuffle=true (it groups inside the seeded order)")
    if cfg.launcher not in LAUNCHERS:
        raise SystemExit(f"launcher must be one of {', '.join(LAUNCHERS)}, got {cfg.launcher!r}")
    if cfg.data_loading not in DATA_LOADING:
        raise SystemExit(f"data_loading must be one of {', '.join(DATA_LOADING)}, got {cfg.data_loading!r}")


def run_dir(cfg: TrainerConfig) -> str:
    return storage.join(cfg.output, cfg.run_name)


def export_dir(cfg: TrainerConfig) -> str:
    """RUN/export: what loaders take (exports.resolve_export follows the RUN/export.json pointer)."""
    return storage.join(run_dir(cfg), exports.NAME)
