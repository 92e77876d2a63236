"""benchmark_caption: per-stage and end-to-end throughput of caption_corpus, and EAMA's cost over plain.

    python jobs/benchmark_caption.py                     # CPU, tiny LLaVA, demo data
    python jobs/benchmark_caption.py --device cuda --shape llava-1.5-7b   # random weights, real 7B shape
    python jobs/benchmark_caption.py --input PARQUET samples=64          # your own corpus instead of demo rows
    python jobs/benchmark_caption.py engine=hf,vllm                      # also the MLLM on each engine side by side

Prints one table: each stage alone (decode, spaCy, MLLM plain, MLLM eama with and without the
shared image prefix and over the first candidate group only, caption spaCy) and the whole Ray pipeline on the same rows, with ratios; on
CUDA also prefill / decode tokens/s of the batched generate against a naive batch-1 generate loop.
"""

from __future__ import annotations

import sys
from typing import Sequence

from eama.engine import config
from eama.news.benchmark import BenchConfig, run

FLAGS = [
    config.Flag("--device", "device", "cpu or cuda"),
    config.Flag("--shape", "shape", "benchmark a random model of this preset's real shape"),
    config.Flag("--model", "model", "model to load (ignored with --shape)"),
    config.Flag("--samples", "samples", "rows to benchmark on"),
    config.Flag("--input", "input", "Parquet samples to benchmark on instead of demo rows"),
]


def main(argv: Sequence[str] | None = None) -> None:
    run(config.parse_args(BenchConfig, __doc__.splitlines()[0], FLAGS, argv))


if __name__ == "__main__":
    config.main(main, sys.argv[1:], user_errors=(FileNotFoundError,))
