"""caption_corpus: EAMA captioning of Parquet sample shards on Ray Data, exactly once.

    python jobs/caption_corpus.py [--input PATH] [--output PATH] [--model ID_OR_PATH] [--mode eama|plain]
                                  [--overwrite] [--config FILE.yaml] [key=value ...]

With no arguments it captions the demo corpus with a tiny LLaVA. Works the same under
`ray job submit --working-dir . -- python jobs/caption_corpus.py ...`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Sequence

import ray

from eama.engine import config, ledger, resources, storage
from eama.news import demo
from eama.news.pipeline import (CaptionCorpusConfig, DEMO_INPUT, Progress, build_dataset, inspect_inputs, model_label,
                           new_run_id, plan_reads, validate)

FLAGS = [
    config.Flag("--input", "input", "Parquet shards: file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "output directory, local or s3://"),
    config.Flag("--model", "model", "preset, hub id, local path or s3:// URI of an image-text-to-text model"),
    config.Flag("--mode", "mode", "eama (self-supplemented, default) or plain (the 'Base' ablation)"),
    config.Flag("--overwrite", "overwrite", "discard committed output and redo everything", switch=True),
]


def run(cfg: CaptionCorpusConfig) -> dict:
    """Caption every uncommitted input sample; return the run manifest."""
    validate(cfg)
    if not cfg.input:  # the embedded default: a generated demo corpus
        cfg.input = DEMO_INPUT
        if not storage.exists(cfg.input):
            demo.write_demo_corpus(cfg.input, num_samples=cfg.demo_samples)
    cfg.input, cfg.output = storage.absolute(cfg.input), storage.absolute(cfg.output)
    if cfg.overwrite:
        storage.remove(cfg.output)
    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    run_id, started = new_run_id(), time.time()

    # 1. Which input files, and which of their samples, still need work.
    files = storage.list_files(cfg.input)
    groups, bad_files = inspect_inputs(files)
    if bad_files and cfg.on_bad_shard == "fail":
        raise SystemExit(f"unusable input shard: {bad_files[0]['source_file']}: {bad_files[0]['reason']}")
    done_ids, done_rows = ledger.committed(cfg.output)
    bad_files = [e for e in bad_files if done_rows.get(e["source_file"], 0) == 0]
    ledger.write_file_errors(bad_files, cfg.output, run_id)
    items = plan_reads(groups, done_ids, done_rows)
    pending_rows = sum(i["rows"] for i in items)
    todo_files = {i["path"] for i in items}
    logging.info("%d input files: %d unusable, %d already done, %d to process (%d rows)",
                 len(files), len(bad_files), len(groups) - len(todo_files), len(todo_files), pending_rows)

    # 2. Size the actor pools from the cluster, then stream read -> ... -> commit.
    res = ray.cluster_resources()
    plan = resources.plan_stages(res.get("CPU", 1), res.get("GPU", 0), cfg.device, cfg.mllm_actors,
                                 cfg.gpus_per_mllm, cfg.ner_actors, cfg.ner_on_gpu)
    label = model_label(cfg)
    progress = Progress(pending_rows)
    if items:
        for stats in build_dataset(cfg, plan, items, run_id, label).iter_rows():
            progress.add(stats)

    # 3. The manifest is written last: counts, throughput, config.
    wall = time.time() - started
    out_rows, err_rows = ledger.count_committed(cfg.output)
    manifest = {
        "run_id": run_id, "model": label, "mode": cfg.mode, "config": config.to_dict(cfg),
        "plan": dict(plan.rows()), "wall_seconds": round(wall, 2),
        "input": {"files": len(files), "rows": sum(map(sum, groups.values())), "unusable_files": len(bad_files),
                  "files_skipped_as_done": len(groups) - len(todo_files), "rows_pending": pending_rows},
        "this_run": {"written": progress.written, "errors": progress.errors + len(bad_files),
                     "errors_by_stage": progress.error_stages},
        "output_total": {"rows": out_rows, "error_rows": err_rows},
        "throughput_rows_per_s": progress.throughput(wall),
    }
    ledger.write_manifest(cfg.output, manifest)
    return manifest


def print_summary(m: dict) -> None:
    print(f"\nrun {m['run_id']}  model {m['model']}  mode {m['mode']}  {m['wall_seconds']} s")
    print(f"input: {m['input']['rows']} rows in {m['input']['files']} files "
          f"({m['input']['files_skipped_as_done']} already done, {m['input']['unusable_files']} unusable)")
    print(f"this run: {m['this_run']['written']} captioned, {m['this_run']['errors']} errors "
          f"{json.dumps(m['this_run']['errors_by_stage'])}")
    print(f"output now holds {m['output_total']['rows']} rows + {m['output_total']['error_rows']} error rows")
    print("\n| stage | rows/s (per actor, busy time) |\n|---|---|")
    for stage, value in m["throughput_rows_per_s"].items():
        print(f"| {stage} | {'-' if value is None else f'{value:.2f}'} |")


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.parse_args(CaptionCorpusConfig, __doc__.splitlines()[1], FLAGS, argv)
    manifest = run(cfg)
    print_summary(manifest)
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
