"""The one builder of the DeepSpeed config, and the learning-rate schedule that goes with it.

Everything DeepSpeed is told comes from `build_config`: ZeRO stage, precision (bf16 on GPU, fp32 on
CPU), batch geometry, clipping, optional CPU offload, and torch's fused AdamW (DeepSpeed's `torch_adam`)
so that no C++ optimizer op is compiled. The schedule (linear warm-up then cosine or linear decay) is a torch
LambdaLR that deepspeed.initialize builds from the optimizer and saves in every checkpoint.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable


def build_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    max_grad_norm: float = 1.0,
    bf16: bool = False,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    param_persistence_threshold: int | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config dict for full-parameter training with ZeRO stage 0-3."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError("offload_params needs zero_stage=3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs zero_stage >= 1")
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": bf16,  # overlapping only pays off with a GPU's streams
        "reduce_bucket_size": 5e7,
    }
    if zero_stage == 3:
        zero.update({
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_prefetch_bucket_size": 5e7,
        })
        if param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = int(param_persistence_threshold)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bf16}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bf16}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            # torch's fused AdamW: one pass over each flat partition (on CPU ~10x faster than the
            # per-op update, which costs more than a base-size encoder's forward and backward)
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                       "torch_adam": True, "fused": True},
        },
        # A torch optimizer with offload: DeepSpeed would otherwise insist on its compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # eama logs its own metrics
        "wall_clock_breakdown": False,
    }


SCHEDULES = ("cosine", "linear")


def lr_ratio(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0, shape: str = "cosine") -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warm-up
    to 1 over `warmup_steps`, then cosine or linear decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def lr_schedule(total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
                shape: str = "cosine") -> Callable[[Any], Any]:
    """What deepspeed.initialize(lr_scheduler=...) takes: optimizer -> LambdaLR with `lr_ratio`
    (each parameter group's own learning rate is scaled by it)."""

    def make(optimizer: Any) -> Any:
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, functools.partial(lr_ratio, total_steps=total_steps, warmup_steps=warmup_steps,
                                                     min_ratio=min_ratio, shape=shape))

    return make


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0
