"""The trainer's second launcher (`launcher=local`): the same task, data order, schedule, step loop,
model selection and export as the Ray launcher, in this one process with a plain torch optimizer.

No Ray and no DeepSpeed: for one GPU (`use_gpu=true`) or a CPU, for debugging a task, and for
machines where neither is installed. What stays the same as the Ray launcher (`ray_launcher.fit_on_ray`):

* the rows of every optimizer step: `num_workers x grad_accum` micro-batches are accumulated in
  one process, in the order the Ray launcher hands them to its ranks, so a step holds the same rows;
* the optimizer and schedule: torch's AdamW with the settings `deepspeed_config.build_config` gives
  DeepSpeed (learning rate, betas, eps, weight decay, fused, gradient clipping) and the same
  `lr_schedule`; each parameter group keeps its own learning rate;
* the step loop (`loop.run_steps`): the metrics files, the loss PNG, evaluation, model selection,
  the export (behind its pointer) and its eama_export.json;
* resuming: only with the plan the checkpoint records (`checkpoints.check_resume`), the random
  generators (Python, numpy, torch) restored.

What differs: training is fp32 on either device (no bf16 mixed precision); checkpoints are one
torch file per step (`RUN/local-checkpoints/checkpoint-STEP/engine.pt`, read back with
weights_only=True) and a relaunch under the same run name resumes from the newest one; a crash is
not retried (`max_failures` is for the Ray launcher).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from typing import Any

from eama.engine import deepspeed_config, storage
from eama.engine.training.checkpoints import (TRAINER_STATE, TrainerState, check_resume, plan_fingerprint,
                                              rng_state, set_rng_state)
from eama.engine.training.config import TrainerConfig, run_dir
from eama.engine.training.loop import StepContext, build_parts, prepare_torch, run_steps
from eama.engine.training.metrics import peak_flops
from eama.engine.training.order import local_micro_batches, plan_steps, task_order
from eama.engine.training.task import TrainingTask

log = logging.getLogger("eama.trainer")

CHECKPOINTS = "local-checkpoints"
ENGINE_FILE = "engine.pt"


@dataclasses.dataclass
class LocalResult:
    """What `fit` returns: the fields of Ray's Result the jobs read."""

    path: str  # the run's folder
    checkpoint: Any = None  # the newest checkpoint's folder (an object with .path), if any
    error: Exception | None = None


@dataclasses.dataclass
class CheckpointRef:
    path: str


