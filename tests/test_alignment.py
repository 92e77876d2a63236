"""build_alignment_data: the three EAMA task rows follow their definitions, on the demo corpus
(through the Ray Data job) and on real New York Times articles (GoodNews sample)."""

from __future__ import annotations

import glob
import io
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eama.engine import blobs, entities, schema, storage
from eama.news import alignment, demo, importers, prompts

NYT = Path("news_sample")


# ---------------------------------------------------------------- helpers shared by the checks


def candidates_of(row: dict) -> list[str]:
    """The candidate sentences / entities exactly as the prompt lists them."""
    if row["task"] == "sentence_selection":
        return prompts.numbered_sentences(row["prompt"])
    return prompts.listed_entities(row["prompt"])


def check_sentence_row(row: dict, nlp, article: str, caption: str) -> tuple[int, int]:
    """Positives share a visual entity with the caption, negatives share none (recomputed here
    from spaCy's annotations); returns (positives, negatives)."""
    (ents, _), = entities.annotate(nlp, [article])
    cap_visual = [e["text"] for e in entities.visual(entities.extract_entities(nlp, [caption])[0])]
    cands = candidates_of(row)
    assert 2 <= len(cands) <= prompts.MAX_CANDIDATE_SENTENCES
    positive, dropped = prompts.parse_sentence_ids(row["target"], len(cands))
    assert positive and not dropped
    for i, sentence in enumerate(cands):
        shared = [e["text"] for e in entities.visual(entities.sentence_entities(sentence, ents))
                  if entities.match_any(e["text"], cap_visual)]
        if i in positive:
            assert shared, f"positive without a shared visual entity: {sentence!r} / {caption!r}"
        else:
            assert not shared, f"negative shares {shared}: {sentence!r} / {caption!r}"
    return len(positive), len(cands) - len(positive)


def check_entity_row(row: dict, nlp, article: str, caption: str) -> None:
    """Candidates are the article's entities; the target is those occurring in the caption."""
    (ents, _), = entities.annotate(nlp, [article])
    cap_texts = [e["text"] for e in entities.extract_entities(nlp, [caption])[0]]
    cands = candidates_of(row)
    assert cands == entities.unique_texts(ents)[: prompts.MAX_CANDIDATE_ENTITIES]
    chosen = [] if row["target"] == prompts.NONE_ANSWER else row["target"].split("; ")
    assert set(chosen) <= set(cands)
    for c in cands:
        assert (c in chosen) == entities.match_any(c, cap_texts), c


@pytest.fixture(scope="module")
def nlp():
    return entities.load_nlp()


# ---------------------------------------------------------------- pure pieces


def test_visual_entity_definition():
    ents = [{"text": "Maria Gonzalez", "label": "PERSON"}, {"text": "Monday", "label": "DATE"},
            {"text": "Paris", "label": "GPE"}]
    caption = [{"text": "Gonzalez", "label": "PERSON"}, {"text": "Monday", "label": "DATE"}]
    assert alignment.shares_visual_entity("Maria Gonzalez spoke.", ents, caption)  # surname matches
    assert not alignment.shares_visual_entity("It rained on Monday.", ents, caption)  # dates are not visual
    assert not alignment.shares_visual_entity("Paris was quiet.", ents, caption)
    # entity selection counts non-visual entities too
    assert alignment.caption_entity_targets(["Maria Gonzalez", "Monday", "Paris"], caption) == ["Maria Gonzalez", "Monday"]


def test_sentence_groups_mix_and_hard_negatives():
    shown = [f"sentence number {i} here" for i in range(20)]
    positive = [i in (2, 7, 11, 15) for i in range(20)]
    hard = [i % 2 == 0 for i in range(20)]
    cfg = alignment.BuildConfig(group_size=6, max_positives=2, groups_per_sample=3)
    groups = alignment.sentence_groups(shown, positive, hard, cfg, random.Random(0))
    assert len(groups) == 2  # 4 positives, 2 per group
    used_pos = []
    for members, pos_ids in groups:
        assert len(members) == 6 and members == sorted(members)
        assert len(pos_ids) == 2 and all(positive[members[k]] for k in pos_ids)
        negatives = [i for i in members if not positive[i]]
        assert all(hard[i] for i in negatives)  # 8 hard negatives exist: they come first
        used_pos += [members[k] for k in pos_ids]
    assert sorted(used_pos) == [2, 7, 11, 15]  # positives are not repeated across groups
    alone = alignment.sentence_groups(["too short", "x"], [True, False], [False, False], cfg, random.Random(0))
    assert alone == []


