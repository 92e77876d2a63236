"""EAMA's three alignment tasks as instruction rows, and the Ray Data job that builds them.

From one sample (article, image, reference caption) and its spaCy annotations:

* Entity-Aware Sentence Selection: a group of article sentences; positives share a *visual* entity
  (entities.VISUAL_LABELS) with the reference caption, negatives are sentences of the same article
  without one (those naming some other visual entity first: the hard ones). Target: the positive
  candidate numbers (prompts.format_sentence_target).
* Entity Selection: candidates are the article's unique entities (all labels), in article order;
  the target is those that also occur in the caption (non-visual ones included).
* News Image Captioning: image + article within the word budget -> the reference caption.

Every prompt starts with the sample's news context (prompts.news_context: candidate entities listed;
the sentence group's members numbered in sentence selection, elsewhere the sentences eama
inference offers).
Matching is entities.mentions_match everywhere. The stored prompt is the model-agnostic
instruction from prompts.py; the trainer wraps it with models.format_prompt, exactly as
inference does, so both see the same text.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import time
from typing import Any, Iterable, Sequence

import pyarrow as pa

from eama.engine import entities, images, ledger, schema, storage
from eama.news import candidates, prompts

log = logging.getLogger("eama.alignment")

Row = dict[str, Any]

MANIFEST = "_manifest.json"
ERRORS_DIR = ledger.ERRORS_DIR

# Why a sample yields no task row at all (the manifest counts each).
NO_IMAGE, EMPTY_CAPTION, NO_ENTITIES = "no image", "empty caption", "no entities"
# Why one task skips a sample that other tasks may still use.
NO_SHARED_VISUAL_ENTITY, NO_NEGATIVE = "no sentence shares a visual entity with the caption", "no negative sentence"


@dataclasses.dataclass
class BuildConfig:
    """build_alignment_data settings (defaults follow the paper where it says, ours elsewhere)."""

    input: str = ""  # sample Parquet shards: file, directory or glob, local or s3://
    output: str = ""  # task rows directory, local or s3://
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(schema.TASK_NAMES))
    spacy_model: str = entities.DEFAULT_SPACY_MODEL
    # Sentence selection
    group_size: int = prompts.MAX_CANDIDATE_SENTENCES  # candidates per group
    max_positives: int = 3  # positives per group (the rest of the group are negatives)
    min_negatives: int = 1  # a group needs at least this many negatives
    groups_per_sample: int = 1  # more groups use more of a long article (weights sum to 1 per sample)
    hard_negatives_first: bool = True  # negatives naming another visual entity before plain ones
    min_sentence_words: int = 3  # shorter fragments ("Photo", "\n") are never candidates
    # Entity selection
    keep_empty_entity_targets: bool = True  # caption names none of the article's entities -> 'none'
    # Captioning: prompt with the gold selections (as eama-mode inference does with its own)
    supplement_captioning: bool = True
    seed: int = 0
    # Ray Data
    batch_size: int = 16  # samples per block
    actors: int = 1  # spaCy actors
    actor_cpus: float = 0.5  # per actor; on 2 CPUs a pool holding every CPU hangs Ray Data
    io_cpus: float = 0.25  # per read / commit task
    max_article_words: int = 5000
    overwrite: bool = False  # replace an existing output (else refuse)


def validate(cfg: BuildConfig) -> None:
    unknown = [t for t in cfg.tasks if t not in schema.TASK_NAMES]
    if unknown or not cfg.tasks:
        raise ValueError(f"tasks must be a non-empty subset of {schema.TASK_NAMES}, got {cfg.tasks}")
    if not 1 <= cfg.max_positives < cfg.group_size <= prompts.MAX_CANDIDATE_SENTENCES:
        raise ValueError(
            f"need 1 <= max_positives < group_size <= {prompts.MAX_CANDIDATE_SENTENCES}, "
            f"got max_positives={cfg.max_positives}, group_size={cfg.group_size}"
        )
    if cfg.groups_per_sample < 1 or cfg.min_negatives < 0:
        raise ValueError("groups_per_sample must be >= 1 and min_negatives >= 0")


# ---------------------------------------------------------------- labels


def shares_visual_entity(sentence: str, article_entities: Sequence[dict], caption_entities: Sequence[dict]) -> bool:
    """True when a visual entity of `sentence` matches a visual entity of the caption."""
    caption_names = [e["text"] for e in entities.visual(caption_entities)]
    mentioned = entities.visual(entities.sentence_entities(sentence, article_entities))
    return any(entities.match_any(e["text"], caption_names) for e in mentioned)


def names_visual_entity(sentence: str, article_entities: Sequence[dict]) -> bool:
    return bool(entities.visual(entities.sentence_entities(sentence, article_entities)))


def caption_entity_targets(candidates: Sequence[str], caption_entities: Sequence[dict]) -> list[str]:
    """The candidates (article entities) that also occur in the caption, any label."""
    caption_names = [e["text"] for e in caption_entities]
    return [c for c in candidates if entities.match_any(c, caption_names)]


# ---------------------------------------------------------------- task rows


@dataclasses.dataclass
class Annotated:
    """A sample with its spaCy annotations and normalised image, ready for task building."""

    sample_id: str
    headline: str | None
    article: str
    caption: str
    image: bytes
    article_entities: list[dict]
    sentences: list[str]
    caption_entities: list[dict]


def sentence_groups(
    shown: Sequence[str], positive: Sequence[bool], hard: Sequence[bool], cfg: BuildConfig, rng: random.Random
) -> list[tuple[list[int], list[int]]]:
    """Candidate groups as (sentence indices in article order, 0-based ids of positives in the group).

    Positives are spread over the groups without repeats; negatives fill each group (hard ones first
    when configured) and are reused only when the article runs out."""
    usable = [i for i, s in enumerate(shown) if len(s.split()) >= cfg.min_sentence_words]
    pos = [i for i in usable if positive[i]]
    neg = [i for i in usable if not positive[i]]
    rng.shuffle(pos)
    rng.shuffle(neg)
    if cfg.hard_negatives_first:
        neg.sort(key=lambda i: not hard[i])  # stable: random order within each kind
    groups: list[tuple[list[int], list[int]]] = []
    for g in range(cfg.groups_per_sample):
        chosen_pos = pos[g * cfg.max_positives : (g + 1) * cfg.max_positives]
        if not chosen_pos:
            break
        want = cfg.group_size - len(chosen_pos)
        start = (g * want) % len(neg) if neg else 0
        chosen_neg = (neg[start:] + neg[:start])[:want]
        if len(chosen_neg) < cfg.min_negatives:
            break
        members = sorted(chosen_pos + chosen_neg)
        groups.append((members, [k for k, i in enumerate(members) if positive[i]]))
    return groups


def sentence_selection_rows(a: Annotated, cfg: BuildConfig) -> tuple[list[Row], str | None]:
    """Sentence-selection rows of one sample, or ([], why not)."""
    if not a.article_entities:
        return [], NO_ENTITIES
    shown = [prompts.truncate_words(s, prompts.MAX_SENTENCE_WORDS) for s in a.sentences]  # what the model sees
    positive = [shares_visual_entity(s, a.article_entities, a.caption_entities) for s in shown]
    hard = [names_visual_entity(s, a.article_entities) for s in shown]
    rng = random.Random(f"{cfg.seed}:{a.sample_id}")
    groups = sentence_groups(shown, positive, hard, cfg, rng)
    if not groups:
        return [], NO_SHARED_VISUAL_ENTITY if not any(positive) else NO_NEGATIVE
    weight = 1.0 / len(groups)
    return [
        task_row("sentence_selection", a, prompts.sentence_selection_prompt(inference_context(a, members)),
                 prompts.format_sentence_target(pos_ids), weight)
        for members, pos_ids in groups
    ], None


def inference_context(a: Annotated, numbered: Sequence[int] | None = None) -> str:
    """The news context caption_corpus's eama mode shows for this sample: its offered sentences
    numbered (or the sentence group `numbered`) and its candidate entities listed."""
    if numbered is None:
        numbered = candidates.candidate_sentence_ids(a.sentences, a.article_entities)
    return prompts.news_context(a.article, a.headline, a.sentences, numbered,
                                candidates.candidate_entities(a.article_entities))


def entity_selection_row(a: Annotated, cfg: BuildConfig) -> tuple[list[Row], str | None]:
    candidates = candidates.candidate_entities(a.article_entities)
    if not candidates:
        return [], NO_ENTITIES
    targets = caption_entity_targets(candidates, a.caption_entities)
    if not targets and not cfg.keep_empty_entity_targets:
        return [], "caption names none of the article's entities"
    return [task_row("entity_selection", a, prompts.entity_selection_prompt(inference_context(a)),
                     prompts.format_entity_target(targets))], None


def gold_selection(a: Annotated) -> tuple[list[str], list[str]]:
    """What the two selection tasks teach the model to pick: article sentences sharing a visual
    entity with the caption, and the article entities the caption names."""
    sentences = [s for s in a.sentences if shares_visual_entity(s, a.article_entities, a.caption_entities)]
    names = caption_entity_targets(candidates.candidate_entities(a.article_entities), a.caption_entities)
    return sentences[: prompts.MAX_CANDIDATE_SENTENCES], names


def captioning_row(a: Annotated, cfg: BuildConfig) -> tuple[list[Row], str | None]:
    """News Image Captioning. With `supplement_captioning` the prompt carries the gold selections
    in the layout caption_corpus's eama mode fills with the model's own, so training and
    self-supplemented inference see the same prompt; without it, the plain ('Base') prompt."""
    if cfg.supplement_captioning:
        prompt = prompts.caption_prompt(inference_context(a), *gold_selection(a))
    else:
        prompt = prompts.caption_prompt(prompts.plain_context(a.article, a.headline))
    return [task_row("captioning", a, prompt, a.caption)], None


BUILDERS = {
    "sentence_selection": sentence_selection_rows,
    "entity_selection": entity_selection_row,
    "captioning": captioning_row,
}


def task_row(task: str, a: Annotated, prompt: str, target: str, weight: float = 1.0) -> Row:
    return {"task": task, "sample_id": a.sample_id, "image": a.image, "prompt": prompt, "target": target,
            "weight": weight}


def build_tasks(a: Annotated, cfg: BuildConfig) -> tuple[list[Row], dict[str, str]]:
    """All task rows of one annotated sample, and for each task that skipped it, why."""
    rows, skipped = [], {}
    for task in cfg.tasks:
        got, why = BUILDERS[task](a, cfg)
        rows += got
        if why:
            skipped[task] = why
    return rows, skipped


def clean_caption(text: str | None) -> str:
    return " ".join((text or "").split())


# ---------------------------------------------------------------- Ray Data stages

# What the builder stage emits: task rows, plus one row per sample that yields none (kind
# 'skipped', reason) or fails (kind 'error', stage, reason). 'skips' is a JSON {task: reason}.
OUTCOME = pa.schema(
    [pa.field(f.name, f.type) for f in schema.TASK]
    + [pa.field(n, pa.string()) for n in ("kind", "stage", "reason", "skips", "source_file")]
)


def outcome(kind: str, row: Row, **fields: Any) -> Row:
    return {"kind": kind, "sample_id": row.get("sample_id"), "source_file": row.get("source_file"), **fields}


class TaskBuilder:
    """Ray Data actor: decode images, spaCy over articles and captions, then the task rows."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.nlp = entities.load_nlp(cfg.spacy_model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[Row] = []
        ready: list[tuple[Row, bytes]] = []
        for row in batch.to_pylist():
            if row.get("error_stage"):
                out.append(outcome("error", row, stage=row["error_stage"], reason=row["error_reason"]))
                continue
            reason, image = self._usable(row)
            if reason == "error":
                out.append(outcome("error", row, stage="decode", reason=image))
            elif reason:
                out.append(outcome("skipped", row, reason=reason))
            else:
                ready.append((row, image))
        out += self._annotate_and_build(ready)
        return pa.Table.from_pylist(out, schema=OUTCOME)

    def _usable(self, row: Row) -> tuple[str | None, Any]:
        """(None, normalised image) or (skip reason, None) or ('error', message)."""
        if not clean_caption(row.get("caption")):
            return EMPTY_CAPTION, None
        try:
            raw = images.fetch(row.get("image"), row.get("image_uri"))
            if raw is None:
                return NO_IMAGE, None
            return None, images.normalize_image(raw)
        except Exception as exc:  # undecodable, too large, missing file
            return "error", str(exc)

    def _annotate_and_build(self, ready: list[tuple[Row, bytes]]) -> list[Row]:
        if not ready:
            return []
        articles = entities.annotate(self.nlp, [r["article"] for r, _ in ready])
        captions = entities.extract_entities(self.nlp, [clean_caption(r["caption"]) for r, _ in ready])
        out = []
        for (row, image), (ents, sents), cap_ents in zip(ready, articles, captions):
            a = Annotated(row["sample_id"], row.get("headline"), row["article"], clean_caption(row["caption"]),
                          image, ents, sents, cap_ents)
            rows, skipped = build_tasks(a, self.cfg)
            skips = json.dumps(skipped, sort_keys=True)
            if rows:
                out += [dict(r, kind="task", skips=skips, source_file=row.get("source_file")) for r in rows]
            else:
                reason = NO_ENTITIES if not ents or NO_ENTITIES in skipped.values() else "; ".join(sorted(set(skipped.values())))
                out.append(outcome("skipped", row, reason=reason, skips=skips))
        return out


