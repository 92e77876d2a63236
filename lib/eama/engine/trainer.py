"""The generic trainer: Ray Train workers running DeepSpeed (ZeRO-2 or ZeRO-3) for any task.

A system brings a `TrainingTask` (its data, model, collation, loss and export); the engine does
the rest, the same way for every task:

* `training_dataset` / `plan_steps`: rows from Ray Data in a deterministic order (one seeded hash
  sort per epoch, keyed on the task's `sort_columns`), cut into blocks of exactly one micro-batch,
  so Ray Train's ordered streaming split hands micro-batch j to rank j % world_size. A global step
  therefore holds the same rows for any world size (1 worker x 2 accumulation steps == 2 workers
  x 1), and resuming means skipping step x grad_accum micro-batches of the shard.
* the DeepSpeed config from `deepspeed_config.build_config` (the one builder) and its schedule;
* `StepStats`: the objective, per-group mean row losses and the task's counts, all-reduced per
  optimizer step into the run's metrics (+ MFU on GPU) and a loss PNG. Metrics are one small file
  per checkpoint, RUN/metrics/step-<step>.jsonl with the records since the previous one (S3 cannot
  append); `read_metrics` reads them back in order;
* `save_checkpoint` / `trainer_state` + `load_engine_state`: DeepSpeed's sharded checkpoint inside
  a ray.train.Checkpoint (every rank reports its shard and its random generators' state; Ray merges
  them) plus the trainer state (step, the metrics records not yet in a file, the plan's
  fingerprint); ray.train.get_checkpoint() finds it after a worker failure (FailureConfig) and
  after a relaunch under the same run name. Shards are unpickled with weights_only=True;
* `plan_fingerprint` / `check_resume`: a relaunch resumes only with the data, seed and batch
  geometry its checkpoint was trained with (else one line saying what differs);
* `export_model`: the (ZeRO-3: gathered) full state dict handed to the task's `save_export`, then
  published beside the current export and switched to by a pointer (`exports.publish_export`);
* progress lines (logger 'eama.trainer'): rank 0's are relayed to the driver by a small actor,
  so they show there even when Ray does not forward worker output (log_to_driver=False).

`fit_on_ray(task)` is the driver side (`launchers.fit` picks it, or the local launcher);
`train_loop_per_worker` the worker side; `run_steps` the step loop both launchers share. This
module never imports a system's code (eama.news): tasks come in as objects.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from eama.engine import deepspeed_config, exports, storage

log = logging.getLogger("eama.trainer")

TRAINER_STATE = "trainer_state.json"
DATA_LOADING = ("auto", "local", "stream")
LAUNCHERS = ("ray", "local")
EXPORT_INFO = "eama_export.json"
DS_TAG = "deepspeed"


# ---------------------------------------------------------------- config


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


# ---------------------------------------------------------------- the task interface


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
        keys for every batch). 'tokens' also gives tokens_per_s and, on GPU, MFU."""
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


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class StepPlan:
    rows: int  # rows in the data
    world_size: int
    micro_batches_per_rank: int
    total_steps: int
    warmup_steps: int
    rows_per_step: int  # rows in one optimizer step over all workers


