"""benchmark_keyphrase: MM-MKP's ablation rows and TF-IDF / most-frequent baselines on the Twitter test set, F1@1 / F1@3 / MAP@5 mean ± std over seeds, resumable.

    python jobs/benchmark_keyphrase.py [--encoder minilm|mpnet] [--output bench_out/keyphrase] [seeds=0,1] [max_runs=N] [key=value ...]
    python jobs/benchmark_keyphrase.py report=true [results=FOLDER] [mix_versions=true]

Every row trains on valid_ocr_kw.txt less a seeded 10% held out for model selection (the public
42,959-post train split is not retrievable here) and is scored on test_ocr_kw.txt. Each finished run
leaves RESULTS/<run>.json (jobs/results/benchmark_keyphrase, kept in git) and is skipped next time; a
run cut short resumes from its last epoch's checkpoint when OUTPUT is still there. Prints the table
beside CMKP's and MM-MKP's numbers, then extract_keyphrases throughput against raw batched decoding.
Ablations: joint_gate_fixed (the coarse gate at g = 1), ocr and entities (one image-derived input
each). Every result records its provenance; the table refuses to average runs of different versions
unless mix_versions=true. report=true trains nothing: it writes the table of RESULTS into
report_file's marked block (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from eama.engine import config, storage
from eama.keyphrase import benchmark

FLAGS = [
    config.Flag("--encoder", "encoder", "minilm | mpnet | a Hugging Face id or folder"),
    config.Flag("--output", "output", "benchmark folder; finished runs in it are skipped"),
    config.Flag("--data", "data", "folder with valid_ocr_kw.txt and test_ocr_kw.txt"),
]


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("eama").setLevel(logging.INFO)
    cfg = config.parse_args(benchmark.BenchmarkConfig, __doc__.splitlines()[0], FLAGS, argv)
    if cfg.report:
        cfg.results = storage.absolute(cfg.results)
        print(benchmark.report(cfg))
        return
    for name in ("valid_ocr_kw.txt", "test_ocr_kw.txt"):
        if not os.path.isfile(os.path.join(cfg.data, name)):
            raise config.ConfigError(f"{os.path.join(cfg.data, name)} not found (--data: the keyphrase folder)")
    cfg.data, cfg.output, cfg.results = os.path.abspath(cfg.data), storage.absolute(cfg.output), storage.absolute(cfg.results)
    results = benchmark.run_matrix(cfg)
    print("\n" + benchmark.table(results, cfg.mix_versions))
    if cfg.throughput and results:
        print("\n" + (benchmark.throughput(cfg, results) or "(throughput: no finished joint run with its export)"))


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