def test_news_context_numbers_offered_sentences_within_the_budget():
    """Every prompt of a sample starts with one context: offered sentences numbered in article
    order, those the passage does not reach listed after it, entities on one line, and the whole
    within its share of the 600-word budget."""
    sentences = [f"Sentence {i} is about {'Paris' if i in (3, 55) else 'nothing'} at some length here." for i in range(60)]
    article = " ".join(sentences)
    ctx = prompts.news_context(article, "A headline", sentences, [3, 55], ["Paris", "Lyon"])
    budget = prompts.WORD_BUDGET - prompts.SELECTION_WORDS
    labels = len(" ".join(re.findall(r"Headline:|Article:|Later in the article:|Entities:|\[\d+\]", ctx)).split())
    assert len(ctx.split()) - labels <= budget
    assert ctx.split("\n").index("[1] " + sentences[3]) < ctx.split("\n").index(prompts.LATER)
    assert ctx.endswith(f"{prompts.LATER}\n[2] {sentences[55]}\nEntities: Paris; Lyon")
    for prompt in (prompts.sentence_selection_prompt(ctx), prompts.entity_selection_prompt(ctx),
                   prompts.caption_prompt(ctx, [sentences[3]], ["Paris"])):
        assert prompt.startswith(ctx + prompts.CONTEXT_END)  # what the cached head holds
        assert prompts.numbered_sentences(prompt) == [sentences[3], sentences[55]]
        assert prompts.listed_entities(prompt) == ["Paris", "Lyon"]
    caption = prompts.caption_prompt(ctx, [sentences[3]] * 10, ["Paris"])
    assert len(caption.split(prompts.CONTEXT_END)[1].split()) <= prompts.SELECTION_WORDS + 10  # labels + instruction
    assert caption.endswith("\n" + prompts.CAPTION_INSTRUCTION)
    short = prompts.news_context("One. Two.", None, ["One.", "Two."], [1])
    assert short == "Article:\nOne.\n[1] Two."


def test_config_is_validated():
    with pytest.raises(ValueError):
        alignment.validate(alignment.BuildConfig(tasks=["captioning", "nope"]))
    with pytest.raises(ValueError):
        alignment.validate(alignment.BuildConfig(group_size=4, max_positives=4))


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "green").save(buf, "JPEG")
    return buf.getvalue()


HAND_ARTICLE = ("Mayor Anna Keller opened the Riverside Bridge in Hamburg on Tuesday. The project cost 40 million euros."
                "\n\nThousands of residents walked across the bridge. Keller thanked the engineers from Siemens.")
HAND_ENTITIES = "Entities: Anna Keller; the Riverside Bridge; Hamburg; Tuesday; 40 million; Thousands; Keller; Siemens"
# caption_corpus offers the sentences naming a visual entity (1 and 4), so those two are numbered
HAND_CONTEXT = ("Headline: Mayor Opens New Bridge\nArticle:\n"
                "[1] Mayor Anna Keller opened the Riverside Bridge in Hamburg on Tuesday.\n"
                "The project cost 40 million euros.\nThousands of residents walked across the bridge.\n"
                "[2] Keller thanked the engineers from Siemens.\n" + HAND_ENTITIES)


def test_hand_written_sample_gives_the_expected_rows():
    """Caption: Anna Keller, the Riverside Bridge, Hamburg. Sentences 1 and 4 name them ('Keller' is
    her surname), 2 and 3 name only numbers; the caption names four of the eight entities
    (not the date); the captioning prompt carries exactly those selections."""
    sample = {"sample_id": "hand-1", "article_id": "hand", "headline": "Mayor Opens New Bridge",
              "article": HAND_ARTICLE, "image": _jpeg(), "image_uri": None,
              "caption": "Anna Keller cuts the ribbon on the Riverside Bridge in Hamburg."}
    rows, skipped = alignment.build_in_process([sample])
    assert skipped == {}
    got = {r["task"]: (r["prompt"], r["target"], r["weight"]) for r in rows}
    assert len(rows) == 3 and all(r["sample_id"] == "hand-1" and r["image"] for r in rows)
    assert got["sentence_selection"] == (
        "Headline: Mayor Opens New Bridge\nArticle:\n"
        "[1] Mayor Anna Keller opened the Riverside Bridge in Hamburg on Tuesday.\n"
        "[2] The project cost 40 million euros.\n[3] Thousands of residents walked across the bridge.\n"
        "[4] Keller thanked the engineers from Siemens.\n" + HAND_ENTITIES + "\n\n"
        "Which numbered sentences name a person, organisation, place or event the image shows? "
        "Answer with their numbers separated by commas, or 'none'.", "1, 4", 1.0)
    assert got["entity_selection"] == (
        HAND_CONTEXT + "\n\nWhich of the entities belong in the caption of this image? "
        "Answer with them separated by semicolons, or 'none'.", "Anna Keller; the Riverside Bridge; Hamburg; Keller", 1.0)
    assert got["captioning"] == (
        HAND_CONTEXT + "\n\nKey entities: Anna Keller; the Riverside Bridge; Hamburg; Keller\n"
        "Key sentences: Mayor Anna Keller opened the Riverside Bridge in Hamburg on Tuesday. "
        "Keller thanked the engineers from Siemens.\nWrite the news caption of this image.",
        "Anna Keller cuts the ribbon on the Riverside Bridge in Hamburg.", 1.0)