def plan_steps(rows: int, cfg: TrainerConfig) -> StepPlan:
    """Optimizer steps the data gives: every rank gets an equal share of the epochs' rows in whole
    micro-batches; a step takes grad_accum of them on every rank."""
    per_rank = (rows * cfg.epochs // cfg.num_workers) // cfg.micro_batch_size
    steps = per_rank // cfg.grad_accum
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps < 1:
        raise SystemExit(
            f"{rows} rows x {cfg.epochs} epochs give no full step of "
            f"{cfg.num_workers} workers x {cfg.micro_batch_size} rows x {cfg.grad_accum} accumulation"
        )
    return StepPlan(rows, cfg.num_workers, per_rank, steps,
                    deepspeed_config.warmup_steps_for(steps, cfg.warmup_ratio),
                    rows_per_step=cfg.num_workers * cfg.micro_batch_size * cfg.grad_accum)


def steps_per_epoch(rows: int, cfg: TrainerConfig) -> int:
    """Optimizer steps of one epoch as the plan counts them (the run's steps over its epochs, rounded
    up), so per-epoch evaluations and checkpoints fall on the last step, not one short of it."""
    return max(1, math.ceil(plan_steps(rows, cfg).total_steps / cfg.epochs))


# ---------------------------------------------------------------- resume: the same plan or none

# what decides the rows of every optimizer step: a resume needs the checkpoint's (epochs and
# max_steps only lengthen or shorten the same sequence of steps)
RESUME_KEYS = ("data", "seed", "shuffle", "group_by_length", "num_workers", "micro_batch_size", "grad_accum")


def plan_fingerprint(files: Sequence[str], rows: int, cfg: TrainerConfig, plan: StepPlan) -> dict[str, Any]:
    """What every checkpoint records of the run's plan: the data (file names relative to their
    common folder and sizes, as a digest; counts), the order settings, the batch geometry, the epochs
    and the planned steps."""
    sizes = storage.parallel_map(storage.file_size, list(files))
    paths = [storage.strip(f) for f in files]
    base = os.path.dirname(os.path.commonprefix(paths)) if paths else ""
    named = [[p[len(base):].lstrip("/"), n] for p, n in zip(paths, sizes)]
    digest = hashlib.sha256(json.dumps(named).encode()).hexdigest()[:16]
    return {"data": {"files": len(files), "rows": rows, "bytes": sum(sizes), "digest": digest},
            **{k: getattr(cfg, k) for k in RESUME_KEYS[1:]}, "epochs": cfg.epochs, "total_steps": plan.total_steps}


def describe_change(key: str, old: Any, new: Any) -> str:
    if key != "data":
        return f"{key} {old} -> {new}"
    counts = ("files", "rows", "bytes")
    if old and all(old.get(k) == new[k] for k in counts):
        return "the data files' names or sizes changed"
    was = ", ".join(f"{old.get(k)} {k}" for k in counts) if old else "unknown"
    return f"data {was} -> {', '.join(f'{new[k]} {k}' for k in counts)}"


def check_resume(saved: TrainerState, plan: Mapping[str, Any], run: str) -> None:
    """Refuse (SystemExit, one line) to resume a checkpoint whose plan differs from this launch's
    in what decides each step's rows, so a resume never trains some rows twice and others never."""
    if not saved.plan:
        log.warning("%s: its checkpoint at step %d records no plan (an older eama wrote it); resuming "
                    "without checking the data and settings", run, saved.step)
        return
    changes = [describe_change(k, saved.plan.get(k), plan[k]) for k in RESUME_KEYS if saved.plan.get(k) != plan[k]]
    if changes:
        raise SystemExit(
            f"cannot resume {run} from its checkpoint at step {saved.step}: the plan changed since ({'; '.join(changes)}), "
            f"so its steps would hold other rows (some trained twice, some never); relaunch with its data and "
            f"settings, or start fresh under another run_name (or delete {run})")
    if saved.plan.get("total_steps") != plan["total_steps"]:
        log.info("%s: the plan now has %s steps (the checkpoint's had %s); the same data order, the learning-rate "
                 "schedule follows the new length", run, plan["total_steps"], saved.plan.get("total_steps"))


def newest_checkpoint_state(root: str) -> TrainerState | None:
    """The trainer state of the newest checkpoint-<step> folder under `root` that has one (the one a
    relaunch resumes from); None when there is none."""
    try:
        entries = storage.filesystem(root).ls(storage.strip(root), detail=False)
    except FileNotFoundError:
        return None
    names = sorted((e.rstrip("/").rsplit("/", 1)[-1] for e in entries), reverse=True)
    for name in (n for n in names if re.fullmatch(r"checkpoint-\d{8}", n)):
        try:
            return TrainerState.resumed(storage.read_bytes(storage.join(root, name, TRAINER_STATE)))
        except FileNotFoundError:  # not committed
            continue
    return None


ORDER_BITS = 40  # sort key: epoch * 2**40 + a 40-bit key of the row (its seeded hash, or bucket | length | hash)
LENGTH_BITS = 12  # group_by_length: row lengths are capped at 4095 in the key
ROWS_PER_SORT_PARTITION = 50_000


@dataclasses.dataclass(frozen=True)
class RowOrder:
    """The seeded per-epoch order of the rows, as a sort key per row.

    Without grouping the key is a 40-bit hash of (seed, epoch, the row's `key_columns`). With
    `length_columns` (group_by_length) the hash's top `bucket_bits` put the row in one of
    2**bucket_bits random buckets and, inside a bucket, rows sort by length (the summed lengths of
    `length_columns`: list items, or words of a string), the rest of the hash breaking ties; so a
    micro-batch holds rows of similar length (less padding), and the buckets, in random order,
    keep each epoch's mix. The key depends on the row alone, never on how rows are split into
    blocks, workers or loading paths."""

    seed: int
    key_columns: tuple[str, ...]
    length_columns: tuple[str, ...] = ()
    bucket_bits: int = 0

    def keys(self, table: Any, epoch: int) -> list[int]:
        cols = [table.column(c).to_pylist() for c in self.key_columns]
        joined = ["\0".join(str(v) for v in values) for values in zip(*cols)]
        hashes = [int.from_bytes(hashlib.blake2b(f"{self.seed}:{epoch}:{k}".encode(), digest_size=8).digest(), "big")
                  >> (64 - ORDER_BITS) for k in joined]
        if not self.length_columns:
            return hashes
        low = ORDER_BITS - self.bucket_bits - LENGTH_BITS
        lengths = row_lengths(table, self.length_columns)
        return [(h >> (ORDER_BITS - self.bucket_bits) << (ORDER_BITS - self.bucket_bits))
                | (min(n, (1 << LENGTH_BITS) - 1) << low) | (h & ((1 << low) - 1))
                for h, n in zip(hashes, lengths)]


def row_order(cfg: TrainerConfig, rows: int, key_columns: Sequence[str], length_columns: Sequence[str]) -> RowOrder:
    """The order `cfg` asks for over `rows` rows an epoch: with group_by_length, buckets of
    group_by_length global micro-batches or fewer (in expectation)."""
    bits = 0
    if cfg.group_by_length:
        if not length_columns:
            raise SystemExit("group_by_length: this task declares no length_columns")
        window = cfg.group_by_length * cfg.micro_batch_size * cfg.num_workers
        bits = min(ORDER_BITS - LENGTH_BITS - 8, math.ceil(math.log2(max(1.0, rows / window))))
    return RowOrder(cfg.seed, tuple(key_columns), tuple(length_columns) if cfg.group_by_length else (), bits)


def task_order(task: TrainingTask, rows: int) -> RowOrder:
    """The seeded order of the task's rows; length columns the data lacks are left out."""
    lengths = [c for c in task.length_columns if task.columns is None or c in task.columns]
    return row_order(task.config, rows, task.sort_columns, lengths)


def row_lengths(table: Any, columns: Sequence[str]) -> list[int]:
    """Per row, the summed lengths of `columns`: a list's items, a string's words, 0 for null."""
    total = [0] * table.num_rows
    for c in columns:
        for i, v in enumerate(table.column(c).to_pylist()):
            total[i] += len(v.split()) if isinstance(v, str) else len(v) if v is not None else 0
    return total


def training_dataset(files: Sequence[str], cfg: TrainerConfig, rows: int, order: RowOrder,
                     columns: Sequence[str] | None = None) -> Any:
    """One pass over `epochs` copies of the rows, each in its own seeded order (or the files'
    order with shuffle=false), in blocks of exactly one micro-batch.

    The order is a sort on `order`'s per-row keys, so it does not depend on how Ray Data splits
    files into blocks; the data is read once (a union of per-epoch reads would run one
    file-listing task per copy, which starves a small cluster), and the sort's partitions are given
    as key ranges sized from the row count (Ray's default is 200 reduce tasks)."""
    import ray.data

    ds = ray.data.read_parquet(list(files), columns=list(columns) if columns is not None else None)
    if cfg.shuffle:
        if not order.key_columns:
            raise ValueError("shuffle=true needs the task's sort_columns (the columns that identify a row)")
        ds = ds.map_batches(epoch_order, batch_format="pyarrow", fn_kwargs={"epochs": cfg.epochs, "order": order})
        ds = ds.sort("order", boundaries=sort_boundaries(rows, cfg.epochs)).drop_columns(["order"])
    return ds.repartition(target_num_rows_per_block=cfg.micro_batch_size, strict=True)


def epoch_order(batch: Any, epochs: int, order: RowOrder) -> Any:
    """Each row once per epoch, with `order` = epoch * 2**40 + the row's key in that epoch."""
    import pyarrow as pa

    copies = []
    for epoch in range(epochs):
        keys = [(epoch << ORDER_BITS) + k for k in order.keys(batch, epoch)]
        copies.append(batch.append_column("order", pa.array(keys, pa.int64())))
    return pa.concat_tables(copies)


def sort_boundaries(rows: int, epochs: int) -> list[int]:
    """Key-range boundaries: about ROWS_PER_SORT_PARTITION rows per partition, epochs apart."""
    per_epoch = max(1, math.ceil(rows / ROWS_PER_SORT_PARTITION))
    span = 1 << ORDER_BITS
    bounds = [e * span + k * span // per_epoch for e in range(epochs) for k in range(per_epoch)][1:]
    return bounds or [epochs * span]  # one boundary past every key: Ray needs at least one


def local_micro_batches(files: Sequence[str], cfg: TrainerConfig, order: RowOrder,
                        columns: Sequence[str] | None, rank: int, world: int, per_rank: int, skip: int
                        ) -> Iterator[dict[str, np.ndarray]]:
    """data_loading=local: the same order as `training_dataset` (epoch by epoch, rows sorted on
    `order`'s keys; the files' order with shuffle=false), cut into micro-batches, micro-batch j going to
    rank j % world, read by the worker itself (no Ray Data split coordinator polling beside it)."""
    import pyarrow as pa

    table = pa.concat_tables([storage.read_table(f, list(columns) if columns is not None else None)
                              for f in files], promote_options="permissive")
    n = table.num_rows
    if cfg.shuffle:
        orders = (sorted(range(n), key=order.keys(table, e).__getitem__)
                  for e in range(cfg.epochs))
    else:
        orders = (range(n) for _ in range(cfg.epochs))
    sequence = itertools.chain.from_iterable(orders)  # the epochs one after another, as the sort gives them
    for j in itertools.count():
        take = list(itertools.islice(sequence, cfg.micro_batch_size))
        mine = j // world
        if len(take) < cfg.micro_batch_size or mine >= per_rank:
            return
        if j % world == rank and mine >= skip:
            chunk = table.take(pa.array(take))
            yield {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in chunk.column_names}


def use_local_data(files: Sequence[str], cfg: TrainerConfig) -> bool:
    if cfg.data_loading != "auto":
        return cfg.data_loading == "local"
    return sum(storage.file_size(f) for f in files) <= cfg.local_data_bytes


def micro_batches(shard: Any, micro_batch_size: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
    """This rank's micro-batches in order, after skipping the first `skip` (already trained on)."""
    for k, batch in enumerate(shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy",
                                                 drop_last=True, prefetch_batches=2)):
        if k >= skip:
            yield batch


# ---------------------------------------------------------------- metrics


class StepStats:
    """Sums over one optimizer step's micro-batches on this rank; `reduce` makes them global."""

    def __init__(self, groups: int) -> None:
        self.group_loss = [0.0] * groups
        self.group_rows = [0] * groups
        self.objective = 0.0
        self.counts: dict[str, float] = {}

    def add(self, loss: Any, row_losses: Any, group_ids: Any, counts: Mapping[str, int]) -> None:
        self.objective += float(loss.detach())
        if group_ids is not None and self.group_loss:
            ids = group_ids.tolist() if hasattr(group_ids, "tolist") else list(group_ids)
            for g, l in zip(ids, row_losses.tolist()):
                self.group_loss[g] += l
                self.group_rows[g] += 1
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def reduce(self, device: Any, world_size: int, grad_accum: int, group_names: Sequence[str]) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        keys = sorted(self.counts)
        n = len(self.group_loss)
        v = torch.tensor(self.group_loss + self.group_rows + [self.objective] + [self.counts[k] for k in keys],
                         dtype=torch.float64, device=device)
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(v)
        v = v.tolist()
        out: dict[str, Any] = {"loss": v[2 * n] / (world_size * grad_accum)}
        out.update({k: int(x) for k, x in zip(keys, v[2 * n + 1:])})
        for i, name in enumerate(group_names):
            out[f"loss/{name}"] = v[i] / v[n + i] if v[n + i] else None
            out[f"rows/{name}"] = int(v[n + i])
        return out


METRICS = "metrics"  # RUN/metrics/step-<last step>.jsonl: the records since the previous file
LEGACY_METRICS = "metrics.jsonl"  # the whole history in one file, as runs wrote it before
METRICS_FILE = re.compile(r"step-(\d{8})\.jsonl")


def metrics_files(directory: str) -> list[tuple[int, str]]:
    """(last step, path) of the run's metrics files, in step order."""
    folder = storage.join(directory, METRICS)
    try:
        paths = storage.list_files(folder, ".jsonl")
    except FileNotFoundError:
        return []
    found = [(METRICS_FILE.fullmatch(p.rsplit("/", 1)[-1]), p) for p in paths]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def write_metrics(records: Sequence[dict[str, Any]], directory: str) -> None:
    """`records` (consecutive optimizer steps, one line each) as RUN/metrics/step-<last>.jsonl:
    a new small file per checkpoint, never a rewrite of the history."""
    if records:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        path = storage.join(directory, METRICS, f"step-{records[-1]['step']:08d}.jsonl")
        storage.write_bytes_atomic(path, text.encode())


def sync_metrics(directory: str, state: TrainerState) -> None:
    """Rank 0, as an attempt starts from `state`: make the metrics on storage hold exactly steps
    1..state.step, each once. Files past the checkpoint (an attempt that went on without committing
    another) and a legacy metrics.jsonl go; the checkpoint's pending records are (re)written."""
    for last, path in metrics_files(directory):
        if last > state.step:
            storage.remove(path)
    write_metrics(state.pending, directory)
    storage.remove(storage.join(directory, LEGACY_METRICS))


def read_metrics(directory: str) -> list[dict[str, Any]]:
    """The run's records, one per optimizer step in order (a legacy metrics.jsonl first); [] when
    there are none yet."""
    paths = [storage.join(directory, LEGACY_METRICS)] + [p for _, p in metrics_files(directory)]
    records: list[dict[str, Any]] = []
    for path in paths:
        try:
            raw = storage.read_bytes(path).decode()
        except FileNotFoundError:
            continue
        for line in raw.splitlines():
            if line.strip():
                record = json.loads(line)
                if not records or record["step"] > records[-1]["step"]:  # a step once, even if files overlap
                    records.append(record)
    return records


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


def run_summary(cfg: TrainerConfig) -> dict[str, Any]:
    """What a training job prints at the end: steps, first / last loss, time, every evaluation and
    the step the export holds (the best `select_metric`, else the last)."""
    history = read_metrics(run_dir(cfg))
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    key = f"eval/{cfg.select_metric}"
    best = max((r for r in evals if key in r), key=lambda r: r[key], default=None) if cfg.select_metric else None
    return {
        "run": run_dir(cfg),
        "steps": history[-1]["step"] if history else 0,
        "loss_first": round(history[0]["loss"], 4) if history else None,
        "loss_last": round(history[-1]["loss"], 4) if history else None,
        "train_seconds": round(sum(r.get("step_seconds", 0.0) for r in history), 1),
        "dev": [{k.removeprefix("eval/"): round(v, 4) for k, v in r.items() if k.startswith("eval/")} | {"step": r["step"]}
                for r in evals],
        "selected_step": best["step"] if best else (history[-1]["step"] if history else 0),
        "export": export_dir(cfg) if cfg.export else None,
        "loss_curves": storage.join(run_dir(cfg), "loss_curves.png"),
    }


def plot_losses(history: list[dict[str, Any]], path: str, group_names: Sequence[str] = (),
                title: str = "training") -> None:
    """A PNG of the loss and each group's loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] for r in history], label="loss (objective)", color="black", linewidth=2)
    for name in group_names:
        pts = [(r["step"], r[f"loss/{name}"]) for r in history if r.get(f"loss/{name}") is not None]
        if pts:
            ax.plot(*zip(*pts), label=name, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())


# Dense bf16 peak of one GPU (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "V100": 125e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def trainable_params(model: Any) -> int:
    """Trainable parameter count (ZeRO-3 partitioned parameters report their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def mfu(tokens_per_s: float, trainable: int, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation with the 6·N FLOPs-per-token rule (trainable parameters; frozen
    parts' forward and attention's quadratic term are left out)."""
    return 6.0 * trainable * tokens_per_s / (peak * world_size)


def clock(seconds: float) -> str:
    """mm:ss (h:mm:ss from an hour on); '?' when unknown (infinite)."""
    if seconds == float("inf"):
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """Rank 0's step lines: every step for the first `first` steps, then at most every `every` s
    (and the last step). The pace (s/step, hence the ETA) is this attempt's since its first step,
    which also waits for the data pipeline to start; until a second step it is the first's time."""

    def __init__(self, total_steps: int, start_step: int, first: int = 3, every: float = 10.0):
        self.total, self.start, self.first, self.every = total_steps, start_step, first, every
        self.began = time.perf_counter()
        self.first_done: float | None = None
        self.last = -math.inf

    def due(self, step: int) -> bool:
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = now
        return step <= self.first or step == self.total or now - self.last >= self.every

    def line(self, step: int, record: dict[str, Any]) -> str:
        now = time.perf_counter()
        self.last = now
        done = step - self.start
        first_done = self.first_done if self.first_done is not None else now
        per_step = (now - first_done) / (done - 1) if done > 1 else now - self.began
        return (f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{per_step:.2f} s/step ETA {clock(per_step * (self.total - step))}")


# ---------------------------------------------------------------- progress relay to the driver


class ProgressRelay:
    """A Ray actor (num_cpus=0) holding log lines from the workers until the driver drains them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


class RelayHandler(logging.Handler):
    """Sends each record's message to the relay actor (fire and forget; order is kept)."""

    def __init__(self, relay: Any):
        super().__init__(logging.INFO)
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.relay.emit.remote(self.format(record))
        except Exception:  # the driver went away: the step must not fail for a log line
            self.handleError(record)


class DriverEcho:
    """On the driver: a thread that logs the relayed lines as 'eama.trainer' records while fit runs."""

    def __init__(self, relay: Any, interval: float = 0.5):
        self.relay, self.interval = relay, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="eama-trainer-progress", daemon=True)

    def __enter__(self) -> "DriverEcho":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self._drain()

    def _drain(self) -> bool:
        import ray

        try:
            lines = ray.get(self.relay.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the relay is gone; progress lines are best effort
            return False
        for line in lines:
            log.info("%s", line)
        return True

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            if not self._drain():
                return


def show_progress(stream: Any = None) -> None:
    """For jobs that configure no logging: print 'eama.trainer' INFO lines (the driver's plan and
    the workers' relayed progress) to `stream` (stderr by default)."""
    logger = logging.getLogger("eama.trainer")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_eama_progress", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s train: %(message)s", "%H:%M:%S"))
        handler._eama_progress = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def worker_logging(relay: Any = None) -> None:
    """Send eama's INFO logs to the worker's stderr (Ray forwards it to the driver with
    log_to_driver); with a relay, 'eama.trainer' lines go to the driver through it instead."""
    root = logging.getLogger("eama")
    root.setLevel(logging.INFO)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False  # Ray Train's own root handler would print every line twice
    if relay is not None:
        for h in [h for h in log.handlers if isinstance(h, RelayHandler)]:
            log.removeHandler(h)
        log.addHandler(RelayHandler(relay))
        log.propagate = False  # not twice on the driver when Ray forwards worker output too


# ---------------------------------------------------------------- model, checkpoints and export


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


@dataclasses.dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    pending: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metrics records not yet in a metrics file
    world_size: int = 0
    attempts: int = 1
    best_value: float | None = None  # select_metric's best value so far, and its step
    best_step: int = 0
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)  # plan_fingerprint of the run (checked on resume)

    @classmethod
    def resumed(cls, raw: str | bytes) -> "TrainerState":
        """The state a checkpoint's trainer_state.json holds, as the next attempt starts from it
        (attempts + 1). A checkpoint written before metrics files held the whole `history`: it
        becomes the records to write."""
        obj = json.loads(raw)
        if "history" in obj:
            obj["pending"] = obj.pop("history")
        state = cls(**obj)
        state.attempts += 1
        return state


def rng_state() -> dict[str, Any]:
    """This process's random generators (Python, numpy, torch CPU and CUDA) as JSON-able data."""
    import base64
    import random

    import torch

    def b64(t: Any) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": b64(torch.get_rng_state()),
            "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(saved: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned, so dropout and sampling continue as they would have."""
    import base64
    import random

    import torch

    def tensor(text: str) -> Any:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor(saved["torch"]))
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in saved["cuda"]])


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


