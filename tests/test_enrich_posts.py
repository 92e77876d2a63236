"""enrich_posts: views, entities and keyphrases of posts in one pass, on real Ray (2 CPUs).

The tagger is a MiniLM ITA tagger trained (locally, one epoch) on real Twitter-2017 posts with the
`all` view; the keyphrase model a MiniLM MM-MKP model trained on synthetic posts with images. The
corpus mixes the three post contracts, posts with drawn text on their image, posts without an
image and bad rows; the expectations come from the separate jobs (tag_entities,
extract_keyphrases) run on the same rows and views, and from the words drawn on the images."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import kill_when, load_job
from eama.engine import config, enrichment, ledger, resources, schema
from eama.keyphrase import training as kp_training
from eama.mner import methods, training

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("MARATHON", "BOSTON", "SUNDAY", "ORLANDO")  # drawn on the images, one word each


def drawn(word: str) -> bytes:
    """A photo-like JPEG with one large word written on a white band."""
    img = Image.new("RGB", (480, 240), (60, 110, 160))
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 70, 470, 170), fill="white")
    draw.text((24, 88), word, fill="black", font=ImageFont.load_default(size=56))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def exports(shared_data, tmp_path_factory) -> dict[str, str]:
    """(mner export, keyphrase export), both trained by the real trainers with launcher=local."""
    base = tmp_path_factory.mktemp("enrich_models")
    from test_mner import import_split

    folder = shared_data / "mner" / "twitter2017"
    import_split(folder / "train.txt", base / "mner_all", folder / "blip2_captions.txt")
    (base / "mner").mkdir()
    pq.write_table(pq.read_table(base / "mner_all").slice(0, 96), base / "mner" / "part-0.parquet")
    mner = training.MnerTrainConfig(train=str(base / "mner"), output=str(base / "runs"), run_name="tagger",
                                    view="all", epochs=1, micro_batch_size=16, num_workers=1, launcher="local",
                                    lr=1e-4, select_metric="")
    methods.fit(mner)
    from test_keyphrase import TOPICS, synthetic_rows, write_rows

    train = write_rows(synthetic_rows(64, TOPICS[:16], 0, True), base / "kp")
    kp = kp_training.KeyphraseTrainConfig(train=str(train), output=str(base / "runs"), run_name="keyphrases",
                                          epochs=1, micro_batch_size=16, num_workers=1, launcher="local",
                                          lr=2e-4, head_lr=2e-4, beam_size=3, top_n=3, select_metric="")
    kp_training.fit(kp)
    return {"mner": str(base / "runs" / "tagger" / "export"), "keyphrase": str(base / "runs" / "keyphrases" / "export")}


@pytest.fixture(scope="module")
def posts(shared_data, tmp_path_factory) -> dict:
    """24 real Twitter-2017 test posts in three files, one per post contract: images with a drawn
    word on every other post, no image on the rest; plus three bad rows."""
    base = tmp_path_factory.mktemp("enrich_posts")
    from test_mner import import_split

    folder = shared_data / "mner" / "twitter2017"
    import_split(folder / "test.txt", base / "test_all", folder / "blip2_captions.txt")
    real = pq.read_table(base / "test_all").slice(0, 24).to_pylist()
    for i, r in enumerate(real):
        r["image"] = drawn(WORDS[i % len(WORDS)]) if i % 2 == 0 else None
        r["word"] = WORDS[i % len(WORDS)] if i % 2 == 0 else None
    src = base / "in"
    src.mkdir()
    mner_rows = [{k: r[k] for k in ("sample_id", "tokens", "tags", "image", "caption")} for r in real[:8]]
    mner_rows += [{"sample_id": "tab", "tokens": ["a\tb", "c"], "tags": ["O", "O"]},
                  {"sample_id": "broken-image", "tokens": ["Hello", "Boston"], "image": b"not an image at all"}]
    pq.write_table(pa.Table.from_pylist(mner_rows), src / "a-mner.parquet", row_group_size=4)
    kp_rows = [{"sample_id": r["sample_id"], "post": " ".join(r["tokens"]), "image": r["image"],
                "caption": r["caption"]} for r in real[8:16]] + [{"sample_id": "empty", "post": "   "}]
    pq.write_table(pa.Table.from_pylist(kp_rows), src / "b-post.parquet", row_group_size=4)
    text_rows = [{"sample_id": r["sample_id"], "text": " ".join(r["tokens"]), "image": r["image"],
                  "caption": r["caption"]} for r in real[16:]]
    pq.write_table(pa.Table.from_pylist(text_rows), src / "c-text.parquet", row_group_size=4)
    return {"input": src, "real": {r["sample_id"]: r for r in real}, "bad": {"tab", "broken-image", "empty"}}


def committed(out: Path) -> tuple[list[dict], list[dict]]:
    rows = pq.read_table(out).to_pylist() if list(out.glob("*.parquet")) else []
    err_dir = out / ledger.ERRORS_DIR
    return rows, (pq.read_table(err_dir).to_pylist() if err_dir.exists() else [])


def enrich_args(exports: dict, src: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(src), "--output", str(out), "--mner-model", exports["mner"], "--keyphrase-model",
            exports["keyphrase"], "batch_size=4", *extra]


def test_tokenize_splits_raw_text_as_the_twitter_sets_are():
    assert enrichment.tokenize("RT @jehnny: What a day for #baseball, isn't it? https://t.co/x1") == [
        "RT", "@", "jehnny", ":", "What", "a", "day", "for", "#", "baseball", ",", "isn't", "it", "?",
        "https://t.co/x1"]


def test_the_plan_keeps_cpus_for_reads_on_two_cpus_and_puts_replicas_on_gpus():
    small = resources.plan_enrich(2, 0, ("ocr", "tags", "caption"), 2)
    v, m = small.views, small.models
    actors = v.ocr_actors * v.ocr_cpus + v.tag_actors * v.tag_cpus + v.caption_actors * v.caption_cpus
    assert actors + 2 * m.actors * m.cpus <= 2 - 0.75  # the read / decode / write tasks keep 0.75 CPU
    no_caption = resources.plan_enrich(2, 0, ("ocr", "tags"), 2)  # OCR takes what the others leave,
    assert no_caption.views.ocr_actors == 2  # a thread per CPU, so no core idles behind one OCR actor
    v = no_caption.views
    assert v.ocr_actors * v.ocr_cpus + v.tag_actors * v.tag_cpus + 2 * m.actors * m.cpus <= 2 - 0.75
    big = resources.plan_enrich(64, 8, ("ocr", "caption"), 2, device="cuda", model_device="auto")
    assert big.views.caption_actors == 8 and big.views.caption_gpus == 1.0
    assert big.models.device == "cpu"  # the captioner holds every GPU
    gpu_models = resources.plan_enrich(64, 10, ("ocr", "caption"), 2, caption_actors=8, model_device="auto")
    assert gpu_models.models.device == "cuda" and gpu_models.models.gpus < 1
    with pytest.raises(config.ConfigError, match="model_actors"):  # no GPU up yet: the size must be said
        resources.plan_enrich(64, 0, ("ocr",), 2, model_device="cuda")
    cold = resources.plan_enrich(64, 0, ("ocr",), 2, model_device="cuda", model_actors=4)
    assert cold.models.actors == 4 and cold.models.device == "cuda"


@pytest.mark.slow
def test_one_pass_enriches_every_post_and_equals_the_separate_jobs(exports, posts, ray_local, tmp_path):
    out = tmp_path / "out"
    manifest = load_job("enrich_posts").main(enrich_args(exports, posts["input"], out))
    rows, errors = committed(out)
    assert manifest["views"] == ["ocr", "tags"]  # the tagger reads all three; no caption model: the input's captions
    assert len(rows) + len(errors) == 27 and len(rows) == 24
    assert {e["sample_id"]: e["stage"] for e in errors} == {"tab": "read", "broken-image": "decode", "empty": "read"}
    by_id = {r["sample_id"]: r for r in rows}
    assert manifest["this_run"]["counts"]["images_decoded"] == 12
    for sid, real in posts["real"].items():
        r = by_id[sid]
        assert r["tokens"] == real["tokens"] and len(r["predicted_tags"]) == len(real["tokens"])
        assert r["predicted_keyphrases"], sid
        assert r["has_image"] == (real["image"] is not None)
        if real["word"]:
            assert real["word"] in (r["ocr"] or "").upper(), (sid, r["ocr"])
            assert len(r["object_tags"]) == 5 and r["visual_entities"] == r["object_tags"]
        else:
            assert r["ocr"] is None and r["object_tags"] is None
        assert r["mner_model"].startswith(exports["mner"] + "-")  # the export the pointer named at the start
        assert r["keyphrase_model"].startswith(exports["keyphrase"] + "-")
        assert r["views_model"].startswith("ocr=rapidocr-")

    # the separate jobs on the same rows and views: tag_entities (posts with an image in the
    # tagger's view, the others text-only) and extract_keyphrases
    with_image = [r for r in rows if r["has_image"]]
    without = [r for r in rows if not r["has_image"]]
    for name, part in (("img", with_image), ("txt", without)):
        folder = tmp_path / f"mner-{name}"
        folder.mkdir()
        mner_rows = [{**{k: r[k] for k in ("sample_id", "tokens", "caption", "ocr", "object_tags")},
                      "image": posts["real"][r["sample_id"]]["image"]} for r in part]
        pq.write_table(pa.Table.from_pylist(mner_rows, schema=schema.MNER_SAMPLE), folder / "part-0.parquet")
        load_job("tag_entities").main(["--model", exports["mner"], "--input", str(folder), "--output",
                                       str(tmp_path / f"tagged-{name}"), "--view", "model" if name == "img" else "text"])
    tagged = {r["sample_id"]: r for n in ("img", "txt") for r in pq.read_table(tmp_path / f"tagged-{n}").to_pylist()}
    kp_folder = tmp_path / "kp"
    kp_folder.mkdir()
    kp_rows = [{"sample_id": r["sample_id"], "post": r["post"], "ocr": r["ocr"], "visual_entities": r["visual_entities"],
                "image": posts["real"][r["sample_id"]]["image"]} for r in rows]
    pq.write_table(pa.Table.from_pylist(kp_rows, schema=schema.KEYPHRASE_SAMPLE), kp_folder / "part-0.parquet")
    load_job("extract_keyphrases").main(["--model", exports["keyphrase"], "--input", str(kp_folder), "--output",
                                         str(tmp_path / "keyphrases")])
    extracted = {r["sample_id"]: r for r in pq.read_table(tmp_path / "keyphrases").to_pylist()}
    for sid, r in by_id.items():
        assert r["predicted_tags"] == tagged[sid]["predicted_tags"], sid
        assert r["entities"] == tagged[sid]["entities"], sid
        assert r["predicted_keyphrases"] == extracted[sid]["predicted_keyphrases"], sid
        assert r["predicted_scores"] == pytest.approx(extracted[sid]["predicted_scores"], rel=1e-2), sid  # batches differ

    again = load_job("enrich_posts").main(enrich_args(exports, posts["input"], out))
    assert again["this_run"]["written"] == 0 and again["this_run"]["errors"] == 0


@pytest.mark.slow
def test_the_caption_view_comes_from_the_captioning_model_and_the_tagger_reads_it(exports, posts, ray_local, tmp_path):
    from eama.news import models

    captioner = models.resolve("tiny-llava")  # the MLLM through the same loader as a hub id or s3:// model
    real = list(posts["real"].values())
    picked = [r for r in real if r["image"] is not None][:3] + [r for r in real if r["image"] is None][:1]
    src = tmp_path / "in"
    src.mkdir()
    given = [{k: r[k] for k in ("sample_id", "tokens", "image", "caption")} for r in picked]
    pq.write_table(pa.Table.from_pylist(given), src / "part-0.parquet")
    out = tmp_path / "out"
    manifest = load_job("enrich_posts").main(enrich_args(exports, src, out, "--views", "caption", "--caption-model",
                                                         captioner, "max_new_tokens=6"))
    rows, errors = committed(out)
    assert manifest["views"] == ["caption"] and not errors and len(rows) == 4
    by_id = {r["sample_id"]: r for r in rows}
    for r in picked:
        done = by_id[r["sample_id"]]
        if r["image"] is not None:  # the MLLM's caption replaces the given BLIP-2 one
            assert isinstance(done["caption"], str) and done["caption"] != r["caption"], done["caption"]
            assert done["views_model"].startswith(f"caption={captioner}@sha256:")
        assert done["ocr"] is None and done["object_tags"] is None  # views not asked for are not computed

    # tag_entities on the same rows holding the pass's captions tags them alike
    folder = tmp_path / "mner"
    folder.mkdir()
    image_rows = [{"sample_id": r["sample_id"], "tokens": r["tokens"], "image": r["image"],
                   "caption": by_id[r["sample_id"]]["caption"]} for r in picked if r["image"] is not None]
    pq.write_table(pa.Table.from_pylist(image_rows, schema=schema.MNER_SAMPLE), folder / "part-0.parquet")
    load_job("tag_entities").main(["--model", exports["mner"], "--input", str(folder), "--output",
                                   str(tmp_path / "tagged"), "--view", "model"])
    for t in pq.read_table(tmp_path / "tagged").to_pylist():
        assert by_id[t["sample_id"]]["predicted_tags"] == t["predicted_tags"], t["sample_id"]


@pytest.mark.slow
def test_a_killed_pass_reruns_exactly_once(exports, posts, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "jobs" / "enrich_posts.py"), *enrich_args(exports, posts["input"], out, "commit_rows=4")]
    kill_when(cmd, lambda: sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) >= 4,
              tmp_path / "killed.log")
    partial, _ = committed(out)
    assert 0 < len(partial) < 24
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode:
        (Path(os.environ.get("EAMA_TEST_LOGS", tmp_path)) / "enrich_rerun.stderr").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, errors = committed(out)
    ids = [r["sample_id"] for r in rows] + [e["sample_id"] for e in errors]
    assert sorted(ids) == sorted(list(posts["real"]) + list(posts["bad"]))


def test_user_mistakes_exit_with_one_line(tmp_path):
    job = [sys.executable, str(ROOT / "jobs" / "enrich_posts.py"), "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    none = subprocess.run(job, capture_output=True, text=True, env=env, timeout=120)
    assert none.returncode == 2 and "needs --mner-model or --keyphrase-model" in none.stderr
    assert "Traceback" not in none.stderr
    missing = subprocess.run(job + ["--mner-model", str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                             timeout=120)
    assert missing.returncode == 2 and "mner_model not found" in missing.stderr and "Traceback" not in missing.stderr
    for views, says in (("caption", "needs a captioning model"), ("ocr,faces", "views must be")):
        bad = subprocess.run(job + ["--mner-model", str(tmp_path), "--views", views], capture_output=True, text=True,
                             env=env, timeout=120)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