class LocalEngine:
    """The part of DeepSpeed's engine that the step loop and the tasks use, over a torch module and
    torch's AdamW in this process: call it like the module; `backward` scales the loss by
    1/accumulation; `step` clips, steps and schedules at every accumulation boundary."""

    def __init__(self, module: Any, params: Any, ds_config: dict[str, Any], schedule: Any, device: str,
                 accumulation: int):
        import torch

        opt = ds_config["optimizer"]["params"]
        self.module, self.device, self.accumulation = module, torch.device(device), accumulation
        self.max_grad_norm = float(ds_config.get("gradient_clipping") or 0.0)
        self.optimizer = torch.optim.AdamW(params, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                                           weight_decay=opt["weight_decay"], fused=bool(opt.get("fused")))
        self.trained = [p for g in self.optimizer.param_groups for p in g["params"]]  # what clipping sees
        self.scheduler = schedule(self.optimizer)
        self.micro_steps = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: Any) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        import torch

        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trained, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def zero_optimization_stage(self) -> int:
        return 0  # nothing is partitioned: the module's state dict is whole

    def state(self) -> dict[str, Any]:
        """Weights, optimizer, schedule and the random generators (dropout continues as it would have)."""
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
                "rng": json.dumps(rng_state())}

    def load(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = int(state["micro_steps"])
        if "rng" in state:  # checkpoints written before it kept torch's alone: those resume without it
            set_rng_state(json.loads(state["rng"]))


def checkpoints_dir(cfg: TrainerConfig) -> str:
    return storage.join(run_dir(cfg), CHECKPOINTS)


def committed_checkpoints(cfg: TrainerConfig) -> list[str]:
    """Checkpoint folders whose trainer state was written (the last file of a checkpoint), oldest first."""
    root = checkpoints_dir(cfg)
    if not storage.exists(root):
        return []
    return [f.rsplit("/", 1)[0] for f in storage.list_files(root, "/" + TRAINER_STATE)]


def save_checkpoint(engine: LocalEngine, state: TrainerState, cfg: TrainerConfig) -> str:
    """The engine (weights, optimizer, schedule) and the trainer state at this step; older ones
    beyond `keep_checkpoints` are removed once this one is committed."""
    import torch

    folder = storage.join(checkpoints_dir(cfg), f"checkpoint-{state.step:08d}")
    buffer = io.BytesIO()
    torch.save(engine.state(), buffer)
    storage.write_bytes_atomic(storage.join(folder, ENGINE_FILE), buffer.getvalue())
    storage.write_bytes_atomic(storage.join(folder, TRAINER_STATE),
                               json.dumps(dataclasses.asdict(state)).encode())
    for old in committed_checkpoints(cfg)[:-max(1, cfg.keep_checkpoints)]:
        storage.remove(old)
    return folder


def load_checkpoint(engine: LocalEngine, folder: str) -> TrainerState:
    """Restore the engine from a checkpoint folder (unpickled with weights_only=True) and return
    its trainer state."""
    import torch

    raw = storage.read_bytes(storage.join(folder, ENGINE_FILE))
    engine.load(torch.load(io.BytesIO(raw), map_location=engine.device, weights_only=True))
    return read_state(folder)


def read_state(folder: str) -> TrainerState:
    """The trainer state of a checkpoint folder, as the next attempt starts from it."""
    return TrainerState.resumed(storage.read_bytes(storage.join(folder, TRAINER_STATE)))


def fit(task: TrainingTask) -> LocalResult:
    """Train (or resume) `task` in this process (`launch.fit` has checked its settings)."""
    import torch

    started = time.time()
    cfg = task.config
    if cfg.use_gpu and not torch.cuda.is_available():
        raise SystemExit("launcher=local with use_gpu=true needs a CUDA GPU in this process; none is visible")
    device = "cuda" if cfg.use_gpu else "cpu"
    files, rows = task.data_files()
    plan = plan_steps(rows, cfg)
    fingerprint = plan_fingerprint(files, rows, cfg, plan)
    found = committed_checkpoints(cfg)
    if found:
        check_resume(read_state(found[-1]), fingerprint, run_dir(cfg))
    accumulation = cfg.num_workers * cfg.grad_accum  # the rows of one step on num_workers ranks
    order = task_order(task, rows)
    log.info("%s: %d rows in %d files -> %d steps of %d rows (launcher=local on %s: %d micro-batches of %d "
             "per step, %d epochs, %d warm-up steps); run %s", task.title, rows, len(files), plan.total_steps,
             plan.rows_per_step, device, accumulation, cfg.micro_batch_size, cfg.epochs, plan.warmup_steps,
             run_dir(cfg))

    prepare_torch(cfg)
    ds_config = deepspeed_config.build_config(
        zero_stage=0, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, world_size=cfg.num_workers,
        lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, bf16=False)
    parts, params, trainable = build_parts(task, ds_config, device, torch.float32, rank=0)
    engine = LocalEngine(parts.module, params, ds_config,
                         deepspeed_config.lr_schedule(plan.total_steps, plan.warmup_steps, cfg.min_lr_ratio,
                                                      cfg.schedule), device, accumulation)
    state = load_checkpoint(engine, found[-1]) if found else TrainerState()
    state.world_size, state.plan = 1, fingerprint
    log.info("%s", f"resumed from {found[-1]} after step {state.step}" if found else "starting from scratch")
    batches = local_micro_batches(files, cfg, order, task.columns, 0, 1,
                                          plan.micro_batches_per_rank * cfg.num_workers,
                                          skip=state.step * accumulation)
    last: list[str] = found[-1:]

    def checkpoint(record: dict[str, Any]) -> None:
        last[:] = [save_checkpoint(engine, state, cfg)]

    peak = peak_flops(torch.cuda.get_device_name()) if cfg.use_gpu else None
    run_steps(engine, task, plan, state, batches,
                      StepContext(0, 1, trainable, peak, started, checkpoint, accumulation))
    return LocalResult(path=run_dir(cfg), checkpoint=CheckpointRef(last[0]) if last else None)
