"""image_views: OCR, ImageNet tags and captions of MNER rows on real Ray (2 CPUs), exactly once.

The EfficientNet expectations are independent of the model: the two news photos were looked at
by eye (a camera on a tripod in silhouette; a man in a grey T-shirt) before the model ran."""

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

from conftest import load_job
from eama.engine import ledger, resources, schema, storage, vision
from eama.mner import views

ROOT = Path(__file__).resolve().parents[1]
TRIPOD_PHOTO = "5a57160395d0e0110c1a3f23_0.jpg"  # silhouette of a camera on a tripod at dusk
TSHIRT_PHOTO = "54453eab38f0d832c813e7f5_0.jpg"  # a man in a grey T-shirt
SIGN_WORDS = ("HELLO", "WORLD", "2026")


def text_image(words: str = " ".join(SIGN_WORDS), size: tuple[int, int] = (640, 200)) -> Image.Image:
    """Large black words on white: what any OCR must read."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((20, 60), words, fill="black", font=ImageFont.load_default(size=56))
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def mner_row(sample_id: str, image: bytes | None, **extra) -> dict:
    return {"sample_id": sample_id, "tokens": ["a", "post", "about", sample_id], "tags": ["O", "O", "O", "O"],
            "image_id": sample_id, "image": image, **extra}


def write_rows(path: Path, rows: list[dict]) -> str:
    storage.write_table_atomic(pa.Table.from_pylist(rows, schema=schema.MNER_SAMPLE), str(path), row_group_size=8)
    return str(path)


def committed(out: str) -> tuple[list[dict], list[dict]]:
    rows = [r for p in storage.list_files(out) for r in pq.read_table(p).to_pylist()]
    err_dir = storage.join(out, ledger.ERRORS_DIR)
    errs = [r for p in storage.list_files(err_dir) for r in pq.read_table(p).to_pylist()] if storage.exists(err_dir) else []
    return rows, errs


@pytest.fixture(scope="module")
def news_images(shared_data) -> dict[str, bytes]:
    folder = shared_data / "news_sample" / "images"
    if not folder.is_dir():
        pytest.skip(f"news photos not found at {folder}")
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jpg"))}


# ---------------------------------------------------------------- the models


def test_ocr_reads_words_drawn_on_a_synthetic_image():
    engine = views.ocr_engine(threads=1)
    text = views.read_text(engine, jpeg(text_image()))
    for word in SIGN_WORDS:
        assert word in text.upper().split(), text
    assert views.read_text(engine, jpeg(Image.new("RGB", (320, 240), "white"))) == ""


def test_efficientnet_weights_load_exactly_and_classify_news_photos(news_images):
    import torch

    model = vision.EfficientNetLite0()
    state = torch.load(vision.weights_path(), map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    labels = vision.imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench"
    model.eval()
    photos = [Image.open(io.BytesIO(news_images[name])) for name in (TRIPOD_PHOTO, TSHIRT_PHOTO)]
    tripod, tshirt = vision.top_labels(photos, 5, model)
    assert "tripod" in tripod, tripod
    assert "T-shirt" in tshirt, tshirt
    grid = vision.feature_grid(photos, model)
    assert grid.shape == (2, 49, vision.HEAD_CHANNELS) and torch.isfinite(grid).all()


# ---------------------------------------------------------------- the plan and the config


def test_views_plan_leaves_cpu_for_io_and_puts_the_captioner_on_gpus():
    small = resources.plan_views(2, 0, views.VIEWS)
    held = small.ocr_actors * small.ocr_cpus + small.tag_actors * small.tag_cpus + small.caption_actors * small.caption_cpus
    assert 2 - held >= 0.75 and small.device == "cpu" and small.caption_gpus == 0
    big = resources.plan_views(64, 8, views.VIEWS)
    assert big.device == "cuda" and big.caption_actors == 8 and big.caption_gpus == 1.0 and big.ocr_actors >= 1
    no_caption = resources.plan_views(2, 0, ("ocr", "tags"), device="cuda")
    assert no_caption.caption_actors == 0 and no_caption.device == "cpu"
    assert no_caption.ocr_actors == 2  # OCR, the heavy view, gets a thread per CPU: no idle core
    assert resources.plan_views(4, 0, ("ocr",)).ocr_actors == 4  # never more OCR threads than CPUs


def test_caption_without_a_model_is_a_one_line_config_error(tmp_path):
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1")  # were Ray started, it would fail loudly
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "image_views.py"), "--input", str(tmp_path),
                           "--output", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # a settings error (config.main)
    assert proc.stderr.strip().splitlines() == [
        "error: the caption view needs a captioning model: pass --model (hub id, local path or s3:// URI), "
        "or leave caption out of --views"]
    assert "Traceback" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------- the job


def test_views_job_on_news_photos_accounts_for_every_row_exactly_once(ray_local, news_images, tmp_path):
    rows = [mner_row(name.removesuffix(".jpg"), data) for name, data in news_images.items()]
    rows += [mner_row("sign", jpeg(text_image())), mner_row("garbage", b"\x00 this is not an image \xff" * 8),
             mner_row("no_image", None)]
    inp = write_rows(tmp_path / "mner.parquet", rows)
    out = str(tmp_path / "views")
    job = load_job("image_views")
    m1 = job.main(["--input", inp, "--output", out, "--views", "ocr,tags", "batch_size=4"])

    written, errors = committed(out)
    assert len(rows) == len(written) + len(errors) == m1["output_total"]["rows"] + m1["output_total"]["error_rows"]
    by_id = {r["sample_id"]: r for r in written}
    assert set(by_id) == {r["sample_id"] for r in rows} - {"garbage", "no_image"}
    labels = set(vision.imagenet_labels())
    for r in written:
        assert len(r["object_tags"]) == 5 and set(r["object_tags"]) <= labels, r["object_tags"]
        assert isinstance(r["ocr"], str)
        assert r["views_model"].startswith("ocr=rapidocr-") and "tags=efficientnet-lite0" in r["views_model"]
        assert r["run_id"] == m1["run_id"] and r["source_file"] == inp and r["image"] is not None
    assert all(w in by_id["sign"]["ocr"].upper().split() for w in SIGN_WORDS), by_id["sign"]["ocr"]
    assert "tripod" in by_id[TRIPOD_PHOTO.removesuffix(".jpg")]["object_tags"]
    errs = {e["sample_id"]: e for e in errors}
    assert errs["garbage"]["stage"] == "decode" and "undecodable image" in errs["garbage"]["reason"]
    assert errs["no_image"]["stage"] == "read" and "no image" in errs["no_image"]["reason"]
    assert m1["this_run"]["errors_by_stage"] == {"decode": 1, "read": 1}

    files_before = sorted(os.listdir(out))
    m2 = job.main(["--input", inp, "--output", out, "--views", "ocr,tags"])
    assert m2["this_run"]["rows"] == 0 and m2["this_run"]["written"] == 0 and m2["input"]["rows_pending"] == 0
    assert committed(out)[0] == written
    assert sorted(p for p in os.listdir(out) if p != "_manifests") == [p for p in files_before if p != "_manifests"]


def test_caption_view_with_the_tiny_llava_records_the_model(ray_local, tmp_path):
    from eama.news import models

    path = models.resolve("tiny-llava")  # tests may use the news system; the job itself loads via engine/hf.py
    rows = [mner_row(f"s{i}", jpeg(text_image(f"POST {i}", (200 + 40 * i, 160))), caption="old", ocr="kept")
            for i in range(3)]
    inp = write_rows(tmp_path / "mner.parquet", rows)
    out = str(tmp_path / "captions")
    m = load_job("image_views").main(["--input", inp, "--output", out, "--views", "caption", "--model", path,
                                      "max_new_tokens=6"])
    written, errors = committed(out)
    assert not errors and len(written) == 3
    for r in written:
        assert isinstance(r["caption"], str) and r["caption"] != "old"
        assert r["ocr"] == "kept" and r["object_tags"] is None  # views not asked for keep their input values
        assert r["views_model"].startswith(f"caption={path}@sha256:")
    assert m["views_model"] == written[0]["views_model"] and m["plan"]["caption"].startswith("1 actors")
