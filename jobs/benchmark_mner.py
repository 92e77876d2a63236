"""benchmark_mner: ITA's text / caption / caption+CVA and BGA-MNER's rows on Twitter-2015 and -2017, test F1 mean ± std over seeds, resumable.

    python jobs/benchmark_mner.py [--encoder minilm|mpnet] [--output bench_out/mner] [seeds=0,1] [max_runs=N] [key=value ...]
    python jobs/benchmark_mner.py report=true [results=FOLDER] [mix_versions=true]

Each finished run leaves RESULTS/<run>.json (jobs/results/benchmark_mner, kept in git) and is skipped
next time, so the matrix (hours with MPNet on 2 cores) can be spread over several invocations; a run
cut short resumes from its last epoch's checkpoint when OUTPUT is still there. Prints the table of every finished
run beside the papers' numbers, then tag_entities throughput against the tagger's raw batched forward,
and (once a bga and a text run of one dataset are done) BGA's text-only inference cost against the CRF's.
BGA rows: configs=bga,bga_no_scs,bga_no_cycle (the captions stand in for the images: a caption proxy).
Controls: caption_shuffled, bga_no_gen, text_emission_bgalr, caption_cva_emission_bgalr,
bga_keep_budget, text_ita_schedule, caption_cva_ita_schedule. Every result records its provenance; the
table refuses to average runs of different versions unless mix_versions=true. report=true trains
nothing: it writes the table of RESULTS into report_file's marked block (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from eama.engine import config, storage
from eama.mner import benchmark

FLAGS = [
    config.Flag("--encoder", "encoder", "minilm | mpnet | a Hugging Face id or folder"),
    config.Flag("--output", "output", "benchmark folder; finished runs in it are skipped"),
    config.Flag("--data", "data", "folder with twitter2015/ and twitter2017/"),
]


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("eama").setLevel(logging.INFO)
    cfg = config.parse_args(benchmark.BenchmarkConfig, __doc__.splitlines()[0], FLAGS, argv)
    if cfg.report:
        cfg.results = storage.absolute(cfg.results)
        print(benchmark.report(cfg))
        return
    if not os.path.isdir(cfg.data):
        raise config.ConfigError(f"data folder not found: {cfg.data}")
    cfg.data, cfg.output, cfg.results = os.path.abspath(cfg.data), storage.absolute(cfg.output), storage.absolute(cfg.results)
    results = benchmark.run_matrix(cfg)
    print("\n" + benchmark.table(results, cfg.mix_versions))
    if cfg.throughput and results:
        if cfg.launcher == "ray":
            print("\n" + (benchmark.throughput(cfg, results) or ""))
        else:
            print("\nthroughput: not measured with launcher=local (it times tag_entities, a job on Ray)")
        cost = benchmark.bga_cost(cfg, results)
        if cost:
            print("\n" + cost)


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
