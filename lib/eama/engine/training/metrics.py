"""What a run measures: the per-step statistics (`StepStats`: the objective, per-group mean row
losses and the task's counts, all-reduced per optimizer step), the run's metrics files, the
summary a training job prints, the loss PNG, and MFU on GPU.

Metrics are one small file per checkpoint, RUN/metrics/step-<step>.jsonl with the records since
the previous one (S3 cannot append); `read_metrics` reads them back in order.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any, Mapping, Sequence

from eama.engine import storage
from eama.engine.training.checkpoints import TrainerState
from eama.engine.training.config import TrainerConfig, export_dir, run_dir


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
        out.update(with_ratios(dict(zip(keys, v[2 * n + 1:]))))
        for i, name in enumerate(group_names):
            out[f"loss/{name}"] = v[i] / v[n + i] if v[n + i] else None
            out[f"rows/{name}"] = int(v[n + i])
        return out


RATIO_NUMERATOR, RATIO_DENOMINATOR = ":n", ":d"  # a count pair NAME:n, NAME:d is logged as NAME = n / d


def with_ratios(counts: Mapping[str, float]) -> dict[str, Any]:
    """A step's summed counts as logged: integers, except that each pair NAME:n / NAME:d becomes
    NAME = their ratio over the whole step (None when NAME:d is 0), e.g. a share kept or a mean loss."""
    out: dict[str, Any] = {}
    for key, value in counts.items():
        if key.endswith(RATIO_NUMERATOR):
            name = key[:-len(RATIO_NUMERATOR)]
            den = counts.get(name + RATIO_DENOMINATOR, 0)
            out[name] = value / den if den else None
        elif not key.endswith(RATIO_DENOMINATOR):
            out[key] = int(value)
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
