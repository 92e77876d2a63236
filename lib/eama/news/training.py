"""Multitask alignment training: Ray Train workers running DeepSpeed (ZeRO-3 by default).

The pieces, each small and testable alone:

* `training_dataset` / `plan_steps`: task rows from Ray Data in a deterministic order (one seeded
  shuffle per epoch), cut into blocks of exactly one micro-batch, so Ray Train's ordered streaming
  split hands micro-batch j to rank j % world_size. A global step therefore holds the same rows
  for any world size (1 worker x 2 accumulation steps == 2 workers x 1), and resuming means
  skipping step x grad_accum micro-batches of the shard.
* `Collator`: the model's processor (models.encode) over decoded images and prompts wrapped by
  models.format_prompt, with the target + eos appended; labels cover the target tokens only
  (left padding puts them at the end of every row).
* `weighted_loss`: per-row mean token loss x (row weight x task weight), summed over the
  micro-batch and divided by its size, so gradients do not depend on how rows are spread over
  ranks; per-task means are logged.
* `save_checkpoint` / `trainer_state` + `load_engine_state`: DeepSpeed's sharded checkpoint
  inside a ray.train.Checkpoint (every rank reports its shard; Ray merges them), plus the trainer
  state (step, loss history); ray.train.get_checkpoint() finds it after a worker failure and after
  a relaunch under the same run name.
* `export_model`: the ZeRO-3 shards gathered into one Hugging Face model (safetensors) + processor
  that models.load_model reads.
* `train_loop_per_worker` ties them together; `fit` is the driver side.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

from eama.engine import deepspeed_config, images, schema, storage
from eama.news import prompts

log = logging.getLogger("eama.training")

TRAINER_STATE = "trainer_state.json"
DS_TAG = "deepspeed"
VISION_MODULES = ("vision_tower", "vision_model")
IGNORE = -100


@dataclasses.dataclass
class TrainConfig:
    """train_alignment settings. Learning-rate defaults follow LLaVA-1.5's recipe for a 7B model."""

    data: str = ""  # task rows from build_alignment_data: directory, file or glob, local or s3://
    model: str = "tiny-llava"  # preset, hub id, local path or s3:// URI
    output: str = "runs"  # storage root, local or s3://; the run lives in OUTPUT/RUN_NAME
    run_name: str = "alignment"  # a relaunch with the same name resumes from its last checkpoint
    num_workers: int = 2  # one per GPU (or per CPU slot without GPUs)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # keep CPUs free for Ray Data's read tasks on small machines
    zero_stage: int = 3
    micro_batch_size: int = 2  # rows per worker per forward pass
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0 = as many as the epochs give
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    task_weights: str = "sentence_selection=1,entity_selection=1,captioning=1"
    freeze_vision: bool = True  # EAMA trains connector + language model
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    param_persistence_threshold: int = -1  # ZeRO-3: params below this many elements stay whole; -1 = DeepSpeed's
    shuffle: bool = True  # one seeded global shuffle per epoch
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps (and at the end); 0 = never (benchmarks)
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    export: bool = True
    trust_remote_code: bool = False
    # Test hook: rank `fail_rank` (-1 = last) exits hard after step `fail_at_step`, once: the
    # marker file `fail_marker` records that it happened.
    fail_at_step: int = 0
    fail_rank: int = -1
    fail_marker: str = ""


def parse_task_weights(spec: str) -> dict[str, float]:
    """'sentence_selection=1,captioning=0.5' -> weights of all tasks (unnamed ones get 1)."""
    weights = {t: 1.0 for t in schema.TASK_NAMES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in weights or not value:
            raise ValueError(f"task_weights: expected task=weight with a task in {schema.TASK_NAMES}, got {part!r}")
        weights[name.strip()] = float(value)
    return weights


def validate(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise SystemExit("train_alignment needs --data (task rows from build_alignment_data)")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.run_name):
        raise SystemExit(f"run_name may hold letters, digits, '_', '-' and '.', got {cfg.run_name!r}")
    if min(cfg.num_workers, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs) < 1 or cfg.checkpoint_every < 0:
        raise SystemExit("num_workers, micro_batch_size, grad_accum and epochs must be >= 1, checkpoint_every >= 0")
    if cfg.epochs > 1 and not cfg.shuffle:
        raise SystemExit("epochs > 1 needs shuffle=true (each epoch is a seeded order of the rows)")
    parse_task_weights(cfg.task_weights)


def run_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.output, cfg.run_name)


