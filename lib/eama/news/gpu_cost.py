"""GPU-hours to caption a corpus: a cost model fed by the work per sample that benchmark_caption
measures (prompt tokens computed, KV-cache tokens a sequence holds, decoding steps), with the GPUs'
data-sheet peaks and stated utilisations. An estimate, not a GPU run (docs/cluster.md, "GPU sizing
and the cost of a corpus", says how each cell is computed and how to re-measure)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

PARAMS_B = 6.74  # LLaVA-1.5-7B's language model, billions of parameters
WEIGHT_GB = 13.5  # its bf16 weights
FLOP_PER_TOKEN = 2 * PARAMS_B * 1e9
VISION_FLOP = 0.35e12  # the CLIP-L/336 tower on one image
KV_BYTES_PER_TOKEN = 0.5 * 2**20  # 32 layers x 2 x 4096 x 2 bytes
PREFILL_UTILISATION = {"vllm": 0.5, "hf": 0.4}  # share of the bf16 peak the prefill reaches
BANDWIDTH_UTILISATION = 0.7  # share of the peak memory bandwidth decoding moves
VLLM_MEMORY_SHARE = 0.9  # vLLM's gpu_memory_utilization: the KV cache gets this share less the weights
HF_BATCH = 8  # generate_batch_size
HF_MIN_STEP_MS = 25.0  # an eager decoding step's floor, whatever the batch


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float
    tb_per_s: float
    memory_gb: float


GPUS = {"h100": Gpu("H100 SXM 80GB", 989.0, 3.35, 80.0), "a10g": Gpu("A10G 24GB", 125.0, 0.6, 24.0)}


@dataclasses.dataclass(frozen=True)
class Work:
    """One sample's work in one mode: prompt tokens the engine computes (cached ones excluded), the
    KV-cache tokens one of its sequences holds (prompt + answer), and its decoding steps."""

    computed_tokens: float
    kv_tokens: float
    decode_steps: float


def measured_work(prompt_tokens: int, cached_tokens: int, samples: int, prompts: float, steps: float) -> Work:
    """Work per sample from an engine's totals over `samples` rows that sent `prompts` prompts a
    sample and decoded at most `steps` tokens a sample (answers run to their limit)."""
    per_prompt = prompt_tokens / samples / prompts
    return Work((prompt_tokens - cached_tokens) / samples, per_prompt + steps / prompts, steps)


def estimate(gpu: Gpu, engine: str, work: Work, images: int, hf_token_budget: int = 8192) -> dict[str, float]:
    """Prefill and decode milliseconds a sample, samples/s per GPU and GPU-hours for `images`.
    Prefill: computed tokens x 2 x parameters + the vision tower, at the engine's share of the bf16
    peak. Decode: each step reads the weights and every batched sequence's KV cache at 70 % of the
    bandwidth; vLLM batches what its KV room holds, transformers HF_BATCH rows cut by its token
    budget, a step taking at least HF_MIN_STEP_MS."""
    prefill_ms = (work.computed_tokens * FLOP_PER_TOKEN + VISION_FLOP) / (
        PREFILL_UTILISATION[engine] * gpu.bf16_tflops * 1e12) * 1e3
    kv_gb = work.kv_tokens * KV_BYTES_PER_TOKEN / 1e9
    bandwidth_gb_s = BANDWIDTH_UTILISATION * gpu.tb_per_s * 1e3
    if engine == "vllm":
        batch = max(1, int((VLLM_MEMORY_SHARE * gpu.memory_gb - WEIGHT_GB) / kv_gb))
        step_ms = (WEIGHT_GB + batch * kv_gb) / bandwidth_gb_s * 1e3
    else:
        batch = max(1, min(HF_BATCH, int(hf_token_budget // work.kv_tokens)))
        step_ms = max(HF_MIN_STEP_MS, (WEIGHT_GB + batch * kv_gb) / bandwidth_gb_s * 1e3)
    decode_ms = work.decode_steps * step_ms / batch
    rate = 1e3 / (prefill_ms + decode_ms)
    return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "batch": batch, "samples_per_s": rate,
            "gpu_hours": images / rate / 3600}


def table(works: dict[str, Work], images: int, engines: Sequence[str] = ("vllm", "hf"),
          gpus: Sequence[str] = tuple(GPUS)) -> str:
    """The Markdown table of every GPU x engine x mode for `works` ({mode: Work})."""
    lines = [f"| GPU | engine | mode | prefill ms / sample | decode ms / sample | decode batch | samples/s per GPU "
             f"| GPU-hours, {images:,} images |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for key in gpus:
        for engine in engines:
            for mode, work in works.items():
                e = estimate(GPUS[key], engine, work, images)
                lines.append(f"| {GPUS[key].name} | {engine} | {mode} | {e['prefill_ms']:.1f} | {e['decode_ms']:.1f} "
                             f"| {e['batch']} | {e['samples_per_s']:.1f} | {e['gpu_hours']:.1f} |")
    return "\n".join(lines)
