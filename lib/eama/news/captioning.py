"""caption_corpus's stages: each a small callable over a pyarrow batch in the WORK schema.

A row that fails in a stage gets error_stage / error_reason set (runner.fail) and passes through
the later stages untouched, so the commit accounts for every input row as output or as an error.
Bad data fails only its row; transient faults propagate to the runner's guard, which retries.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

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
    engine: str = "hf"  # hf | vllm (caption_job resolves engine=auto with generation.choose_engine)
    max_new_tokens: int = 48
    selection_max_new_tokens: int = 32
    generate_batch_size: int = 8
    share_image_prefix: bool = True  # eama on hf: run each image + news context once for its three prompts
    selection_groups: int = 0  # eama: candidate groups selected over per sample (0: the whole article)
    max_model_len: int = 0  # prompt + answer tokens allowed; 0 = the model's own limit
    vllm_kv_cache_gib: float = 0.0
    hf_token_budget: int = 8192  # hf: KV-cache tokens one generate call holds (generation.budget_batches); 0 = none
    trust_remote_code: bool = False
    revision: str | None = None
    threads: int = 1


@dataclasses.dataclass
class Wave:
    """Rows asked about together, their images, and the cached heads of their contexts (hf) that
    their prompts continue."""

    rows: list[Row]
    imgs: list[Any]
    prefix: Any = None


class Captioner:
    """EAMA self-supplemented captioning with one engine per actor (news/engines.py: vLLM or
    transformers), which serves every round of a batch.

    Mode 'eama': (a) entity-aware sentence selection and (b) entity selection, asked together in
    one batched call per group of candidates (the whole article in prompt-sized groups,
    candidates.selection_groups), then (c) the caption prompted with every group's selections; all
    start with the sample's news context (prompts.news_context: the article within the word
    budget, the group's sentences numbered, its entities listed), so their image + context head is
    computed once: continued explicitly on transformers (models.image_prefix), found in vLLM's
    prefix cache. The caption continues group 0's.
    Mode 'plain': image + truncated article -> caption ('Base').
    A context longer than the model allows is cut (prompts.fit_words, the same rule on both
    engines); candidates that overrun it even with no article passage are asked about in smaller
    groups; a row that does not fit with one candidate is an error naming its tokens."""

    def __init__(self, cfg: CaptionerConfig, lm: Any = None, engine: Any = None):
        import torch

        from eama.news import engines

        if cfg.device == "cpu":
            torch.set_num_threads(max(1, cfg.threads))
        self.cfg = cfg
        if engine is None and lm is not None:
            engine = engines.HfEngine(lm, cfg.share_image_prefix, cfg.max_model_len, cfg.hf_token_budget)
        self.engine = engine or engines.load_engine(
            cfg.engine, cfg.model, cfg.device, cfg.share_image_prefix, cfg.max_model_len, cfg.vllm_kv_cache_gib,
            cfg.trust_remote_code, cfg.revision, cfg.hf_token_budget, max(1, cfg.threads))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        self._run_isolated(pending(rows))
        return to_work(rows)

    def _run_isolated(self, todo: list[Row]) -> None:
        isolate(todo, self.cfg.generate_batch_size, self.caption, "mllm")

    def _generate(self, wave: Wave, asked: list[int], instructions: list[str], max_new: int,
                  lists: list[tuple[str, list[str]]] | None = None) -> list[str]:
        """Answers to `instructions`, the i-th about row `asked[i]` of the wave; each row's prompt
        and cached tokens are added to its counts."""
        prefix = (wave.prefix, asked) if wave.prefix is not None else None
        out = self.engine.generate(instructions, [wave.imgs[i] for i in asked], max_new, lists, prefix=prefix)
        for i, tokens, cached in zip(asked, out.prompt_tokens, out.cached_tokens):
            wave.rows[i]["mllm_prompt_tokens"] += tokens
            wave.rows[i]["mllm_cached_tokens"] += cached
        return out.texts

    def caption(self, chunk: list[Row]) -> None:
        for r in chunk:
            r["selected_sentence_ids"], r["selected_sentences"], r["selected_entities"] = [], [], []
            r["dropped_answers"] = r["mllm_prompt_tokens"] = r["mllm_cached_tokens"] = 0
        if self.cfg.mode == "eama":
            self._caption_eama(chunk)
            return
        def plain(r: Row, budget: int) -> str:
            return prompts.caption_prompt(prompts.plain_context(r["article"], r["headline"], budget))

        fitted = [(r, self._fit(functools.partial(plain, r), prompts.WORD_BUDGET,
                                lambda p: [(p, self.cfg.max_new_tokens)], r)) for r in chunk]
        fitted = [(r, p) for r, p in fitted if p is not None]
        wave = Wave([r for r, _ in fitted], [images.load_rgb(r["image_rgb"]) for r, _ in fitted])
        self._write_captions(wave, [p for _, p in fitted])

    def _caption_eama(self, chunk: list[Row]) -> None:
        plans = {id(r): self._plan(r) for r in chunk}
        chunk = [r for r in chunk if plans[id(r)] is not None]
        groups = {id(r): plans[id(r)][0] for r in chunk}
        contexts = {id(r): plans[id(r)][1] for r in chunk}
        imgs = {id(r): images.load_rgb(r["image_rgb"]) for r in chunk}
        wave = Wave([], [])
        # one wave per group index, group 0 last: every row has one, and its context heads the
        # caption prompt, so that wave's cached heads serve the captions too
        for index in reversed(range(max((len(groups[id(r)]) for r in chunk), default=0))):
            rows = [r for r in chunk if index < len(groups[id(r)])]
            wave = Wave(rows, [imgs[id(r)] for r in rows])
            wave.prefix = self.engine.heads(wave.imgs, [contexts[id(r)][index] for r in rows])
            self._select(wave, [contexts[id(r)][index] for r in rows], [groups[id(r)][index] for r in rows])
        for r in chunk:
            in_order(r)
        self._write_captions(wave, [self._caption_prompt(r, contexts[id(r)][0]) for r in wave.rows])

    def _write_captions(self, wave: Wave, caption_prompts: list[str]) -> None:
        if not wave.rows:
            return
        texts = self._generate(wave, list(range(len(wave.rows))), caption_prompts, self.cfg.max_new_tokens)
        for r, text in zip(wave.rows, texts):
            r["generated_caption"] = text

    # ------------------------------------------------------------ fitting prompts to the model

    def _over(self, asks: list[tuple[str, int]]) -> int:
        """Tokens by which the longest of these (prompt, new tokens) asks overruns the model's limit."""
        tokens = self.engine.prompt_tokens([p for p, _ in asks])
        return max(t + n for t, (_, n) in zip(tokens, asks)) - self.engine.token_limit

    def _fit(self, build: Callable[[int], str], budget: int, asks: Callable[[str], list[tuple[str, int]]],
             row: Row, fail_row: bool = True) -> str | None:
        """build(b) cut to fit the model (prompts.fit_words); None when nothing fits, with the row
        failed naming its tokens unless `fail_row` is false."""
        fitted = prompts.fit_words(build, budget, lambda text: self._over(asks(text)))
        if fitted is None and fail_row:
            need = self._over(asks(build(0))) + self.engine.token_limit
            fail(row, "mllm", f"prompt too long: {need} tokens (prompt and answer, with no article text) "
                              f"exceed the model's limit of {self.engine.token_limit} (max_model_len)")
        return fitted

    def _plan(self, r: Row) -> tuple[list[candidates.Group], list[str]] | None:
        """A row's candidate groups and the context of each. The groups are as large as one prompt
        holds, halved while some group's prompts overrun the model even with no article passage;
        None, with the row failed naming its tokens, when single candidates still do not fit."""
        limits = (prompts.MAX_CANDIDATE_SENTENCES, prompts.MAX_CANDIDATE_ENTITIES)
        while True:
            last = limits == (1, 1)
            groups = candidates.selection_groups(r["sentences"] or [], r["article_entities"] or [],
                                                 self.cfg.selection_groups, *limits)
            contexts = []
            for k, group in enumerate(groups):
                context = self._context(r, group, caption=k == 0, fail_row=last)
                if context is None:
                    break
                contexts.append(context)
            else:
                return groups, contexts
            if last:
                return None
            limits = (max(1, limits[0] // 2), max(1, limits[1] // 2))

    def _context(self, r: Row, group: candidates.Group, caption: bool, fail_row: bool = True) -> str | None:
        """The news context of a row's prompts about `group` (and of its caption prompt, for group 0),
        its article cut so that each of them fits."""
        sel, cap = self.cfg.selection_max_new_tokens, self.cfg.max_new_tokens

        def asks(context: str) -> list[tuple[str, int]]:
            out = [(prompts.sentence_selection_prompt(context), sel)] if group.sentence_ids else []
            out += [(prompts.entity_selection_prompt(context), sel)] if group.entities else []
            return out + ([(prompts.caption_prompt(context), cap)] if caption or not out else [])

        return self._fit(lambda budget: prompts.news_context(r["article"], r["headline"], r["sentences"] or [],
                                                             group.sentence_ids, group.entities, budget),
                         prompts.WORD_BUDGET - prompts.SELECTION_WORDS, asks, r, fail_row)

    def _caption_prompt(self, r: Row, context: str) -> str:
        """The caption prompt with the row's selections, as many of their words as fit."""
        ents = [e["text"] for e in r["selected_entities"]]
        fitted = prompts.fit_words(lambda b: prompts.caption_prompt(context, r["selected_sentences"], ents, b),
                                   prompts.SELECTION_WORDS, lambda p: self._over([(p, self.cfg.max_new_tokens)]))
        return fitted or prompts.caption_prompt(context)

    # ------------------------------------------------------------ selection

    def _answer_bound(self, asks: list[tuple[Row, str, list[Any]]]) -> int:
        """Decode no longer than the longest possible valid answer (every candidate listed), capped
        by selection_max_new_tokens: anything longer is necessarily garbage."""
        full = [prompts.format_sentence_target(range(len(cands))) if kind == "sentences"
                else prompts.format_entity_target(cands) for _, kind, cands in asks]
        longest = max(len(ids) for ids in self.engine.tokenizer(full, add_special_tokens=False)["input_ids"]) + 1
        return max(1, min(self.cfg.selection_max_new_tokens, longest))

    def _select(self, wave: Wave, contexts: list[str], groups: list[candidates.Group]) -> None:
        """(a) sentence and (b) entity selection over one group of each row of the wave, in one
        batched call; what a row picks is added to what its other groups picked."""
        asks: list[tuple[Row, str, list[Any]]] = []  # (row, kind, candidates)
        instructions, asked = [], []
        for k, (r, context, group) in enumerate(zip(wave.rows, contexts, groups)):
            if group.sentence_ids:
                asks.append((r, "sentences", group.sentence_ids))
                instructions.append(prompts.sentence_selection_prompt(context))
                asked.append(k)
            if group.entities:
                asks.append((r, "entities", group.entities))
                instructions.append(prompts.entity_selection_prompt(context))
                asked.append(k)
        if not asks:
            return
        lists = [(kind, prompts.answer_choices(kind, cands)) for _, kind, cands in asks]
        answers = self._generate(wave, asked, instructions, self._answer_bound(asks), lists)
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
