"""benchmark_ledger: what planning a run costs against a large committed output, local and on S3.

    python jobs/benchmark_ledger.py [--rows 100000,1000000,10000000] [--files 1000] [--output DIR]
                                    [s3_files=1000] [key=value ...]

For each committed size in ROWS: builds a synthetic committed output over FILES input files through
the engine's own commit path (ledger.commit, then the end-of-run compaction), then times listing
the input, planning a no-op re-run and planning a run after 1% new files arrive, with the peak
growth of the driver's resident memory while planning (sampled every 5 ms). Then the same plan
on a real S3 API server (moto, on 127.0.0.1) over an output of S3_FILES commits: bytes fetched and
requests made, against the bytes planning cannot avoid (the new files' sample-id column chunks and
the id index's hash column). Prints both tables and writes DIR/benchmark_ledger.json (with the
commit and the resolved config). A build already in DIR is reused, so a cut-off run resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from eama.engine import benchmarks, config, id_index, ledger, runner, storage


@dataclasses.dataclass
class LedgerBenchConfig:
    rows: str = "100000,1000000,10000000"  # committed rows of each local build, comma-separated
    files: int = 1000  # input files the rows are spread over
    commit_rows: int = 5000  # rows per commit, as the runner's commit_rows
    output: str = os.path.join("demo_out", "benchmark_ledger")
    repeats: int = 3  # timings are the median of this many runs
    s3_files: int = 1000  # committed files of the S3 build (0: skip the S3 row)
    s3_rows_per_file: int = 100  # rows per input file and per commit on S3


FLAGS = [
    config.Flag("--rows", "rows", "committed rows of each build, comma-separated (default 100k, 1M, 10M)"),
    config.Flag("--files", "files", "input files the rows are spread over"),
    config.Flag("--output", "output", "working directory; DIR/benchmark_ledger.json gets the figures"),
]

INPUT = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("text", pa.string())])
OUTPUT = pa.schema([pa.field("sample_id", pa.string()), pa.field("source_file", pa.string())])
RUN_ID = "20260101T000000Z-bench"


def job() -> runner.BatchJob:
    """A job declaration with the input contract; planning never runs its stages."""
    return runner.BatchJob(name="benchmark", input_schema=INPUT, required=("sample_id",), work_schema=INPUT,
                           output_schema=OUTPUT, stages=[], emit=lambda row: [row])


def write_input(path: str, prefix: str, rows: int) -> None:
    ids = [f"{prefix}-{i:07d}" for i in range(rows)]
    storage.write_table_atomic(pa.table({"sample_id": ids, "text": ["t"] * rows}, schema=INPUT), path,
                               row_group_size=max(1, rows))


def build(inp: str, out: str, rows: int, files: int, commit_rows: int) -> None:
    """Input files and a committed, compacted output of `rows` rows (reused when present)."""
    if storage.exists(storage.join(out, ledger.INDEX_FILE)):
        return
    per_file = rows // files
    paths = [storage.join(inp, f"part-{k:05d}.parquet") for k in range(files)]
    storage.parallel_map(lambda k: write_input(paths[k], f"f{k:05d}", per_file), list(range(files)), 16)
    total = per_file * files

    def commit(start: int) -> None:
        chunk = [divmod(i, per_file) for i in range(start, min(total, start + commit_rows))]
        where = [(paths[k], 0, r) for k, r in chunk]
        outputs = [{"sample_id": f"f{k:05d}-{r:07d}", "source_file": paths[k]} for k, r in chunk]
        ledger.commit(out, RUN_ID, ledger.commit_name(RUN_ID, where), outputs, [], where, OUTPUT, generation=1)

    storage.parallel_map(commit, list(range(0, total, commit_rows)), 8)
    listing = {p: (size, version) for p, size, version in storage.list_file_versions(inp)}
    led = ledger.Ledger.load(out)
    led.compact({p: (listing[p][0], [per_file], listing[p][1]) for p in paths})


class PeakRss:
    """Peak growth of this process's resident memory while the block runs (sampled)."""

    def __enter__(self) -> "PeakRss":
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def measure(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """(result, median seconds, peak MiB of resident-memory growth during one more call)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    with PeakRss() as rss:
        fn()
    return result, statistics.median(times), rss.mib


def plan(inp: str, out: str) -> runner.Plan:
    return runner.plan_run(job(), runner.RunnerConfig(input=inp, output=out), ledger.Ledger.load(out))


def with_new_files(inp: str, count: int, rows: int, fn: Callable[[list[str]], Any]) -> Any:
    """fn(new paths) while `count` new input files of `rows` rows exist (removed after)."""
    paths = [storage.join(inp, f"part-new-{k:05d}.parquet") for k in range(count)]
    for k, path in enumerate(paths):
        write_input(path, f"new{k:05d}", rows)
    try:
        return fn(paths)
    finally:
        for path in paths:
            storage.remove(path)


def bench_local(root: str, rows: int, cfg: LedgerBenchConfig) -> dict[str, Any]:
    inp, out = os.path.join(root, "input"), os.path.join(root, "output")
    t0 = time.perf_counter()
    build(inp, out, rows, cfg.files, cfg.commit_rows)
    built = time.perf_counter() - t0
    _, list_s, _ = measure(lambda: storage.list_files_with_sizes(inp), cfg.repeats)
    noop, noop_s, noop_mib = measure(lambda: plan(inp, out), cfg.repeats)
    new, per_file = max(1, cfg.files // 100), rows // cfg.files
    grown, grown_s, grown_mib = with_new_files(inp, new, per_file, lambda _: measure(lambda: plan(inp, out), cfg.repeats))
    assert noop.pending_rows == 0 and grown.pending_rows == new * per_file, "planning is wrong"
    ids_dir = os.path.join(out, id_index.IDS_DIR)
    return {"committed_rows": rows, "input_files": cfg.files, "build_seconds": round(built, 1),
            "committed_files": len(storage.list_files(out)),
            "index_bytes": os.path.getsize(os.path.join(out, ledger.INDEX_FILE)),
            "id_index_bytes": sum(os.path.getsize(os.path.join(ids_dir, f)) for f in os.listdir(ids_dir)),
            "list_input_seconds": list_s, "plan_noop_seconds": noop_s, "plan_one_percent_new_seconds": grown_s,
            "plan_noop_peak_mib": noop_mib, "plan_one_percent_new_peak_mib": grown_mib, "new_rows": grown.pending_rows}


def id_chunk_bytes(path: str) -> int:
    """Compressed bytes of a Parquet file's sample_id column chunks (what reading the ids must fetch)."""
    with storage.open_input(path) as fh:
        meta = pq.ParquetFile(fh).metadata
    col = meta.schema.names.index("sample_id")
    return sum(meta.row_group(g).column(col).total_compressed_size for g in range(meta.num_row_groups))


def bench_s3(cfg: LedgerBenchConfig) -> dict[str, Any]:
    """Plan 1% new files against an S3 output of s3_files commits on a local moto server."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        inp, out = "s3://bench/input", "s3://bench/output"
        rows = cfg.s3_files * cfg.s3_rows_per_file
        build(inp, out, rows, cfg.s3_files, cfg.s3_rows_per_file)
        fetched, calls = [], []
        real_fetch, real_call = s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._call_s3

        def fetch(self: Any, start: int, end: int) -> bytes:
            data = real_fetch(self, start, end)
            fetched.append(len(data))
            return data

        async def call(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(method)
            return await real_call(self, method, *args, **kwargs)

        def measured(paths: list[str]) -> dict[str, Any]:
            s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._call_s3 = fetch, call
            try:
                t0 = time.perf_counter()
                grown = plan(inp, out)
                seconds = time.perf_counter() - t0
            finally:
                s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._call_s3 = real_fetch, real_call
            assert grown.pending_rows == len(paths) * cfg.s3_rows_per_file, "planning is wrong"
            segments = ledger.Ledger.load(out).segments
            hash_bytes = sum(id_chunk_bytes_of(out, s) for s in segments)
            new_ids = sum(id_chunk_bytes(p) for p in paths)
            committed_ids = sum(id_chunk_bytes(p) for p in storage.list_files(out))
            return {"seconds": seconds, "bytes_fetched": sum(fetched), "requests": len(calls),
                    "gets": sum(c == "get_object" for c in calls), "lists": sum(c.startswith("list") for c in calls),
                    "needed_bytes": hash_bytes + new_ids, "hash_column_bytes": hash_bytes, "new_id_bytes": new_ids,
                    "committed_id_column_bytes": committed_ids}

        result = with_new_files(inp, max(1, cfg.s3_files // 100), cfg.s3_rows_per_file, measured)
        return {"committed_files": cfg.s3_files, "committed_rows": rows, **result,
                "ratio_to_needed": result["bytes_fetched"] / max(1, result["needed_bytes"])}
    finally:
        server.stop()


def id_chunk_bytes_of(out: str, segment: str) -> int:
    """Compressed bytes of an id-index segment's hash column."""
    with storage.open_input(id_index.segment_path(out, segment)) as fh:
        meta = pq.ParquetFile(fh).metadata
    return sum(meta.row_group(g).column(0).total_compressed_size for g in range(meta.num_row_groups))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    cfg = config.parse_args(LedgerBenchConfig, __doc__.splitlines()[0], FLAGS, argv)
    sizes = [int(r) for r in str(cfg.rows).split(",") if r]
    if any(r < 10 * cfg.files for r in sizes):
        raise SystemExit(f"every size in --rows must be at least 10 x files ({cfg.files})")
    cfg.output = os.path.abspath(cfg.output)
    local = [bench_local(os.path.join(cfg.output, f"rows-{r}"), r, cfg) for r in sizes]
    print("\nPlanning on local disk (median of %d; peak = resident-memory growth while planning)" % cfg.repeats)
    print("\n| committed rows | input files | list input (s) | plan no-op (s) | plan +1% new files (s) | goal | "
          "peak MiB no-op | peak MiB +1% | goal | index.json KiB | id index MiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in local:
        big = r["committed_rows"] >= 10_000_000
        print(f"| {r['committed_rows']:,} | {r['input_files']} | {r['list_input_seconds']:.3f} | {r['plan_noop_seconds']:.3f} "
              f"| {r['plan_one_percent_new_seconds']:.3f} | {'<= 2 s' if big else ''} | {r['plan_noop_peak_mib']:.0f} "
              f"| {r['plan_one_percent_new_peak_mib']:.0f} | {'<= 300' if big else ''} | {r['index_bytes'] / 1024:.0f} "
              f"| {r['id_index_bytes'] / 2 ** 20:.1f} |")
    result: dict[str, Any] = {"local": local}
    if cfg.s3_files:
        s3 = bench_s3(cfg)
        result["s3"] = s3
        print("\nPlanning 1% new files on S3 (moto on 127.0.0.1)\n\n| committed files | committed rows | requests | GETs "
              "| bytes fetched | needed (id hashes + new ids) | fetched / needed | goal | committed sample_id columns |"
              "\n|---|---|---|---|---|---|---|---|---|")
        print(f"| {s3['committed_files']:,} | {s3['committed_rows']:,} | {s3['requests']} | {s3['gets']} "
              f"| {s3['bytes_fetched']:,} | {s3['needed_bytes']:,} | {s3['ratio_to_needed']:.2f} | <= 2 "
              f"| {s3['committed_id_column_bytes']:,} |")
    result["provenance"] = benchmarks.provenance(dataclasses.asdict(cfg))
    storage.write_json_atomic(os.path.join(cfg.output, "benchmark_ledger.json"), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