# ---------------------------------------------------------------- real NYT articles


SMITH_CAPTION_TAIL = (
    "Key entities: Smith\n"
    "Key sentences: As Mr. Smith watched the flag rolled up and history unfold, he felt chills running along his "
    "spine. Now, on a hot Saturday afternoon eight days after that emotional ceremony, Mr. Smith was back at the "
    "capitol, only this time in his gray uniform and broad-brimmed campaign hat. Mr. Smith watched from the north "
    "side's top granite step as black demonstrators vented their frustrations. \"You could kind of feel the tension "
    "in the air,\" Mr. Smith recalled. Soon the demonstrators, a few dozen, came marching from the west, flanked by "
    "Mr. Smith's \"advance civil emergency response team.\"\n"
    "Write the news caption of this image."
)


def test_nyt_sample_rows_follow_definitions(shared_data, nlp):
    base = shared_data / NYT
    items = list(importers.goodnews_samples(str(base / "caption.json"), str(base / "images")))
    samples = [s for s, err in items if s]
    assert len(samples) == 12
    tasks, skipped = alignment.build_in_process(samples)
    by_id = {s["sample_id"]: s for s in samples}
    # two images of the sample have empty captions; everything else yields rows
    assert skipped == {"5a57160395d0e0110c1a3f23_0": alignment.EMPTY_CAPTION,
                       "51a92bb440e9ec65d203a9e4_0": alignment.EMPTY_CAPTION}
    assert {r["sample_id"] for r in tasks} | set(skipped) == set(by_id)
    counts = {t: sum(r["task"] == t for r in tasks) for t in schema.TASK_NAMES}
    assert counts["captioning"] == 10 and counts["entity_selection"] == 10
    assert counts["sentence_selection"] >= 2  # captions naming someone the article names
    pos = neg = 0
    for r in tasks:
        s = by_id[r["sample_id"]]
        caption = alignment.clean_caption(s["caption"])
        assert r["image"] and r["prompt"] and r["target"]
        if r["task"] == "sentence_selection":
            p, n = check_sentence_row(r, nlp, s["article"], caption)
            pos, neg = pos + p, neg + n
        elif r["task"] == "entity_selection":
            check_entity_row(r, nlp, s["article"], caption)
        else:
            assert r["target"] == caption
            # the same news context as the sample's entity-selection row, then its gold answers
            entity_row = next(e for e in tasks if e["sample_id"] == r["sample_id"] and e["task"] == "entity_selection")
            context, tail = r["prompt"].split("\n\n", 1)
            assert entity_row["prompt"].startswith(context + "\n\n")
            lines = tail.split("\n")
            assert lines[-1] == "Write the news caption of this image."
            named = [x.removeprefix("Key entities: ") for x in lines if x.startswith("Key entities: ")]
            assert named == ([] if entity_row["target"] == "none" else [entity_row["target"]])
            # the word budget holds: context and selected material, plus labels, markers and instruction
            assert len(r["prompt"].split()) <= prompts.WORD_BUDGET + 40
    assert pos and neg
    # the sentence splitter's paragraph joins are cut: no candidate spans a paragraph break
    for r in tasks:
        if r["task"] == "sentence_selection":
            paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", by_id[r["sample_id"]]["article"])]
            assert all(any(c in p for p in paragraphs) for c in candidates_of(r)), r["sample_id"]
    smith = [r for r in tasks if r["sample_id"] == "55b40f6b38f0d851b1f6dc7c_1" and r["task"] == "entity_selection"]
    assert smith and "Smith" in smith[0]["target"].split("; ")  # 'Mr. Smith' in the article, 'Leroy Smith' in the caption
    # its captioning prompt ends with the gold selections: 'Smith', and the article's five sentences
    # naming Mr. Smith (97 words, within the 99 the selection budget leaves), in article order
    smith_caption = next(r for r in tasks if r["sample_id"] == "55b40f6b38f0d851b1f6dc7c_1" and r["task"] == "captioning")
    assert smith_caption["prompt"].split("\n\n", 1)[1] == SMITH_CAPTION_TAIL


# ---------------------------------------------------------------- the Ray Data job on the demo corpus


