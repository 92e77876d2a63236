"""The step loop both launchers share (`run_steps`): optimizer steps, metrics, evaluation, model
selection, checkpoints, the loss PNG and the export, over DeepSpeed's engine or the local
launcher's; and what both do before it (`prepare_torch`, `build_parts`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterator, Mapping

import numpy as np

from eama.engine import storage
from eama.engine.training.checkpoints import TrainerState, export_info, export_model
from eama.engine.training.config import TrainerConfig, run_dir
from eama.engine.training.metrics import (StepStats, mfu, plot_losses, read_metrics, sync_metrics,
                                          trainable_params, write_metrics)
from eama.engine.training.order import StepPlan
from eama.engine.training.progress import Progress
from eama.engine.training.task import ModelParts, TrainingTask, enable_gradient_checkpointing

log = logging.getLogger("eama.trainer")


def train_step(engine: Any, task: TrainingTask, batches: Iterator[dict[str, np.ndarray]],
               accumulation: int) -> StepStats:
    """One optimizer step: `accumulation` micro-batches forward and backward (the engine scales each
    loss by 1/accumulation, averages gradients over ranks, clips, and steps at the boundary)."""
    stats = StepStats(len(task.group_names))
    for _ in range(accumulation):
        batch = task.collate(next(batches))
        loss, row_losses, group_ids = task.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        stats.add(loss, row_losses, group_ids, task.counts(batch))
    return stats


def evaluate(engine: Any, task: TrainingTask, step: int) -> dict[str, Any]:
    """The task's evaluate on every rank (eval mode, no grad); rank 0's dict as eval/<key>."""
    import torch

    engine.eval()
    try:
        with torch.no_grad():
            out = task.evaluate(engine, step)
    finally:
        engine.train()
    return {f"eval/{k}": v for k, v in (out or {}).items()}


def maybe_fail(cfg: TrainerConfig, rank: int, world_size: int, step: int) -> None:
    """Test hook: die like a lost node (no cleanup) once, after step `fail_at_step`."""
    target = cfg.fail_rank if cfg.fail_rank >= 0 else world_size - 1
    if cfg.fail_at_step and step == cfg.fail_at_step and rank == target and cfg.fail_marker:
        if not os.path.exists(cfg.fail_marker):
            with open(cfg.fail_marker, "w") as fh:
                fh.write(f"rank {rank} exited after step {step}\n")
            os._exit(1)


def select_model(engine: Any, task: TrainingTask, cfg: TrainerConfig, state: TrainerState,
                 scores: Mapping[str, Any], rank: int, world: int) -> None:
    """Model selection: export when rank 0's `select_metric` beats the best so far (every rank
    takes rank 0's value, so all of them join the collective export or none does)."""
    import torch
    import torch.distributed as dist

    key = f"eval/{cfg.select_metric}"
    if rank == 0 and key not in scores:
        raise KeyError(f"select_metric={cfg.select_metric!r} is not among the evaluation keys: "
                       f"{', '.join(k.removeprefix('eval/') for k in scores) or 'none (the task evaluates nothing)'}")
    value = torch.tensor([float(scores.get(key, float("nan")))], dtype=torch.float64, device=engine.device)
    if dist.is_initialized() and world > 1:
        dist.broadcast(value, src=0)
    v = float(value.item())
    if state.best_value is not None and not v > state.best_value:
        return
    state.best_value, state.best_step = v, state.step
    t0 = time.time()
    dest = export_model(engine, task, run_dir(cfg), rank, export_info(task, cfg, state, world))
    if rank == 0:
        log.info("step %d is the best so far (%s %.4g): exported to %s in %.1fs", state.step, cfg.select_metric, v,
                 dest, time.time() - t0)


def prepare_torch(cfg: TrainerConfig) -> None:
    """Seed torch for the run; on CPU, use the threads the worker reserves."""
    import torch

    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))


