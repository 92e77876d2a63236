"""The Ray launcher (`launcher=ray`): Ray Train workers running DeepSpeed (ZeRO-2 or ZeRO-3).

`fit_on_ray(task)` is the driver side (`launch.fit` picks it, or the local launcher): the plan, the
resume check, the data (read by every worker or Ray Data's streaming split), the progress relay
and Ray Train's trainer with its checkpoint and failure settings. `train_loop_per_worker` is the
worker side: the DeepSpeed config from `deepspeed_config.build_config` (the one builder) and its
schedule, the engine, resuming from Ray's latest checkpoint, then the shared step loop
(`loop.run_steps`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from eama.engine import deepspeed_config
from eama.engine.training.checkpoints import (check_resume, load_engine_state, newest_checkpoint_state,
                                              plan_fingerprint, save_checkpoint, trainer_state)
from eama.engine.training.config import TrainerConfig, run_dir
from eama.engine.training.loop import StepContext, build_parts, prepare_torch, run_steps
from eama.engine.training.metrics import peak_flops
from eama.engine.training.order import (StepPlan, local_micro_batches, micro_batches, plan_steps,
                                        task_order, training_dataset, use_local_data)
from eama.engine.training.progress import DriverEcho, ProgressRelay, worker_logging
from eama.engine.training.task import TrainingTask, device_and_dtype

log = logging.getLogger("eama.trainer")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, resume, the step loop, checkpoints, export."""
    import deepspeed
    import ray.train
    import torch

    started = time.time()
    worker_logging(config.get("relay"))
    task: TrainingTask = config["task"]
    cfg = task.config
    plan = StepPlan(**config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def info(msg: str, *args: Any) -> None:
        if rank == 0:
            log.info(msg, *args)

    prepare_torch(cfg)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # reuses Ray Train's group
    ckpt = ray.train.get_checkpoint()  # the latest reported one: after a failure or a relaunch
    state = trainer_state(ckpt)
    state.world_size, state.plan = world, config["fingerprint"]  # the driver checked it (check_resume)
    info("%d workers started (attempt %d, %s)", world, state.attempts,
         f"resuming after step {state.step}" if ckpt is not None else "from scratch")

    ds_config = deepspeed_config.build_config(
        zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
        world_size=world, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.use_gpu, offload_optimizer=cfg.offload_optimizer, offload_params=cfg.offload_params,
        param_persistence_threshold=None if cfg.param_persistence_threshold < 0 else cfg.param_persistence_threshold,
    )
    # `parts` lives as long as this frame (ZeRO-3's HfDeepSpeedConfig in keep_alive)
    parts, params, trainable = build_parts(task, ds_config, *device_and_dtype(ds_config), rank)
    engine, _, _, _ = deepspeed.initialize(
        model=parts.module, model_parameters=params, config=ds_config,
        lr_scheduler=deepspeed_config.lr_schedule(plan.total_steps, plan.warmup_steps, cfg.min_lr_ratio, cfg.schedule),
    )
    if ckpt is not None:
        load_engine_state(engine, ckpt, rank)
        info("resumed from %s", ckpt.path)
    info("engine ready (ZeRO-%d) at step %d, %.1fs after start", cfg.zero_stage, state.step, time.time() - started)
    peak = peak_flops(torch.cuda.get_device_name()) if cfg.use_gpu else None
    if config.get("files"):
        batches = local_micro_batches(config["files"], cfg, config["order"], task.columns, rank, world,
                                      plan.micro_batches_per_rank, skip=state.step * cfg.grad_accum)
    else:
        batches = micro_batches(ray.train.get_dataset_shard("train"), cfg.micro_batch_size,
                                skip=state.step * cfg.grad_accum)

    def checkpoint(record: dict[str, Any]) -> None:
        save_checkpoint(engine, state, {"step": state.step, "loss": record["loss"]}, rank)

    run_steps(engine, task, plan, state, batches,
              StepContext(rank, world, trainable, peak, started, checkpoint, cfg.grad_accum))


WORKER_ENV = ("DS_ACCELERATOR", "EAMA_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


def worker_env(cfg: TrainerConfig) -> dict[str, str]:
    """Settings the workers need from the driver's environment (credentials are not copied: they
    come from the cluster's own environment or instance role)."""
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    return env


def fit_on_ray(task: TrainingTask) -> Any:
    """The Ray launcher (`launch.fit` checks the settings first): run (or resume, when
    OUTPUT/RUN_NAME holds checkpoints) the task's training on Ray Train workers; returns Ray's
    Result. Progress lines are logged on the driver under 'eama.trainer'."""
    cfg = task.config
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    files, rows = task.data_files()
    plan = plan_steps(rows, cfg)
    fingerprint = plan_fingerprint(files, rows, cfg, plan)
    saved = newest_checkpoint_state(run_dir(cfg))
    if saved is not None:
        check_resume(saved, fingerprint, run_dir(cfg))
    log.info("%s: %d rows in %d files -> %d steps of %d rows (%d workers x %d x %d accumulation, "
             "%d epochs, %d warm-up steps, ZeRO-%d); run %s", task.title, rows, len(files), plan.total_steps,
             plan.rows_per_step, cfg.num_workers, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs,
             plan.warmup_steps, cfg.zero_stage, run_dir(cfg))
    local = use_local_data(files, cfg)
    log.info("data: %s", "read by every worker (data_loading=local)" if local else "Ray Data streaming split")
    order = task_order(task, rows)
    if cfg.group_by_length:
        log.info("group_by_length: rows sorted by %s inside %d random buckets per epoch",
                 " + ".join(order.length_columns), 1 << order.bucket_bits)
    data: dict[str, Any] = {}
    if not local:
        ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True  # with one-micro-batch blocks: micro-batch j goes to rank j % world
        data = {"datasets": {"train": training_dataset(files, cfg, rows, order, task.columns)},
                "dataset_config": DataConfig(datasets_to_split=["train"], execution_options=ingest)}
    relay = ray.remote(num_cpus=0)(ProgressRelay).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "plan": dataclasses.asdict(plan), "relay": relay,
                           "files": list(files) if local else None, "order": order, "fingerprint": fingerprint},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        **data,
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.output,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    log.info("starting %d training workers", cfg.num_workers)
    started = time.time()
    try:
        with DriverEcho(relay):
            result = trainer.fit()
    finally:
        ray.kill(relay)
    log.info("training finished in %.0fs%s", time.time() - started,
             f" with an error: {result.error}" if result.error else "")
    return result
