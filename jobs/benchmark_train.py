"""benchmark_train: tokens/s and step time of train_alignment's real loop (Ray Train + DeepSpeed).

    python jobs/benchmark_train.py [--device cpu|cuda] [--steps N] [--output FILE.json] [key=value ...]

cpu (default): the tiny LLaVA under ZeRO-2 and ZeRO-3 with 1 and 2 workers (0.5 CPU each), one
table with the ratios. cuda: a randomly initialised LLaVA-1.5-7B-shaped model (as many of its 32
decoder layers as fit one GPU next to ZeRO-3 optimizer state, unless layers= is given), bf16,
gradient checkpointing, tokens/s and MFU. Without CUDA the cuda benchmark skips with a message.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
from collections.abc import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402

from eama.engine import config, published_layout, schema, storage
from eama.news import alignment, alignment_training, demo, models


@dataclasses.dataclass
class BenchConfig:
    device: str = "cpu"  # cpu | cuda
    steps: int = 30  # optimizer steps per configuration (the first `warmup` are not timed)
    warmup: int = 3
    micro_batch_size: int = 4
    samples: int = 64  # demo samples whose task rows are the data
    layers: int = 0  # cuda: decoder layers of the 7B shape (0 = as many as fit)
    workdir: str = ""  # scratch folder (default: a temporary one)
    output: str = ""  # also write the results as JSON here


FLAGS = [
    config.Flag("--device", "device", "cpu (tiny model, ZeRO-2/3 x 1/2 workers) or cuda (7B shape, 1 GPU)"),
    config.Flag("--steps", "steps", "optimizer steps per configuration"),
    config.Flag("--output", "output", "write the results as JSON to this file"),
]


def demo_tasks(directory: str, samples: int) -> str:
    """Task rows of the demo corpus, built in-process with the job's builder."""
    rows, _ = alignment.build_in_process(list(demo.generate_samples(samples, seed=0)))
    table = pa.Table.from_pylist([{k: r[k] for k in schema.TASK.names} for r in rows], schema=schema.TASK)
    storage.write_table_atomic(table, os.path.join(directory, "tasks", "part-00000.parquet"))
    return os.path.join(directory, "tasks")


def measure(cfg: alignment_training.TrainConfig, warmup: int) -> dict:
    """Run one configuration; median step time and throughput after the warm-up steps."""
    result = alignment_training.fit(cfg)
    if result.error:
        raise SystemExit(f"{cfg.run_name} failed: {result.error}")
    timed = alignment_training.read_metrics(alignment_training.run_dir(cfg))[warmup:]
    out = {
        "zero_stage": cfg.zero_stage, "workers": cfg.num_workers, "steps_timed": len(timed),
        "step_s": statistics.median(r["step_seconds"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "rows_per_s": statistics.median(r["rows_per_s"] for r in timed),
    }
    if timed and "mfu" in timed[0]:
        out["mfu"] = statistics.median(r["mfu"] for r in timed)
    return out


def cpu_benchmark(bench: BenchConfig, workdir: str) -> list[dict]:
    data = demo_tasks(workdir, bench.samples)
    results = []
    for workers in (1, 2):
        for stage in (2, 3):
            cfg = alignment_training.TrainConfig(
                data=data, model="tiny-llava", output=os.path.join(workdir, "runs"),
                run_name=f"zero{stage}-x{workers}", num_workers=workers, cpus_per_worker=0.5,
                zero_stage=stage, micro_batch_size=bench.micro_batch_size, epochs=20, max_steps=bench.steps,
                lr=1e-3, checkpoint_every=0, export=False, param_persistence_threshold=0)
            results.append(measure(cfg, bench.warmup))
    return results


def print_table(results: list[dict]) -> None:
    base = results[0]
    by = {(r["zero_stage"], r["workers"]): r for r in results}
    print(f"{'ZeRO':>4} {'workers':>7} {'step s':>8} {'tokens/s':>9} {'rows/s':>7} "
          f"{'vs row 1':>10} {'ZeRO-3/ZeRO-2':>13}" + ("  MFU" if "mfu" in base else ""))
    for r in results:
        other = by.get((2, r["workers"]))
        z32 = f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}" if r["zero_stage"] == 3 and other else ""
        line = (f"{r['zero_stage']:>4} {r['workers']:>7} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
                f"{r['rows_per_s']:>7.1f} {r['tokens_per_s'] / base['tokens_per_s']:>10.2f} {z32:>13}")
        print(line + (f"  {r['mfu']:.3f}" if "mfu" in r else ""))


def synthetic_7b(path: str, layers: int) -> str:
    """Save a randomly initialised LLaVA-1.5-7B-shaped model (`layers` decoder layers), built in
    bf16 on the GPU, with its processor, so training loads it like any checkpoint."""
    import torch

    lm = models.build_real_shape("llava-1.5-7b", "cuda", num_layers=layers)
    published_layout.save_image_text_model(lm.model, lm.processor, path)
    del lm
    torch.cuda.empty_cache()
    return path


def layers_that_fit(gpu_bytes: int) -> int:
    """Decoder layers of the 7B shape whose ZeRO-3 training state (bf16 weights and gradients +
    fp32 master weights and two Adam moments = 16 bytes a parameter) fills ~70% of one GPU."""
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008  # attention + MLP
    fixed = 2 * 32064 * 4096 + 304_000_000 + 21_000_000  # embeddings + lm_head, CLIP-L, projector
    return max(1, min(32, int((0.70 * gpu_bytes / 16 - fixed) // per_layer)))


def cuda_benchmark(bench: BenchConfig, workdir: str) -> list[dict]:
    import torch

    layers = bench.layers or layers_that_fit(torch.cuda.get_device_properties(0).total_memory)
    print(f"7B shape with {layers}/32 decoder layers on {torch.cuda.get_device_name()}")
    model = synthetic_7b(os.path.join(workdir, "llava-7b-shape"), layers)
    cfg = alignment_training.TrainConfig(
        data=demo_tasks(workdir, bench.samples), model=model, output=os.path.join(workdir, "runs"),
        run_name="cuda-7b", num_workers=1, use_gpu=True, cpus_per_worker=4, zero_stage=3,
        micro_batch_size=bench.micro_batch_size, epochs=20, max_steps=bench.steps, lr=2e-5,
        gradient_checkpointing=True, checkpoint_every=0, export=False)
    return [dict(measure(cfg, bench.warmup), layers=layers, device=torch.cuda.get_device_name())]


def main(argv: Sequence[str] | None = None) -> None:
    bench = config.parse_args(BenchConfig, __doc__.splitlines()[0], FLAGS, argv)
    if bench.device not in ("cpu", "cuda"):
        raise SystemExit(f"device must be cpu or cuda, got {bench.device!r}")
    if bench.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        import torch

        if not torch.cuda.is_available():
            print("benchmark_train --device cuda: no CUDA device on this machine; skipped "
                  "(run it on a GPU node; the CPU benchmark needs none).")
            return
    import ray

    with tempfile.TemporaryDirectory(prefix="eama-bench-") as tmp:
        workdir = bench.workdir or tmp
        if not ray.is_initialized():
            ray.init()
        results = cpu_benchmark(bench, workdir) if bench.device == "cpu" else cuda_benchmark(bench, workdir)
    print_table(results)
    if bench.output:
        storage.write_json_atomic(bench.output, {"config": dataclasses.asdict(bench), "results": results})


if __name__ == "__main__":
    main()