def commit(batch: pa.Table, output: str, run_id: str) -> pa.Table:
    """Write one block's task rows to OUTPUT/part-<digest>.parquet and its error rows to
    OUTPUT/_errors/ (names from the block's sample ids, so a retried task rewrites the same
    objects); return one stats row of JSON counts for the manifest."""
    rows = batch.to_pylist()
    tasks = [r for r in rows if r["kind"] == "task"]
    errors = [{k: r[k] for k in ("sample_id", "source_file", "stage", "reason")} for r in rows if r["kind"] == "error"]
    name = f"part-{ledger.digest(r['sample_id'] or r['source_file'] or '' for r in rows)}.parquet"
    if tasks:
        table = pa.Table.from_pylist([{k: r[k] for k in schema.TASK.names} for r in tasks], schema=schema.TASK)
        storage.write_table_atomic(table, storage.join(output, name))
    ledger.write_errors(errors, output, name, run_id)
    return pa.Table.from_pylist([{"stats": json.dumps(block_stats(rows))}])


def block_stats(rows: list[Row]) -> dict[str, Any]:
    """Counts of one block: samples with tasks, skipped (by reason), errors (by stage), task rows and
    per-task skips."""
    with_tasks = {r["sample_id"] for r in rows if r["kind"] == "task"}
    task_rows = collections.Counter(r["task"] for r in rows if r["kind"] == "task")
    skipped = collections.Counter(r["reason"] for r in rows if r["kind"] == "skipped")
    errors = collections.Counter(r["stage"] for r in rows if r["kind"] == "error")
    file_errors = sum(1 for r in rows if r["kind"] == "error" and r["sample_id"] is None)
    per_task: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seen = set()
    for r in rows:
        if r["kind"] in ("task", "skipped") and r["sample_id"] not in seen:
            seen.add(r["sample_id"])
            for task, why in json.loads(r["skips"] or "{}").items():
                per_task[task][why] += 1
    return {"samples_with_tasks": len(with_tasks), "task_rows": dict(task_rows), "skipped": dict(skipped),
            "errors": dict(errors), "file_errors": file_errors,
            "task_skips": {t: dict(c) for t, c in per_task.items()}}