def save_checkpoint(engine: Any, state: TrainerState, metrics: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shard and its random generators' state into a temporary
    folder and reports it; Ray Train merges the folders into one checkpoint in storage and keeps the
    newest `keep_checkpoints`. Returns once the checkpoint is committed, so a failure after this
    call resumes from it."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    with tempfile.TemporaryDirectory(prefix="eama-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        with open(os.path.join(tmp, rng_file(rank)), "w") as fh:
            json.dump(rng_state(), fh)
        if rank == 0:
            with open(os.path.join(tmp, TRAINER_STATE), "w") as fh:
                json.dump(dataclasses.asdict(state), fh)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{state.step:08d}")
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


def trainer_state(ckpt: Any) -> TrainerState:
    """The trainer state stored in checkpoint `ckpt` (a fresh one for None), read without
    downloading the shards."""
    if ckpt is None:
        return TrainerState()
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{TRAINER_STATE}") as fh:
        return TrainerState.resumed(fh.read())


def safe_checkpoint_engine(engine: Any) -> Any:
    """DeepSpeed's torch checkpoint engine, but unpickling with torch.load(weights_only=True):
    besides tensors and containers only DeepSpeed's ZeRO-stage enum, loss scalers and fragment
    addresses may load."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # two ints in ZeRO-1/2 optimizer shards

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(engine._config)


def load_engine_state(engine: Any, ckpt: Any, rank: int) -> None:
    """Weights, optimizer and schedule of every rank's shard from checkpoint `ckpt` (unpickled
    with weights_only=True), and this rank's random generators (when the checkpoint has them)."""
    engine.checkpoint_engine = safe_checkpoint_engine(engine)
    with ckpt.as_directory() as path:
        engine.load_checkpoint(path, tag=DS_TAG)
        rng = os.path.join(path, rng_file(rank))
        if os.path.exists(rng):
            with open(rng) as fh:
                set_rng_state(json.load(fh))


