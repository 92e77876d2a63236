"""benchmark_ledger: what planning a run costs against a large committed output.

    python jobs/benchmark_ledger.py [--rows 1000000] [--files 1000] [--output DIR] [key=value ...]

Builds a synthetic committed output of ROWS rows over FILES input files through the engine's
own commit path (ledger.commit, then the end-of-run compaction), and the same at ROWS/10 for the
side-by-side ratio, then times: listing the input, planning a no-op re-run, and planning a run
after 1% new files arrive; with the driver's peak Python memory while planning (tracemalloc).
Prints a table and writes DIR/benchmark_ledger.json. A build already in DIR is reused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import time
import tracemalloc
from typing import Any, Callable

import pyarrow as pa

from eama.engine import config, ledger, runner, storage


@dataclasses.dataclass
class LedgerBenchConfig:
    rows: int = 1_000_000  # committed rows of the large build (a second build has rows / 10)
    files: int = 1000  # input files
    commit_rows: int = 5000  # rows per commit, as the runner's commit_rows
    output: str = os.path.join("demo_out", "benchmark_ledger")
    repeats: int = 3  # timings are the median of this many runs


FLAGS = [
    config.Flag("--rows", "rows", "committed rows to build (default 1M)"),
    config.Flag("--files", "files", "input files the rows are spread over"),
    config.Flag("--output", "output", "working directory; DIR/benchmark_ledger.json gets the figures"),
]

INPUT = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("text", pa.string())])
OUTPUT = pa.schema([pa.field("sample_id", pa.string()), pa.field("source_file", pa.string())])


def job() -> runner.BatchJob:
    """A job declaration with the input contract; planning never runs its stages."""
    return runner.BatchJob(name="benchmark", input_schema=INPUT, required=("sample_id",), work_schema=INPUT,
                           output_schema=OUTPUT, stages=[], emit=lambda row: [row])


def write_input(path: str, prefix: str, rows: int) -> None:
    ids = [f"{prefix}-{i:07d}" for i in range(rows)]
    storage.write_table_atomic(pa.table({"sample_id": ids, "text": ["t"] * rows}, schema=INPUT), path,
                               row_group_size=max(1, rows))


def build(root: str, rows: int, files: int, commit_rows: int) -> tuple[str, str]:
    """Input files and a committed, compacted output of `rows` rows (reused when present)."""
    inp, out = os.path.join(root, "input"), os.path.join(root, "output")
    if os.path.exists(os.path.join(out, ledger.INDEX_FILE)):
        return inp, out
    per_file = rows // files
    paths = [os.path.join(inp, f"part-{k:05d}.parquet") for k in range(files)]
    for k, path in enumerate(paths):
        write_input(path, f"f{k:05d}", per_file)
    positions = [(k, 0, r) for k in range(files) for r in range(per_file)]
    for start in range(0, len(positions), commit_rows):
        chunk = [(paths[k], g, r) for k, g, r in positions[start:start + commit_rows]]
        outputs = [{"sample_id": f"f{k:05d}-{r:07d}", "source_file": paths[k]}
                   for k, _, r in positions[start:start + commit_rows]]
        name = "part-" + ledger.digest(f"{p}\0{g}\0{r}" for p, g, r in chunk)
        ledger.commit(out, "20260101T000000Z-bench", name, outputs, [], chunk, OUTPUT)
    led = ledger.Ledger.load(out)
    led.compact({p: (storage.list_files_with_sizes(p)[0][1], [per_file]) for p in paths})
    return inp, out


def measure(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """(result, median seconds, peak MiB of Python allocations during one call)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return result, statistics.median(times), peak


def bench_one(root: str, rows: int, cfg: LedgerBenchConfig) -> dict[str, Any]:
    inp, out = build(root, rows, cfg.files, cfg.commit_rows)
    run_cfg = runner.RunnerConfig(input=inp, output=out)
    _, list_s, _ = measure(lambda: storage.list_files_with_sizes(inp), cfg.repeats)
    noop, noop_s, noop_mib = measure(lambda: runner.plan_run(job(), run_cfg, ledger.Ledger.load(out)), cfg.repeats)
    new = max(1, cfg.files // 100)
    new_paths = [os.path.join(inp, f"part-new-{k:05d}.parquet") for k in range(new)]
    for k, path in enumerate(new_paths):
        write_input(path, f"new{k:05d}", rows // cfg.files)
    try:
        grown, grown_s, grown_mib = measure(lambda: runner.plan_run(job(), run_cfg, ledger.Ledger.load(out)),
                                            cfg.repeats)
    finally:
        for path in new_paths:
            os.remove(path)
    assert noop.pending_rows == 0 and grown.pending_rows == new * (rows // cfg.files), "planning is wrong"
    index_bytes = os.path.getsize(os.path.join(out, ledger.INDEX_FILE))
    return {"committed_rows": rows, "input_files": cfg.files, "committed_files": len(storage.list_files(out)),
            "index_bytes": index_bytes, "list_input_seconds": list_s, "plan_noop_seconds": noop_s,
            "plan_one_percent_new_seconds": grown_s, "plan_noop_peak_mib": noop_mib,
            "plan_one_percent_new_peak_mib": grown_mib, "new_rows": grown.pending_rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    cfg = config.parse_args(LedgerBenchConfig, __doc__.splitlines()[0], FLAGS, argv)
    if cfg.rows < 10 * cfg.files:
        raise SystemExit(f"rows ({cfg.rows}) must be at least 10 x files ({cfg.files})")
    small = bench_one(os.path.join(cfg.output, f"rows-{cfg.rows // 10}"), cfg.rows // 10, cfg)
    large = bench_one(os.path.join(cfg.output, f"rows-{cfg.rows}"), cfg.rows, cfg)
    print("\n| committed rows | input files | list input (s) | plan no-op (s) | no-op / list | plan +1% new (s) "
          "| peak MiB no-op | peak MiB +1% | index KiB |\n|---|---|---|---|---|---|---|---|---|")
    for r in (small, large):
        print(f"| {r['committed_rows']:,} | {r['input_files']} | {r['list_input_seconds']:.3f} | {r['plan_noop_seconds']:.3f} "
              f"| {r['plan_noop_seconds'] / r['list_input_seconds']:.2f} | {r['plan_one_percent_new_seconds']:.3f} "
              f"| {r['plan_noop_peak_mib']:.1f} | {r['plan_one_percent_new_peak_mib']:.1f} | {r['index_bytes'] / 1024:.0f} |")
    ratio = {k: large[k] / small[k] for k in ("plan_noop_seconds", "plan_one_percent_new_seconds", "plan_noop_peak_mib")}
    print(f"\n{cfg.rows // 10:,} -> {cfg.rows:,} committed rows: no-op planning x{ratio['plan_noop_seconds']:.2f}, "
          f"its peak memory x{ratio['plan_noop_peak_mib']:.2f}, planning with 1% new files "
          f"x{ratio['plan_one_percent_new_seconds']:.2f}")
    result = dict(large, small=small, ratios_10x_rows=ratio)
    storage.write_json_atomic(os.path.join(cfg.output, "benchmark_ledger.json"), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
