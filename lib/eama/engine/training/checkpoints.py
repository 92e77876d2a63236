"""What a run keeps to resume and what it publishes: the trainer state, DeepSpeed's sharded
checkpoint with every rank's random generators, the check that a relaunch trains the plan its
checkpoint was trained with, and the consolidated export.

* `save_checkpoint` / `trainer_state` + `load_engine_state`: DeepSpeed's sharded checkpoint inside
  a ray.train.Checkpoint (every rank reports its shard and its random generators' state; Ray merges
  them) plus the trainer state (step, the metrics records not yet in a file, the plan's
  fingerprint); ray.train.get_checkpoint() finds it after a worker failure (FailureConfig) and
  after a relaunch under the same run name. Shards are unpickled with weights_only=True;
* `plan_fingerprint` / `check_resume`: a relaunch resumes only with the data, seed and batch
  geometry its checkpoint was trained with (else one line saying what differs);
* `export_model`: the (ZeRO-3: gathered) full state dict handed to the task's `save_export`, then
  published beside the current export and switched to by a pointer (`exports.publish_export`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from eama.engine import exports, storage
from eama.engine.training.config import TrainerConfig
from eama.engine.training.order import StepPlan
from eama.engine.training.task import TrainingTask

log = logging.getLogger("eama.trainer")

TRAINER_STATE = "trainer_state.json"
EXPORT_INFO = "eama_export.json"
DS_TAG = "deepspeed"


@dataclasses.dataclass
class TrainerState:
    """What a checkpoint records of the trainer beside the engine's shards (its trainer_state.json)."""

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


def export_info(task: TrainingTask, cfg: TrainerConfig, state: TrainerState, world: int) -> dict[str, Any]:
    info = {"run_name": cfg.run_name, "step": state.step, "launcher": cfg.launcher,
            "zero_stage": cfg.zero_stage if cfg.launcher == "ray" else None, "world_size": world,
            **task.export_info()}
    if cfg.select_metric:
        info.update(selected_on=cfg.select_metric, selected_value=state.best_value)
    return info