def export_dir(cfg: TrainConfig) -> str:
    return storage.join(run_dir(cfg), "export")


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class StepPlan:
    rows: int  # task rows in the data
    world_size: int
    micro_batches_per_rank: int
    total_steps: int
    warmup_steps: int
    rows_per_step: int  # rows in one optimizer step over all workers


def plan_steps(rows: int, cfg: TrainConfig) -> StepPlan:
    """Optimizer steps the data gives: every rank gets an equal share of the epochs' rows in whole
    micro-batches; a step takes grad_accum of them on every rank."""
    per_rank = (rows * cfg.epochs // cfg.num_workers) // cfg.micro_batch_size
    steps = per_rank // cfg.grad_accum
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps < 1:
        raise SystemExit(
            f"{rows} task rows x {cfg.epochs} epochs give no full step of "
            f"{cfg.num_workers} workers x {cfg.micro_batch_size} rows x {cfg.grad_accum} accumulation"
        )
    return StepPlan(rows, cfg.num_workers, per_rank, steps,
                    deepspeed_config.warmup_steps_for(steps, cfg.warmup_ratio),
                    rows_per_step=cfg.num_workers * cfg.micro_batch_size * cfg.grad_accum)


def task_files(data: str) -> tuple[list[str], int]:
    """The task shards under `data` (checked against the TASK contract) and their row count."""
    files = storage.list_files(data)
    if not files:
        raise SystemExit(f"no task Parquet files under {data}")
    for f in files:
        schema.check_schema(storage.read_schema(f), schema.TASK, f)
    return files, sum(storage.parquet_num_rows(f) for f in files)


ORDER_BITS = 40  # sort key: epoch * 2**40 + a 40-bit hash of the row
ROWS_PER_SORT_PARTITION = 50_000


def training_dataset(files: Sequence[str], cfg: TrainConfig, rows: int) -> Any:
    """One pass over `epochs` copies of the task rows, each in its own seeded order (or the files'
    order with shuffle=false), in blocks of exactly one micro-batch.

    The order is a sort on a hash of (seed, epoch, row), so it does not depend on how Ray Data
    splits files into blocks; the data is read once (a union of per-epoch reads would run one
    file-listing task per copy, which starves a small cluster), and the sort's partitions are
    given as key ranges sized from the row count (Ray's default is 200 reduce tasks)."""
    import ray.data

    ds = ray.data.read_parquet(list(files), columns=list(schema.TASK.names))
    if cfg.shuffle:
        ds = ds.map_batches(epoch_order, batch_format="pyarrow", fn_kwargs={"epochs": cfg.epochs, "seed": cfg.seed})
        ds = ds.sort("order", boundaries=sort_boundaries(rows, cfg.epochs)).drop_columns(["order"])
    return ds.repartition(target_num_rows_per_block=cfg.micro_batch_size, strict=True)


def epoch_order(batch: Any, epochs: int, seed: int) -> Any:
    """Each row once per epoch, with `order` = epoch * 2**40 + a seeded hash of the row's content."""
    import hashlib

    import pyarrow as pa

    keys = [f"{t}\0{s}\0{p}" for t, s, p in zip(batch.column("task").to_pylist(),
                                                  batch.column("sample_id").to_pylist(),
                                                  batch.column("prompt").to_pylist())]
    copies = []
    for epoch in range(epochs):
        order = [(epoch << ORDER_BITS) + (int.from_bytes(
            hashlib.blake2b(f"{seed}:{epoch}:{k}".encode(), digest_size=8).digest(), "big") >> (64 - ORDER_BITS))
            for k in keys]
        copies.append(batch.append_column("order", pa.array(order, pa.int64())))
    return pa.concat_tables(copies)


def sort_boundaries(rows: int, epochs: int) -> list[int]:
    """Key-range boundaries: about ROWS_PER_SORT_PARTITION rows per partition, epochs apart."""
    per_epoch = max(1, math.ceil(rows / ROWS_PER_SORT_PARTITION))
    span = 1 << ORDER_BITS
    bounds = [e * span + k * span // per_epoch for e in range(epochs) for k in range(per_epoch)][1:]
    return bounds or [epochs * span]  # one boundary past every key: Ray needs at least one


def micro_batches(shard: Any, micro_batch_size: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
    """This rank's micro-batches in order, after skipping the first `skip` (already trained on)."""
    for k, batch in enumerate(shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy",
                                                 drop_last=True, prefetch_batches=2)):
        if k >= skip:
            yield batch


# ---------------------------------------------------------------- collation and loss


@dataclasses.dataclass
class Batch:
    inputs: dict[str, Any]  # model inputs (input_ids, attention_mask, pixel_values, ...)
    labels: Any  # [B, L] target token ids, IGNORE elsewhere
    weights: Any  # [B] row weight x task weight
    task_ids: Any  # [B] index into schema.TASK_NAMES
    tokens: int  # non-padding tokens in the batch
    target_tokens: int


class Collator:
    """Task rows -> model inputs with target-only labels, through the model's own processor."""

    def __init__(self, lm: Any, task_weights: dict[str, float]):
        self.lm = lm
        self.task_weights = task_weights
        tok = lm.tokenizer
        tok.padding_side = "left"
        self.eos = tok.eos_token or ""

    def texts(self, prompt: str, target: str) -> tuple[str, str]:
        """(prompt as the model sees it at inference, the same with the answer appended)."""
        from eama.news import models

        wrapped = models.format_prompt(self.lm.family, prompt)
        return wrapped, f"{wrapped} {target}{self.eos}"

    def target_lengths(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Tokens the answer adds to the prompt (image-token expansion cancels out)."""
        tok = self.lm.tokenizer
        head = tok([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
        full = tok([f for _, f in pairs], add_special_tokens=True)["input_ids"]
        return [max(1, len(f) - len(h)) for h, f in zip(head, full)]

    def __call__(self, rows: dict[str, np.ndarray]) -> Batch:
        import torch

        from eama.news import models

        pairs = [self.texts(p, t) for p, t in zip(rows["prompt"], rows["target"])]
        pics = [images.load_rgb(b) for b in rows["image"]]
        enc = models.encode(self.lm, [f for _, f in pairs], pics)
        ids = enc["input_ids"]
        labels = torch.full_like(ids, IGNORE)
        lengths = self.target_lengths(pairs)
        for i, n in enumerate(lengths):
            labels[i, -n:] = ids[i, -n:]
        tasks = [schema.TASK_NAMES.index(t) for t in rows["task"]]
        weights = torch.tensor([float(w) * self.task_weights[t] for w, t in zip(rows["weight"], rows["task"])],
                               dtype=torch.float32, device=ids.device)
        return Batch(enc, labels, weights, torch.tensor(tasks, device=ids.device),
                     int(enc["attention_mask"].sum()), sum(lengths))


def weighted_loss(logits: Any, labels: Any, weights: Any, micro_batch_size: int) -> tuple[Any, Any]:
    """(Σ_i w_i · mean token loss of row i) / micro_batch_size, and the per-row losses (detached).

    `logits` may cover only the last K positions (logits_to_keep): they are aligned to the end of
    `labels`, as left padding puts every target there."""
    import torch.nn.functional as F

    k = logits.shape[1]
    shifted = labels[:, labels.shape[1] - k + 1:]
    tok_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE,
                               reduction="none")
    mask = (shifted != IGNORE).float()
    row_loss = (tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (row_loss * weights).sum() / micro_batch_size, row_loss.detach()


def forward_loss(model: Any, batch: Batch, micro_batch_size: int) -> tuple[Any, Any]:
    """Run the model on the batch, computing logits only where targets are predicted when the
    model supports `logits_to_keep`."""
    keep = int((batch.labels != IGNORE).sum(1).max()) + 1
    kwargs = dict(batch.inputs)
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    return weighted_loss(out.logits, batch.labels, batch.weights, micro_batch_size)


def accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    inner = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


# ---------------------------------------------------------------- metrics


class StepStats:
    """Sums over one optimizer step's micro-batches on this rank; `reduce` makes them global."""

    def __init__(self) -> None:
        n = len(schema.TASK_NAMES)
        self.task_loss = [0.0] * n
        self.task_rows = [0] * n
        self.objective = 0.0
        self.tokens = self.target_tokens = 0

    def add(self, batch: Batch, loss: Any, row_losses: Any) -> None:
        self.objective += float(loss.detach())
        for t, l in zip(batch.task_ids.tolist(), row_losses.tolist()):
            self.task_loss[t] += l
            self.task_rows[t] += 1
        self.tokens += batch.tokens
        self.target_tokens += batch.target_tokens

    def reduce(self, device: Any, world_size: int, grad_accum: int) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        v = torch.tensor(self.task_loss + self.task_rows + [self.objective, self.tokens, self.target_tokens],
                         dtype=torch.float64, device=device)
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(v)
        v = v.tolist()
        n = len(schema.TASK_NAMES)
        out: dict[str, Any] = {"loss": v[2 * n] / (world_size * grad_accum), "tokens": int(v[2 * n + 1]),
                               "target_tokens": int(v[2 * n + 2])}
        for i, task in enumerate(schema.TASK_NAMES):
            out[f"loss/{task}"] = v[i] / v[n + i] if v[n + i] else None
            out[f"rows/{task}"] = int(v[n + i])
        return out


def write_metrics(history: list[dict[str, Any]], directory: str) -> None:
    """metrics.jsonl (one line per optimizer step) under `directory`."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
    storage.write_bytes_atomic(storage.join(directory, "metrics.jsonl"), text.encode())


def read_metrics(directory: str) -> list[dict[str, Any]]:
    raw = storage.read_bytes(storage.join(directory, "metrics.jsonl")).decode()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def plot_losses(history: list[dict[str, Any]], path: str) -> None:
    """A PNG of the weighted loss and each task's loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] for r in history], label="weighted loss", color="black", linewidth=2)
    for task in schema.TASK_NAMES:
        pts = [(r["step"], r[f"loss/{task}"]) for r in history if r.get(f"loss/{task}") is not None]
        if pts:
            ax.plot(*zip(*pts), label=task, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title("EAMA alignment training")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- throughput

# Dense bf16 peak of one GPU (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "V100": 125e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def trainable_params(model: Any) -> int:
    """Trainable parameter count (ZeRO-3 partitioned parameters report their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def mfu(tokens_per_s: float, trainable: int, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation with the 6·N FLOPs-per-token rule (trainable parameters; the frozen
    vision tower's forward and attention's quadratic term are left out)."""
    return 6.0 * trainable * tokens_per_s / (peak * world_size)


# ---------------------------------------------------------------- model


def load_for_training(cfg: TrainConfig, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """(LoadedModel, keep-alive handle). Under ZeRO-3 an HfDeepSpeedConfig must stay alive while
    from_pretrained runs so transformers partitions the weights as it loads them; the handle is
    returned so the caller keeps it for the whole run."""
    import torch

    from eama.news import models

    keep_alive = None
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    lm = models.load_model(cfg.model, device="cuda" if cfg.use_gpu else "cpu", dtype=dtype,
                           trust_remote_code=cfg.trust_remote_code, for_training=True)
    if cfg.freeze_vision:
        freeze(lm.model, VISION_MODULES)
    if cfg.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.model.config.use_cache = False
    return lm, keep_alive


def freeze(model: Any, names: Sequence[str]) -> list[str]:
    """Stop gradients into every submodule whose attribute name is in `names`; return their paths."""
    frozen = []
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in names and not any(path.startswith(f + ".") for f in frozen):
            for p in module.parameters():
                p.requires_grad_(False)
            frozen.append(path)
    return frozen


# ---------------------------------------------------------------- checkpoints and export


@dataclasses.dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    world_size: int = 0
    attempts: int = 1


def save_checkpoint(engine: Any, state: TrainerState, metrics: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shard into a temporary folder and reports it; Ray Train
    merges the folders into one checkpoint in storage and keeps the newest `keep_checkpoints`.
    Returns once the checkpoint is committed, so a failure after this call resumes from it."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    with tempfile.TemporaryDirectory(prefix="eama-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
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
        state = TrainerState(**json.loads(fh.read()))
    state.attempts += 1
    return state


def safe_checkpoint_engine(engine: Any) -> Any:
    """DeepSpeed's torch checkpoint engine, but unpickling with torch.load(weights_only=True):
    besides tensors and containers only DeepSpeed's ZeRO-stage enum and loss scalers may load."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(engine._config)


def load_engine_state(engine: Any, ckpt: Any) -> None:
    """Weights, optimizer and schedule of every rank's shard from checkpoint `ckpt`, unpickled
    with weights_only=True."""
    engine.checkpoint_engine = safe_checkpoint_engine(engine)
    with ckpt.as_directory() as path:
        engine.load_checkpoint(path, tag=DS_TAG)
    log.info("resumed from %s", ckpt.path)


def gather_state_dict(engine: Any, zero_stage: int, rank: int) -> dict[str, Any] | None:
    """The full model state dict on rank 0 (None elsewhere); every rank must call it."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # gathers the shards layer by layer
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if rank == 0 else None


def export_model(engine: Any, lm: Any, dest: str, zero_stage: int, rank: int, info: dict[str, Any]) -> None:
    """Save one consolidated Hugging Face model (safetensors) + processor to `dest` (local or
    s3://), loadable by models.load_model(dest)."""
    import torch.distributed as dist

    state_dict = gather_state_dict(engine, zero_stage, rank)
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="eama-export-") as tmp:
            engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            lm.processor.save_pretrained(tmp)
            with open(os.path.join(tmp, "eama_export.json"), "w") as fh:
                json.dump(info, fh, indent=2, sort_keys=True)
            upload_dir(tmp, dest)
    if dist.is_initialized():
        dist.barrier()


def upload_dir(local: str, dest: str) -> None:
    """Copy a local folder's files to `dest` (local path or s3://), replacing what was there."""
    storage.remove(dest)
    fs = storage.filesystem(dest)
    for root, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            target = storage.join(dest, *rel.split(os.sep))
            if storage.is_remote(dest):
                fs.put_file(os.path.join(root, name), storage.strip(target))
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(root, name), target)


# ---------------------------------------------------------------- the worker loop


def train_step(engine: Any, collate: Collator, batches: Iterator[dict[str, np.ndarray]], cfg: TrainConfig) -> StepStats:
    """One optimizer step: grad_accum micro-batches forward and backward (DeepSpeed scales each
    loss by 1/grad_accum, averages gradients over ranks, clips, and steps at the boundary)."""
    stats = StepStats()
    for _ in range(cfg.grad_accum):
        batch = collate(next(batches))
        loss, row_losses = forward_loss(engine, batch, cfg.micro_batch_size)
        engine.backward(loss)
        engine.step()
        stats.add(batch, loss, row_losses)
    return stats


def maybe_fail(cfg: TrainConfig, rank: int, world_size: int, step: int) -> None:
    """Test hook: die like a lost node (no cleanup) once, after step `fail_at_step`."""
    target = cfg.fail_rank if cfg.fail_rank >= 0 else world_size - 1
    if cfg.fail_at_step and step == cfg.fail_at_step and rank == target and cfg.fail_marker:
        if not os.path.exists(cfg.fail_marker):
            with open(cfg.fail_marker, "w") as fh:
                fh.write(f"rank {rank} exited after step {step}\n")
            os._exit(1)


def worker_logging() -> None:
    """Send eama's INFO logs to the worker's stdout (Ray shows them on the driver)."""
    root = logging.getLogger("eama")
    root.setLevel(logging.INFO)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False  # Ray Train's own root handler would print every line twice


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, resume, the step loop, checkpoints, export."""
    import deepspeed
    import ray.train
    import torch

    started = time.time()
    worker_logging()
    cfg = TrainConfig(**config["cfg"])
    plan = StepPlan(**config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # reuses Ray Train's group

    ds_config = deepspeed_config.build_config(
        zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
        world_size=world, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.use_gpu, offload_optimizer=cfg.offload_optimizer, offload_params=cfg.offload_params,
        param_persistence_threshold=None if cfg.param_persistence_threshold < 0 else cfg.param_persistence_threshold,
    )
    ckpt = ray.train.get_checkpoint()  # the latest reported one: after a failure or a relaunch
    state = trainer_state(ckpt)
    state.world_size = world
    lm, _hf_ds_config = load_for_training(cfg, ds_config)  # the handle lives as long as this frame
    engine, _, _, _ = deepspeed.initialize(
        model=lm.model, model_parameters=[p for p in lm.model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=deepspeed_config.cosine_schedule(plan.total_steps, plan.warmup_steps, cfg.min_lr_ratio),
    )
    if ckpt is not None:
        load_engine_state(engine, ckpt)
    log.info("rank %d: engine ready at step %d, %.1fs after start", rank, state.step, time.time() - started)
    collate = Collator(lm, parse_task_weights(cfg.task_weights))
    trainable = trainable_params(engine.module)
    peak = peak_flops(torch.cuda.get_device_name()) if cfg.use_gpu else None
    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg.micro_batch_size,
                            skip=state.step * cfg.grad_accum)
    engine.train()
    while state.step < plan.total_steps:
        t0 = time.perf_counter()
        stats = train_step(engine, collate, batches, cfg)
        state.step += 1
        record = stats.reduce(engine.device, world, cfg.grad_accum)
        seconds = time.perf_counter() - t0
        record.update(step=state.step, lr=engine.get_lr()[0], step_seconds=seconds,
                      tokens_per_s=record["tokens"] / seconds, rows_per_s=plan.rows_per_step / seconds,
                      attempt=state.attempts)
        if peak:
            record["mfu"] = mfu(record["tokens_per_s"], trainable, world, peak)
        state.history.append(record)
        if rank == 0 and (state.step <= 2 or state.step % 10 == 0):
            log.info("step %d/%d loss %.4f lr %.2e %.2fs", state.step, plan.total_steps, record["loss"],
                     record["lr"], seconds)
        maybe_fail(cfg, rank, world, state.step)
        if cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or state.step == plan.total_steps):
            t0 = time.time()
            save_checkpoint(engine, state, {"step": state.step, "loss": record["loss"]}, rank)
            log.info("rank %d: checkpoint at step %d in %.1fs", rank, state.step, time.time() - t0)
            if rank == 0:
                write_metrics(state.history, run_dir(cfg))

    if rank == 0 and state.history:
        write_metrics(state.history, run_dir(cfg))
        plot_losses(state.history, storage.join(run_dir(cfg), "loss_curves.png"))
    if cfg.export:
        t0 = time.time()
        info = {"base_model": cfg.model, "run_name": cfg.run_name, "step": state.step,
                "zero_stage": cfg.zero_stage, "world_size": world, "task_weights": cfg.task_weights}
        export_model(engine, lm, export_dir(cfg), cfg.zero_stage, rank, info)
        log.info("rank %d: exported in %.1fs", rank, time.time() - t0)


# ---------------------------------------------------------------- the driver


WORKER_ENV = ("DS_ACCELERATOR", "EAMA_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Settings the workers need from the driver's environment (credentials are not copied: they
    come from the cluster's own environment or instance role)."""
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    return env


def fit(cfg: TrainConfig) -> Any:
    """Run (or resume, when OUTPUT/RUN_NAME holds checkpoints) the training; returns Ray's Result."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    validate(cfg)
    cfg.data, cfg.output = storage.absolute(cfg.data), storage.absolute(cfg.output)
    if not ray.is_initialized():
        ray.init()
    files, rows = task_files(cfg.data)
    plan = plan_steps(rows, cfg)
    log.info("%d task rows -> %d steps of %d rows (%d workers x %d x %d accumulation)", rows,
             plan.total_steps, plan.rows_per_step, cfg.num_workers, cfg.micro_batch_size, cfg.grad_accum)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # with one-micro-batch blocks: micro-batch j goes to rank j % world
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "plan": dataclasses.asdict(plan)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        datasets={"train": training_dataset(files, cfg, rows)},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.output,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    return trainer.fit()


# ---------------------------------------------------------------- selection accuracy


def selection_scores(lm: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                     max_new_tokens: int = 40) -> dict[str, dict[str, float]]:
    """Exact-match accuracy and micro F1 of the model's answers to sentence- and entity-selection
    rows (answers parsed as at inference)."""
    from eama.news import models

    tally: dict[str, list[float]] = {}
    for task, kind in (("sentence_selection", "sentences"), ("entity_selection", "entities")):
        todo = [r for r in rows if r["task"] == task]
        exact = tp = n_pred = n_gold = 0
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            cands = [prompts.listed_entities(r["prompt"]) if kind == "entities"
                     else prompts.sentence_choices(len(prompts.numbered_sentences(r["prompt"]))) for r in chunk]
            answers = models.generate_text(lm, [r["prompt"] for r in chunk], [images.load_rgb(r["image"]) for r in chunk],
                                           max_new_tokens, [(kind, c) for c in cands])
            for r, answer, c in zip(chunk, answers, cands):
                if kind == "sentences":
                    pred, gold = prompts.parse_sentence_ids(answer, len(c))[0], prompts.parse_sentence_ids(r["target"], len(c))[0]
                else:
                    pred, gold = prompts.parse_entities(answer, c)[0], prompts.parse_entities(r["target"], c)[0]
                exact += set(pred) == set(gold)
                tp += len(set(pred) & set(gold))
                n_pred += len(set(pred))
                n_gold += len(set(gold))
        tally[task] = [exact, tp, n_pred, n_gold, len(todo)]
    out = {}
    for task, (exact, tp, n_pred, n_gold, n) in tally.items():
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gold if n_gold else 0.0
        out[task] = {"accuracy": exact / n if n else math.nan, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                     "rows": n}
    return out