def build_parts(task: TrainingTask, ds_config: dict[str, Any], device: str, dtype: Any,
                rank: int) -> tuple[ModelParts, Any, int]:
    """The task's model on `device` (gradient checkpointing applied when asked), what the optimizer
    trains and the trainable parameter count; rank 0 logs the load time."""
    t0 = time.time()
    parts = task.build_model(ds_config, device, dtype)
    if task.config.gradient_checkpointing:
        enable_gradient_checkpointing(parts.module)
    trainable = trainable_params(parts.module)
    if rank == 0:
        log.info("model loaded in %.1fs: %s trainable parameters", time.time() - t0, f"{trainable:,}")
    params = parts.parameters if parts.parameters is not None else [
        p for p in parts.module.parameters() if p.requires_grad]
    return parts, params, trainable


@dataclasses.dataclass
class StepContext:
    """What the step loop needs from the launcher that runs it."""

    rank: int
    world: int
    trainable: int  # trainable parameters (for MFU)
    peak: float | None  # the device's peak FLOP/s (GPU), for MFU
    started: float  # time.time() at the launcher's start
    checkpoint: Any  # record -> None: commit a checkpoint of the engine and the trainer state
    accumulation: int  # micro-batches per optimizer step on this rank


def run_steps(engine: Any, task: TrainingTask, plan: StepPlan, state: TrainerState,
              batches: Iterator[dict[str, np.ndarray]], ctx: StepContext) -> None:
    """The step loop every launcher shares: optimizer steps, metrics, evaluation, model selection,
    checkpoints, the loss PNG and the export. `engine` is DeepSpeed's or the local launcher's."""
    cfg = task.config
    rank, world = ctx.rank, ctx.world

    def info(msg: str, *args: Any) -> None:
        if rank == 0:
            log.info(msg, *args)

    def flush_metrics() -> None:  # after a committed checkpoint (which holds them) and at the end
        if rank == 0:
            write_metrics(state.pending, run_dir(cfg))
        state.pending = []

    if rank == 0:
        sync_metrics(run_dir(cfg), state)
    state.pending = []
    progress = Progress(plan.total_steps, state.step)
    engine.train()
    while state.step < plan.total_steps:
        t0 = time.perf_counter()
        stats = train_step(engine, task, batches, ctx.accumulation)
        state.step += 1
        record = stats.reduce(engine.device, world, ctx.accumulation, task.group_names)
        seconds = time.perf_counter() - t0
        record.update(step=state.step, lr=engine.get_lr()[0], step_seconds=seconds,
                      rows_per_s=plan.rows_per_step / seconds, attempt=state.attempts)
        if "tokens" in record:
            record["tokens_per_s"] = record["tokens"] / seconds
            if ctx.peak:
                record["mfu"] = mfu(record["tokens_per_s"], ctx.trainable, world, ctx.peak)
        state.pending.append(record)
        if progress.due(state.step):
            info("%s", progress.line(state.step, record))
        maybe_fail(cfg, rank, world, state.step)
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == plan.total_steps:
            t0 = time.time()
            scores = evaluate(engine, task, state.step)
            if scores:
                record.update(scores)
                info("eval at step %d in %.1fs: %s", state.step, time.time() - t0,
                     ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
            if cfg.select_metric and cfg.export:
                select_model(engine, task, cfg, state, scores, rank, world)
        if cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or state.step == plan.total_steps):
            t0 = time.time()
            ctx.checkpoint(record)
            info("checkpoint at step %d in %.1fs", state.step, time.time() - t0)
            flush_metrics()

    flush_metrics()
    history = read_metrics(run_dir(cfg)) if rank == 0 else []
    if history:
        plot_losses(history, storage.join(run_dir(cfg), "loss_curves.png"), task.group_names, task.title)
    if cfg.export and not cfg.select_metric:
        t0 = time.time()
        dest = export_model(engine, task, run_dir(cfg), rank, export_info(task, cfg, state, world))
        info("exported to %s in %.1fs", dest, time.time() - t0)
    elif cfg.export:
        info("the export holds step %d (%s %.4g, the best of the evaluations)", state.best_step,
             cfg.select_metric, state.best_value if state.best_value is not None else float("nan"))
    info("done: %d steps, %.1fs in this attempt", state.step, time.time() - ctx.started)
