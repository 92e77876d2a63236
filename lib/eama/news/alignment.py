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
Each sample's normalised image is written once, to OUTPUT/_images (schema.TASK_IMAGE, keyed by
sample_id), and its task rows leave `image` null: training sorts the small rows and joins the
images back by sample_id (engine/blobs.py).
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
from typing import Any, Sequence

import pyarrow as pa

from eama.engine import config, entities, faults, images, runner, schema, storage
from eama.engine.runner import fail, pending
from eama.news import candidates, captioning, prompts

log = logging.getLogger("eama.alignment")

Row = dict[str, Any]

MANIFEST = "_manifest.json"

# Why a sample yields no task row at all (the manifest counts each).
NO_IMAGE, EMPTY_CAPTION, NO_ENTITIES = "no image", "empty caption", "no entities"
# Why one task skips a sample that other tasks may still use.
NO_SHARED_VISUAL_ENTITY, NO_NEGATIVE = "no sentence shares a visual entity with the caption", "no negative sentence"


@dataclasses.dataclass
class BuildConfig(runner.RunnerConfig):
    """build_alignment_data settings (defaults follow the paper where it says, ours elsewhere);
    the runner's keys (input, output, commit_rows, ...) come first."""

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
    commit_rows: int = 500  # samples per committed file (and per file of their images, OUTPUT/_images)
    actors: int = 1  # spaCy actors
    actor_cpus: float = 0.5  # per actor; on 2 CPUs a pool holding every CPU hangs Ray Data
    io_cpus: float = 0.25  # per read / commit task
    max_article_words: int = 5000


def validate(cfg: BuildConfig) -> None:
    """ValueError for settings no run can use (jobs turn it into a ConfigError); see also `check_paths`."""
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
    if cfg.actors < 1 or cfg.actor_cpus <= 0 or cfg.io_cpus <= 0:
        raise ValueError("actors must be >= 1 and actor_cpus, io_cpus > 0")
    if not cfg.input or not cfg.output:
        raise ValueError("build_alignment_data needs --input and --output")
    runner.validate(cfg)


def check_paths(cfg: BuildConfig) -> None:
    """UserError (one line, exit 1 under config.main) when the input is not there; before Ray starts."""
    config.require_path(cfg.input, "input")


# ---------------------------------------------------------------- labels


def shares_visual_entity(sentence: str, article_entities: Sequence[dict], caption_entities: Sequence[dict]) -> bool:
    """True when a visual entity of `sentence` matches a visual entity of the caption."""
    caption_names = [e["text"] for e in entities.visual(caption_entities)]
    mentioned = entities.visual(entities.sentence_entities(sentence, article_entities))
    return any(entities.match_any(e["text"], caption_names) for e in mentioned)


def names_visual_entity(sentence: str, article_entities: Sequence[dict]) -> bool:
    return bool(entities.visual(entities.sentence_entities(sentence, article_entities)))