def _bad_samples() -> list[dict]:
    good = next(demo.generate_samples(1, seed=5))
    return [
        dict(good, sample_id="bad-no-image", image=None, image_uri=None),
        dict(good, sample_id="bad-empty-caption", caption="   "),
        dict(good, sample_id="bad-corrupt-image", image=b"not an image at all"),
        dict(good, sample_id="bad-missing-uri", image=None, image_uri="/nonexistent/eama/img.jpg"),
        dict(good, sample_id="bad-no-entities", article="it was quiet and nothing much happened.",
             caption="a quiet street."),
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_corpus, ray_local):
    """The job run over the 24-sample demo corpus plus one shard of problem samples."""
    root = tmp_path_factory.mktemp("alignment")
    samples = root / "samples"
    for f in sorted(demo_corpus.glob("*.parquet")):
        (samples / f.name).parent.mkdir(parents=True, exist_ok=True)
        (samples / f.name).write_bytes(f.read_bytes())
    storage.write_table_atomic(pa.Table.from_pylist(_bad_samples(), schema=schema.SAMPLE),
                               str(samples / "part-bad.parquet"))
    cfg = alignment.BuildConfig(input=str(samples), output=str(root / "tasks"), batch_size=8,
                                tasks=["sentence_selection", "entity_selection", "captioning"])
    manifest = alignment.run(cfg)
    return cfg, manifest


@pytest.mark.slow
def test_job_accounts_for_every_sample(built):
    cfg, manifest = built
    assert manifest["samples_in"] == 29
    assert manifest["balanced"]
    assert manifest["samples_with_tasks"] == 25  # 24 demo + the entity-less one (captioning only)
    assert manifest["samples_without_tasks"]["by_reason"] == {alignment.NO_IMAGE: 1, alignment.EMPTY_CAPTION: 1}
    assert manifest["error_rows"]["samples"] == 2 and manifest["error_rows"]["by_stage"] == {"decode": 2}
    assert manifest["task_rows"] == {"sentence_selection": 24, "entity_selection": 24, "captioning": 25}
    assert manifest["task_skips"]["sentence_selection"] == {alignment.NO_ENTITIES: 1}
    errors = pq.read_table(glob.glob(str(Path(cfg.output) / "_errors" / "*.parquet"))).to_pylist()
    assert sorted(e["sample_id"] for e in errors) == ["bad-corrupt-image", "bad-missing-uri"]
    assert all(e["reason"] and e["stage"] == "decode" for e in errors)
    tasks = pq.read_table(storage.list_files(cfg.output))
    assert tasks.schema.equals(schema.TASK)
    assert tasks.num_rows == sum(manifest["task_rows"].values())
    # each sample's image is stored once, beside its rows, not in each of them
    assert tasks.column("image").null_count == tasks.num_rows
    stored = pq.read_table(glob.glob(str(Path(cfg.output) / "_images" / "*.parquet"))).to_pylist()
    assert sorted(r["sample_id"] for r in stored) == sorted(set(tasks.column("sample_id").to_pylist()))
    again = alignment.run(cfg)  # a re-run resumes: nothing is left to do, nothing is written twice
    assert again["samples_in"] == 0 and again["task_rows_total"] == 0
    assert pq.read_table(storage.list_files(cfg.output)).num_rows == tasks.num_rows


@pytest.mark.slow
def test_demo_rows_follow_definitions(built, demo_corpus, nlp):
    cfg, _ = built
    samples = {s["sample_id"]: s for s in pq.read_table(str(demo_corpus)).to_pylist()}
    rows = [r for r in pq.read_table(storage.list_files(cfg.output)).to_pylist() if r["sample_id"] in samples]
    for r in rows:
        s = samples[r["sample_id"]]
        if r["task"] == "sentence_selection":
            check_sentence_row(r, nlp, s["article"], s["caption"])
            # the demo's design: positives are exactly the pictured event's two sentences
            person, partner = s["caption"].split(" at ")[0].split(" and ")
            cands = candidates_of(r)
            expected = [i for i, c in enumerate(cands)
                        if c.startswith(person) or c.startswith(partner)]
            assert prompts.parse_sentence_ids(r["target"], len(cands))[0] == expected
        elif r["task"] == "entity_selection":
            check_entity_row(r, nlp, s["article"], s["caption"])
            assert {t for t in r["target"].split("; ")} >= set(s["caption"].split(" at ")[0].split(" and "))
        else:
            assert r["target"] == s["caption"]
    from PIL import Image

    stored = blobs.BlobTable(str(Path(cfg.output) / "_images"))
    for img in stored.get(sorted({r["sample_id"] for r in rows})):
        assert Image.open(io.BytesIO(img)).mode == "RGB"  # normalised as at inference
