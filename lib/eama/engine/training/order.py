"""Which rows every optimizer step holds: the step plan, the seeded per-epoch row order, and the
micro-batches cut from it, read by every worker itself (data_loading=local) or streamed by Ray Data.

`training_dataset` / `plan_steps`: rows from Ray Data in a deterministic order (one seeded hash
sort per epoch, keyed on the task's `sort_columns`), cut into blocks of exactly one micro-batch,
so Ray Train's ordered streaming split hands micro-batch j to rank j % world_size. A global step
therefore holds the same rows for any world size (1 worker x 2 accumulation steps == 2 workers
x 1), and resuming means skipping step x grad_accum micro-batches of the shard.
`local_micro_batches` gives a rank the same micro-batches from files it reads itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from typing import Any, Iterator, Sequence

import numpy as np

from eama.engine import deepspeed_config, storage
from eama.engine.training.config import TrainerConfig
from eama.engine.training.task import TrainingTask


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