def caption_entity_targets(offered: Sequence[str], caption_entities: Sequence[dict]) -> list[str]:
    """The candidates (article entities) that also occur in the caption, any label."""
    caption_names = [e["text"] for e in caption_entities]
    return [c for c in offered if entities.match_any(c, caption_names)]


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
    offered = candidates.candidate_entities(a.article_entities)
    if not offered:
        return [], NO_ENTITIES
    targets = caption_entity_targets(offered, a.caption_entities)
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
    """One task row; its image is stored once per sample (`image_rows`), so the row's own is null."""
    return {"task": task, "sample_id": a.sample_id, "image": None, "prompt": prompt, "target": target,
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


# ---------------------------------------------------------------- the batch-runner job

# What the builder stage adds to a sample: its task rows (possibly none), why a sample yields
# none, and per task why it was skipped (JSON {task: reason}).
WORK = schema.work_schema(
    list(schema.SAMPLE) + [pa.field("tasks", pa.list_(pa.struct(list(schema.TASK)))),
                           pa.field("skip_reason", pa.string()), pa.field("skips", pa.string())],
    ("build",))


class TaskBuilder:
    """Ray Data actor: decode images, spaCy over articles and captions, then the task rows."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.nlp = entities.load_nlp(cfg.spacy_model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ready: list[tuple[Row, bytes]] = []
        for row in pending(rows):
            reason, image = self._usable(row)
            if reason == "error":
                fail(row, "decode", image)
            elif reason:
                row["skip_reason"], row["tasks"] = reason, []
            else:
                ready.append((row, image))
        for row in rows:
            row["image"] = None
        self._annotate_and_build(ready)
        return pa.Table.from_pylist(rows, schema=WORK)

    def _usable(self, row: Row) -> tuple[str | None, Any]:
        """(None, normalised image) or (skip reason, None) or ('error', message)."""
        if not clean_caption(row.get("caption")):
            return EMPTY_CAPTION, None
        try:
            raw = images.fetch(row.get("image"), row.get("image_uri"))
            if raw is None:
                return NO_IMAGE, None
            return None, images.normalize_image(raw)
        except Exception as exc:  # undecodable, too large, missing file; transient faults go to the runner
            if faults.is_transient(exc):
                raise
            return "error", str(exc)

    def _annotate_and_build(self, ready: list[tuple[Row, bytes]]) -> None:
        if not ready:
            return
        articles = entities.annotate(self.nlp, [r["article"] for r, _ in ready])
        captions = entities.extract_entities(self.nlp, [clean_caption(r["caption"]) for r, _ in ready])
        for (row, image), (ents, sents), cap_ents in zip(ready, articles, captions):
            a = Annotated(row["sample_id"], row.get("headline"), row["article"], clean_caption(row["caption"]),
                          image, ents, sents, cap_ents)
            tasks, skipped = build_tasks(a, self.cfg)
            row["tasks"], row["skips"] = tasks, json.dumps(skipped, sort_keys=True)
            row["image"] = image if tasks else None  # the normalised image, written once (image_rows)
            if not tasks:
                row["skip_reason"] = (NO_ENTITIES if not ents or NO_ENTITIES in skipped.values()
                                      else "; ".join(sorted(set(skipped.values()))))


def emit_tasks(row: Row) -> list[Row]:
    return list(row.get("tasks") or [])


def image_rows(row: Row) -> list[Row]:
    """The sample's normalised image, once for all its task rows (OUTPUT/_images)."""
    return [{"sample_id": row["sample_id"], "image": row["image"]}] if row.get("tasks") else []


def build_in_process(samples: list[Row], cfg: BuildConfig | None = None) -> tuple[list[Row], dict[str, str]]:
    """(task rows, sample_id -> why it yields none) of sample rows, without Ray (tests, benchmarks);
    each task row carries its sample's image inline."""
    out = TaskBuilder(cfg or BuildConfig())(pa.Table.from_pylist(samples)).to_pylist()
    tasks = [dict(t, image=r["image"]) for r in out for t in emit_tasks(r)]
    return tasks, {r["sample_id"]: r["skip_reason"] for r in out if r["skip_reason"]}


def block_stats(rows: list[Row]) -> dict[str, Any]:
    """Counts of one commit: samples with tasks, skipped (by reason), task rows and per-task skips."""
    done = [r for r in rows if not r.get("error_stage")]
    task_rows = collections.Counter(t["task"] for r in done for t in (r.get("tasks") or []))
    per_task: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in done:
        for task, why in json.loads(r.get("skips") or "{}").items():
            per_task[task][why] += 1
    return {"samples_with_tasks": sum(1 for r in done if r.get("tasks")),
            "skipped": dict(collections.Counter(r["skip_reason"] for r in done if not r.get("tasks"))),
            "task_rows": dict(task_rows), "task_skips": {t: dict(c) for t, c in per_task.items()}}


def alignment_job(cfg: BuildConfig) -> runner.BatchJob:
    import functools

    return runner.BatchJob(
        name="build_alignment_data", input_schema=schema.SAMPLE, required=schema.SAMPLE_REQUIRED,
        work_schema=WORK, output_schema=schema.TASK,
        stages=[runner.Stage("build", TaskBuilder, {"cfg": cfg}, actors=cfg.actors, cpus=cfg.actor_cpus)],
        emit=emit_tasks, stats=block_stats, io_cpus=cfg.io_cpus,
        attachments=[runner.Attachment(schema.TASK_IMAGES_DIR, schema.TASK_IMAGE, image_rows)],
        check_table=schema.check_sample_images,
        prepare=functools.partial(captioning.prepare_sample, max_article_words=cfg.max_article_words),
    )


def run(cfg: BuildConfig) -> dict[str, Any]:
    """Build the task rows of every pending input sample (a re-run resumes; overwrite=true
    starts again); write them, the error rows and the manifest."""
    with config.checking_settings():
        validate(cfg)
    check_paths(cfg)
    m = runner.run(alignment_job(cfg), cfg)
    manifest = make_manifest(cfg, m)
    storage.write_json_atomic(storage.join(cfg.output, MANIFEST), manifest)
    return manifest


def make_manifest(cfg: BuildConfig, m: dict[str, Any]) -> dict[str, Any]:
    """The runner's manifest in alignment terms: samples with tasks, without (by reason), errors."""
    counts, this = m["this_run"]["counts"], m["this_run"]
    skipped = counts.get("skipped", {})
    file_errors = m["input"]["unusable_files"]
    sample_errors = this["errors"] - file_errors
    with_tasks = counts.get("samples_with_tasks", 0)
    manifest = {
        "run_id": m["run_id"], "input": cfg.input, "output": cfg.output,
        "files": {"listed": m["input"]["files"], "unusable": file_errors},
        "samples_in": m["input"]["rows_pending"],
        "samples_with_tasks": with_tasks,
        "samples_without_tasks": {"total": sum(skipped.values()), "by_reason": skipped},
        "error_rows": {"total": this["errors"], "samples": sample_errors, "files": file_errors,
                       "retryable": this["retryable_errors"], "by_stage": this["errors_by_stage"]},
        "task_rows": {t: counts.get("task_rows", {}).get(t, 0) for t in cfg.tasks},
        "task_skips": counts.get("task_skips", {}),
        "output_total": m["output_total"],
        "config": dataclasses.asdict(cfg), "wall_seconds": m["wall_seconds"],
    }
    manifest["task_rows_total"] = sum(manifest["task_rows"].values())
    manifest["balanced"] = m["input"]["rows_pending"] == with_tasks + sum(skipped.values()) + sample_errors
    if not manifest["balanced"]:
        log.error("rows in (%d) != samples with tasks + without + error rows: %s", manifest["samples_in"], manifest)
    return manifest


def read_manifest(tasks_dir: str) -> dict[str, Any]:
    return storage.read_json(storage.join(tasks_dir, MANIFEST))