def merge_stats(blocks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"samples_with_tasks": 0, "file_errors": 0}
    counters = {k: collections.Counter() for k in ("task_rows", "skipped", "errors")}
    task_skips: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for b in blocks:
        total["samples_with_tasks"] += b["samples_with_tasks"]
        total["file_errors"] += b["file_errors"]
        for k, c in counters.items():
            c.update(b[k])
        for t, c in b["task_skips"].items():
            task_skips[t].update(c)
    total.update({k: dict(c) for k, c in counters.items()})
    total["task_skips"] = {t: dict(c) for t, c in task_skips.items()}
    return total


# ---------------------------------------------------------------- the job


def prepare_output(cfg: BuildConfig) -> None:
    """Refuse to mix runs: an existing output is replaced only with overwrite=true, and only when it
    is one of ours (holds a manifest) or empty."""
    if not storage.exists(cfg.output):
        return
    fs, raw = storage.filesystem(cfg.output), storage.strip(cfg.output)
    ours = storage.exists(storage.join(cfg.output, MANIFEST))
    if not fs.ls(raw):
        return
    if not cfg.overwrite:
        raise SystemExit(f"output {cfg.output} already exists; pass overwrite=true (or --overwrite) to replace it")
    if not ours:
        raise SystemExit(f"output {cfg.output} is not empty and holds no {MANIFEST}; refusing to delete it")
    storage.remove(cfg.output)