def gather_state_dict(engine: Any, rank: int) -> dict[str, Any] | None:
    """The full model state dict on rank 0 (None elsewhere); every rank must call it."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # gathers the shards layer by layer
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if rank == 0 else None


def export_model(engine: Any, task: TrainingTask, run: str, rank: int,
                 info: dict[str, Any]) -> str | None:
    """The task's consolidated export (+ eama_export.json with `info`) published as the export of
    the run folder `run` (local or s3://; exports.publish_export: beside the old one, then a pointer
    switch). Every rank must call it; rank 0 returns the new export folder."""
    import torch.distributed as dist

    state_dict = gather_state_dict(engine, rank)
    dest = None
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="eama-export-") as tmp:
            task.save_export(engine.module, state_dict, tmp)
            with open(os.path.join(tmp, EXPORT_INFO), "w") as fh:
                json.dump(info, fh, indent=2, sort_keys=True)
            dest = exports.publish_export(tmp, run, info["step"])
    if dist.is_initialized():
        dist.barrier()
    return dest


# ---------------------------------------------------------------- the worker loop


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


def export_info(task: TrainingTask, cfg: TrainerConfig, state: TrainerState, world: int) -> dict[str, Any]:
    info = {"run_name": cfg.run_name, "step": state.step, "launcher": cfg.launcher,
            "zero_stage": cfg.zero_stage if cfg.launcher == "ray" else None, "world_size": world,
            **task.export_info()}
    if cfg.select_metric:
        info.update(selected_on=cfg.select_metric, selected_value=state.best_value)
    return info


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


# ---------------------------------------------------------------- the driver


WORKER_ENV = ("DS_ACCELERATOR", "EAMA_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


def worker_env(cfg: TrainerConfig) -> dict[str, str]:
    """Settings the workers need from the driver's environment (credentials are not copied: they
    come from the cluster's own environment or instance role)."""
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    return env


def fit_on_ray(task: TrainingTask) -> Any:
    """The Ray launcher (`launchers.fit` checks the settings first): run (or resume, when
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
