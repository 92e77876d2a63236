"""caption_corpus's stages: each a small callable over a pyarrow batch in the WORK schema.

A row that fails in a stage gets error_stage / error_reason set (runner.fail) and passes through
the later stages untouched, so the commit accounts for every input row as output or as an error.
Bad data fails only its row; transient faults propagate to the runner's guard, which retries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

from eama.engine import entities, faults, images, schema
from eama.engine.runner import fail, isolate, pending
from eama.news import candidates, prompts

Row = dict[str, Any]

MODES = ("eama", "plain")


def to_work(rows: list[Row]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema.WORK)


def prepare_sample(row: Row, max_article_words: int) -> str | None:
    """Per-row check after read: an empty article is an error; a long one is cut to the budget."""
    if not (row.get("article") or "").strip():
        return "empty article"
    if len(row["article"].split()) > max_article_words:
        row["article"] = prompts.truncate_words(row["article"], max_article_words)
    return None


# ---------------------------------------------------------------- decode


def decode_images(batch: pa.Table, max_side: int, max_pixels: int) -> pa.Table:
    """Fetch (image bytes or image_uri) and normalise every image to a bounded RGB JPEG."""
    rows = batch.to_pylist()
    for r in pending(rows):
        try:
            data = images.fetch(r["image"], r["image_uri"])
            r["image_rgb"] = images.normalize_image(data, max_side, max_pixels)
        except Exception as exc:
            if faults.is_transient(exc):
                raise  # the runner retries the batch (an S3 blip is not the image's fault)
            fail(r, "decode", str(exc))
    for r in rows:
        r["image"] = None  # the raw bytes are not needed downstream
    return to_work(rows)


# ---------------------------------------------------------------- spaCy


class EntityAnnotator:
    """spaCy NER + sentence split over articles (field='article') or generated captions
    (field='generated_caption'); loads the pipeline once per actor."""

    def __init__(self, spacy_model: str, field: str = "article", prefer_gpu: bool = False, batch_size: int = 32):
        self.nlp = entities.load_nlp(spacy_model, prefer_gpu)
        self.field = field
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        self._annotate(pending(rows))
        return to_work(rows)

    def _annotate(self, todo: list[Row]) -> None:
        """spaCy over the batch; a row that breaks it fails alone ('spaCy failed: ...')."""
        isolate(todo, max(1, len(todo)), self._annotate_chunk, "ner" if self.field == "article" else "caption_ner")

    def _annotate_chunk(self, todo: list[Row]) -> None:
        texts = [r[self.field] or "" for r in todo]
        try:
            if self.field == "article":
                for r, (ents, sents) in zip(todo, entities.annotate(self.nlp, texts, self.batch_size)):
                    r["article_entities"], r["sentences"] = ents, sents
            else:
                for r, ents in zip(todo, entities.extract_entities(self.nlp, texts, self.batch_size)):
                    r["caption_entities"] = ents
        except Exception as exc:
            if faults.is_transient(exc):
                raise
            raise RuntimeError(f"spaCy failed: {exc}") from exc


# ---------------------------------------------------------------- MLLM


@dataclasses.dataclass
class CaptionerConfig:
    model: str
    mode: str = "eama"
    device: str = "cpu"
    max_new_tokens: int = 48
    selection_max_new_tokens: int = 32
    generate_batch_size: int = 8
    share_image_prefix: bool = True  # eama: run each image + news context once for its three prompts
    selection_groups: int = 0  # eama: candidate groups selected over per sample (0: the whole article)
    trust_remote_code: bool = False
    revision: str | None = None
    threads: int = 1


class Captioner:
    """EAMA self-supplemented captioning with one model replica per actor.

    Mode 'eama': (a) entity-aware sentence selection and (b) entity selection, asked together in
    one batched generate call per group of candidates (the whole article in prompt-sized groups,
    candidates.selection_groups), then (c) the caption prompted with every group's selections; all
    start with the sample's news context (prompts.news_context: the article within the word
    budget, the group's sentences numbered, its entities listed). Where the model allows
    (models.shares_image_prefix), image and context run once per group and its prompts continue
    that KV cache with their own lines; the caption continues group 0's.
    Mode 'plain': image + truncated article -> caption ('Base')."""

    def __init__(self, cfg: CaptionerConfig, lm: Any = None):
        import torch

        from eama.news import models

        if cfg.device == "cpu":
            torch.set_num_threads(max(1, cfg.threads))
        self.cfg = cfg
        self.lm = lm or models.load_model(cfg.model, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                                          revision=cfg.revision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        self._run_isolated(pending(rows))
        return to_work(rows)

    def _run_isolated(self, todo: list[Row]) -> None:
        isolate(todo, self.cfg.generate_batch_size, self.caption, "mllm")

    def _generate(self, instructions: list[str], rows: list[int], imgs: list[Any], prefix: Any, max_new: int,
                  lists: list[tuple[str, list[str]]] | None = None) -> list[str]:
        """Answers to `instructions`, the i-th about image `rows[i]` of the chunk."""
        from eama.news import models

        return models.generate_text(self.lm, instructions, [imgs[i] for i in rows], max_new, lists,
                                    prefix=(prefix, rows) if prefix is not None else None)

    def caption(self, chunk: list[Row]) -> None:
        from eama.news import models

        imgs = [images.load_rgb(r["image_rgb"]) for r in chunk]
        for r in chunk:
            r["selected_sentence_ids"], r["selected_sentences"], r["selected_entities"] = [], [], []
            r["dropped_answers"] = 0
        prefix = None
        if self.cfg.mode == "eama":
            groups = [candidates.selection_groups(r["sentences"] or [], r["article_entities"] or [],
                                                  self.cfg.selection_groups) for r in chunk]
            share = self.cfg.share_image_prefix and models.shares_image_prefix(self.lm)
            # one wave per group index, group 0 last: every row has one, and its context heads the
            # caption prompt, so that wave's cached heads serve the captions too
            for wave in reversed(range(max(len(g) for g in groups))):
                rows = [k for k, g in enumerate(groups) if wave < len(g)]
                contexts = [self._context(chunk[k], groups[k][wave]) for k in rows]
                prefix = models.image_prefix(self.lm, [imgs[k] for k in rows], contexts) if share else None
                self._select([chunk[k] for k in rows], [imgs[k] for k in rows], contexts,
                             [groups[k][wave] for k in rows], prefix)
            for r in chunk:
                in_order(r)
            caption_prompts = [prompts.caption_prompt(c, r["selected_sentences"], [e["text"] for e in r["selected_entities"]])
                               for r, c in zip(chunk, contexts)]
        else:
            caption_prompts = [prompts.caption_prompt(prompts.plain_context(r["article"], r["headline"])) for r in chunk]
        captions = self._generate(caption_prompts, list(range(len(chunk))), imgs, prefix, self.cfg.max_new_tokens)
        for r, text in zip(chunk, captions):
            r["generated_caption"] = text

    @staticmethod
    def _context(r: Row, group: candidates.Group) -> str:
        return prompts.news_context(r["article"], r["headline"], r["sentences"] or [], group.sentence_ids,
                                    group.entities)

    def _answer_bound(self, asks: list[tuple[Row, str, list[Any]]]) -> int:
        """Decode no longer than the longest possible valid answer (every candidate listed), capped
        by selection_max_new_tokens: anything longer is necessarily garbage."""
        full = [prompts.format_sentence_target(range(len(cands))) if kind == "sentences"
                else prompts.format_entity_target(cands) for _, kind, cands in asks]
        longest = max(len(ids) for ids in self.lm.tokenizer(full, add_special_tokens=False)["input_ids"]) + 1
        return max(1, min(self.cfg.selection_max_new_tokens, longest))

    def _select(self, chunk: list[Row], imgs: list[Any], contexts: list[str], groups: list[candidates.Group],
                prefix: Any) -> None:
        """(a) sentence and (b) entity selection over one group of each row, in one batched
        generate call; what a row picks is added to what its other groups picked."""
        asks: list[tuple[Row, str, list[Any]]] = []  # (row, kind, candidates)
        instructions, ask_rows = [], []
        for k, (r, context, group) in enumerate(zip(chunk, contexts, groups)):
            if group.sentence_ids:
                asks.append((r, "sentences", group.sentence_ids))
                instructions.append(prompts.sentence_selection_prompt(context))
                ask_rows.append(k)
            if group.entities:
                asks.append((r, "entities", group.entities))
                instructions.append(prompts.entity_selection_prompt(context))
                ask_rows.append(k)
        if not asks:
            return
        lists = [(kind, prompts.answer_choices(kind, cands)) for _, kind, cands in asks]
        answers = self._generate(instructions, ask_rows, imgs, prefix, self._answer_bound(asks), lists)
        for (r, kind, cands), answer in zip(asks, answers):
            if kind == "sentences":
                picked, dropped = prompts.parse_sentence_ids(answer, len(cands))
                r["selected_sentence_ids"] += [cands[i] for i in picked]
            else:
                picked, dropped = prompts.parse_entities(answer, cands)
                by_text = {}
                for e in r["article_entities"]:
                    by_text.setdefault(entities.normalize(e["text"]), e)
                r["selected_entities"] += [by_text[entities.normalize(cands[i])] for i in picked]
            r["dropped_answers"] += dropped


def in_order(r: Row) -> None:
    """A row's selections from all its groups in article order, each once."""
    ids = sorted(set(r["selected_sentence_ids"]))
    r["selected_sentence_ids"], r["selected_sentences"] = ids, [r["sentences"][i] for i in ids]
    first = {}
    for k, e in enumerate(r["article_entities"] or []):
        first.setdefault(entities.normalize(e["text"]), k)
    unique = {entities.normalize(e["text"]): e for e in r["selected_entities"]}
    r["selected_entities"] = [unique[n] for n in sorted(unique, key=first.__getitem__)]