def build_dataset(cfg: BuildConfig, reads: list[dict], run_id: str) -> Any:
    """read row groups (caption_corpus's reader: contract check, duplicates marked) -> blocks of
    `batch_size` -> TaskBuilder actors (decode + spaCy + tasks) -> commit."""
    import ray.data

    from eama.news import captioning

    io = {"num_cpus": cfg.io_cpus}
    ds = ray.data.from_items(reads, override_num_blocks=max(1, len(reads)))
    ds = ds.map_batches(captioning.read_row_groups, batch_size=1, batch_format="pyarrow", **io,
                        fn_kwargs={"max_article_words": cfg.max_article_words})
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(TaskBuilder, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.batch_size,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                        num_cpus=cfg.actor_cpus)
    return ds.map_batches(commit, batch_size=None, batch_format="pyarrow", **io,
                          fn_kwargs={"output": cfg.output, "run_id": run_id})


def run(cfg: BuildConfig) -> dict[str, Any]:
    """Build the task rows of every input sample; write them, the error rows and the manifest."""
    import ray

    from eama.news.pipeline import inspect_inputs, new_run_id, plan_reads

    validate(cfg)
    if not cfg.input or not cfg.output:
        raise SystemExit("build_alignment_data needs --input and --output")
    cfg.input, cfg.output = storage.absolute(cfg.input), storage.absolute(cfg.output)
    prepare_output(cfg)
    if not ray.is_initialized():
        ray.init()
    run_id, started = new_run_id(), time.time()
    files = storage.list_files(cfg.input)
    row_groups, bad_files = inspect_inputs(files)
    ledger.write_file_errors(bad_files, cfg.output, run_id)
    reads = plan_reads(row_groups, {}, {})
    blocks = [json.loads(r["stats"]) for r in build_dataset(cfg, reads, run_id).iter_rows()] if reads else []
    stats = merge_stats(blocks)
    samples_in = sum(sum(sizes) for sizes in row_groups.values())
    manifest = make_manifest(cfg, run_id, samples_in, len(files), len(bad_files), stats, time.time() - started)
    storage.write_json_atomic(storage.join(cfg.output, MANIFEST), manifest)
    return manifest


