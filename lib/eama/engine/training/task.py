"""The task interface: what a system brings to the trainer (`TrainingTask`, `ModelParts`), and the
helpers a task's code calls on a worker (its share of the evaluation rows, a sum over ranks,
gradient checkpointing, the device and dtype to build its model in).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from eama.engine.training.config import TrainerConfig, validate


@dataclasses.dataclass
class ModelParts:
    """What a task's `build_model` returns."""

    module: Any  # the torch.nn.Module deepspeed.initialize wraps
    parameters: Iterable[Any] | None = None  # what the optimizer trains; None = every requires_grad parameter
    keep_alive: Any = None  # held for the whole run (e.g. transformers' HfDeepSpeedConfig under ZeRO-3)


class TrainingTask(abc.ABC):
    """One system's training: data, model, collation, loss and export. The engine does the rest.

    The instance is built on the driver (from `config` only) and a copy is sent to every worker,
    where `build_model` runs first; it may keep what collate / loss / save_export need (a
    tokenizer, a processor) on `self`."""

    #: columns hashed (with seed and epoch) for the deterministic order; together unique per row
    sort_columns: Sequence[str] = ()
    #: columns whose lengths (a list's items, a string's words) sum to a row's length (group_by_length);
    #: those not among `columns` (absent from the data) are left out
    length_columns: Sequence[str] = ()
    #: columns read from the data files (None = all)
    columns: Sequence[str] | None = None
    #: names of the row groups whose losses are logged apart (`loss` returns indexes into it)
    group_names: Sequence[str] = ()
    #: title of the loss PNG
    title: str = "training"

    def __init__(self, config: TrainerConfig):
        self.config = config

    def validate(self) -> None:
        """Driver side, before anything starts: raise SystemExit on unusable settings."""
        validate(self.config)

    @abc.abstractmethod
    def data_files(self) -> tuple[list[str], int]:
        """Driver side: the Parquet files to train on (local or s3://) and their total row count."""

    @abc.abstractmethod
    def build_model(self, ds_config: dict[str, Any], device: str, dtype: Any) -> ModelParts:
        """Worker side: the model to train, on `device` in `dtype`. `ds_config` is the DeepSpeed
        config the engine will use (under ZeRO-3 a large model is built inside zero.Init or an
        HfDeepSpeedConfig so no rank holds it whole). `config.gradient_checkpointing` is applied by
        the engine (`enable_gradient_checkpointing`) unless the module already checkpoints."""

    @abc.abstractmethod
    def collate(self, rows: dict[str, np.ndarray]) -> Any:
        """One micro-batch of rows (numpy columns) -> the batch object `loss` takes."""

    @abc.abstractmethod
    def loss(self, engine: Any, batch: Any) -> tuple[Any, Any, Any]:
        """(scalar loss to backpropagate, per-row losses [B] detached, group ids [B] or None).

        `engine` is the DeepSpeed engine (call it like the module). The loss should not depend on
        how rows are spread over ranks and accumulation steps (e.g. a sum over rows divided by
        micro_batch_size): DeepSpeed averages it over both."""

    def counts(self, batch: Any) -> Mapping[str, int]:
        """Quantities summed over a step's micro-batches and ranks into the step's metrics (the same
        keys for every batch). 'tokens' also gives tokens_per_s and, on GPU, MFU; a pair 'NAME:n' /
        'NAME:d' is logged as the ratio NAME (a keep rate)."""
        return {}

    @abc.abstractmethod
    def save_export(self, module: Any, state_dict: dict[str, Any], directory: str) -> None:
        """Rank 0: write the consolidated model (`state_dict` is full, also under ZeRO-3) to the
        local `directory`, which the engine then publishes as OUTPUT/RUN/export."""

    def export_info(self) -> dict[str, Any]:
        """Extra keys for the export's eama_export.json."""
        return {}

    def evaluate(self, engine: Any, step: int) -> Mapping[str, float] | None:
        """Optional: metrics after step `step` (every eval_every steps and at the end), run under
        torch.no_grad with the engine in eval mode. Called on every rank, because a ZeRO-3 forward
        needs all of them; the dict rank 0 returns goes into the run's metrics as eval/<key>."""
        return None


def rank_share(rows: Sequence[Any]) -> tuple[list[Any], int, int]:
    """For a task's evaluate: (this rank's rows, i.e. rows[rank::world], rank, world size)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return list(rows[rank::world]), rank, world


def sum_over_ranks(tensor: Any, device: Any) -> Any:
    """The element-wise sum of `tensor` over all ranks (itself when there is one)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.to(device)
        dist.all_reduce(tensor)
    return tensor


def enable_gradient_checkpointing(module: Any) -> None:
    """Activation checkpointing on a Hugging Face-style module (gradient_checkpointing_enable);
    a no-op when it is already on."""
    if getattr(module, "is_gradient_checkpointing", False):
        return
    if not hasattr(module, "gradient_checkpointing_enable"):
        raise ValueError(f"gradient_checkpointing=true, but {type(module).__name__} has no "
                         "gradient_checkpointing_enable(); the task's build_model must checkpoint it")
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(module, "config", None) is not None and hasattr(module.config, "use_cache"):
        module.config.use_cache = False


def device_and_dtype(ds_config: dict[str, Any]) -> tuple[str, Any]:
    """Where and in what precision a worker builds its model: bf16 on GPU, fp32 on CPU."""
    import torch

    bf16 = ds_config["bf16"]["enabled"]
    return ("cuda" if bf16 else "cpu"), (torch.bfloat16 if bf16 else torch.float32)