def make_manifest(cfg: BuildConfig, run_id: str, samples_in: int, files: int, bad_files: int,
                  stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    sample_errors = sum(stats["errors"].values()) - stats["file_errors"]
    without = sum(stats["skipped"].values())
    manifest = {
        "run_id": run_id,
        "input": cfg.input,
        "output": cfg.output,
        "files": {"listed": files, "unusable": bad_files},
        "samples_in": samples_in,
        "samples_with_tasks": stats["samples_with_tasks"],
        "samples_without_tasks": {"total": without, "by_reason": stats["skipped"]},
        "error_rows": {"total": sample_errors + stats["file_errors"] + bad_files,
                       "samples": sample_errors, "files": stats["file_errors"] + bad_files,
                       "by_stage": stats["errors"]},
        "task_rows": {t: stats["task_rows"].get(t, 0) for t in cfg.tasks},
        "task_skips": stats["task_skips"],
        "config": dataclasses.asdict(cfg),
        "wall_seconds": round(seconds, 2),
    }
    manifest["task_rows_total"] = sum(manifest["task_rows"].values())
    manifest["balanced"] = samples_in == stats["samples_with_tasks"] + without + sample_errors
    if not manifest["balanced"]:
        log.error("rows in (%d) != samples with tasks + without + error rows: %s", samples_in, manifest)
    return manifest


def read_manifest(tasks_dir: str) -> dict[str, Any]:
    return storage.read_json(storage.join(tasks_dir, MANIFEST))
