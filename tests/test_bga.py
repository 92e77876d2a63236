"""BGA-MNER: the samplers keep something, the cycle loss of an identity pair is zero, a real
training run on a synthetic corpus whose images decide the entity type (real-image inference beats
text-only there), rows without images, export -> tag_entities -> score, and a re-run that adds nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import load_job
from eama.engine import schema
from eama.engine.training.metrics import read_metrics
from eama.mner import bga, bga_tagger, methods, spans, training

NAMES = ["jordan", "casey", "morgan", "riley", "taylor", "avery", "quinn", "parker", "reese", "skyler"]
TEMPLATES = ["{} was here today", "look at {} tonight", "we all love {} so much", "so proud of {} again",
             "{} is trending now", "a day with {} and friends"]
COLOURS = {"PER": (220, 30, 30), "LOC": (30, 30, 220)}
CAPTIONS = {"PER": "a photo of a smiling person", "LOC": "a photo of a city skyline"}


def png(rgb: tuple[int, int, int], rng: random.Random) -> bytes:
    import io

    from PIL import Image

    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), jitter).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_rows(n: int, seed: int, prefix: str) -> list[dict]:
    """Posts naming one ambiguous name whose type only the image decides (red: PER, blue: LOC);
    every fifth post has no image but a caption that decides it, every tenth neither (and no entity)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.choice(sorted(COLOURS))
        words = rng.choice(TEMPLATES).format(rng.choice(NAMES)).split()
        tags = ["O"] * len(words)
        row = {"sample_id": f"{prefix}-{i}", "tokens": words, "tags": tags}
        if i % 10 == 9:
            row["tokens"] = ["nothing", "to", "see", "here", str(i)]
            row["tags"] = ["O"] * 5
        elif i % 5 == 4:
            row["caption"] = CAPTIONS[kind]
        else:
            row["image"] = png(COLOURS[kind], rng)
        if i % 10 != 9:
            at = next(k for k, w in enumerate(words) if w in NAMES)
            tags[at] = f"B-{kind}"
        rows.append(row)
    return rows


def write(rows: list[dict], folder: Path) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.MNER_SAMPLE), folder / "part-00000.parquet")
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIPVisionModel saved as a Hugging Face folder (safetensors, its own processor)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_samplers_always_keep_at_least_one_element():
    torch.manual_seed(0)
    sampler = bga.ContextSampler(8, stages=3, tau=1.0)
    for scorer in sampler.scorers:  # scores that drop everything
        torch.nn.init.constant_(scorer[-1].bias, -50.0)
    x = torch.randn(4, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for training_mode in (True, False):
        sampler.train(training_mode)
        keep = sampler(x, mask)
        assert keep.detach().sum(1).tolist() == [1.0, 1.0, 1.0, 0.0]  # one each; nothing where nothing exists
        assert not bool((keep.detach() * ~mask).any())  # never a padded position


def test_cycle_loss_is_zero_for_an_identity_generator_pair():
    text, regions = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    text_keep, region_keep = (torch.rand(3, 7) > 0.3).float(), torch.ones(3, 5)

    def identity(x, keep, count):
        return x

    loss = bga.cycle_loss(identity, identity, text, text_keep, regions, region_keep, slots=5)
    assert torch.allclose(loss, torch.zeros(3), atol=1e-6)

    def shuffle(x, keep, count):  # a pair that does not invert itself is penalised
        return x.flip(1)

    def same(x, keep, count):
        return x

    assert bool((bga.cycle_loss(shuffle, same, text, text_keep, regions, region_keep, slots=5) > 0.1).all())


def type_accuracy(gold: list[list[str]], predicted: list[list[str]]) -> float:
    """Share of gold mentions predicted with the right span and type."""
    hits = total = 0
    for g, p in zip(gold, predicted):
        want, got = set(spans.bio_spans(g)), set(spans.bio_spans(p))
        hits, total = hits + len(want & got), total + len(want)
    return hits / max(total, 1)


@pytest.fixture(scope="module")
def bga_run(tmp_path_factory, tiny_clip, ray_local) -> dict:
    root = tmp_path_factory.mktemp("bga")
    data = {split: write(synthetic_rows(n, seed, split), root / split)
            for split, n, seed in (("train", 320, 0), ("valid", 60, 1), ("test", 80, 2))}
    cfg = training.MnerTrainConfig(train=str(data["train"]), valid=str(data["valid"]), output=str(root / "runs"),
                                   run_name="bga", method="bga", vision=str(tiny_clip), epochs=3, micro_batch_size=16,
                                   lr=1e-4, bga_lr=3e-3, max_length=32, proxy_tokens=8, select_view="visual")
    result = methods.fit(cfg)
    assert result.error is None
    return {"export": root / "runs" / "bga" / "export", "run": root / "runs" / "bga", **data}


@pytest.mark.slow
def test_bga_learns_types_from_real_images_and_tags_without_them(bga_run):
    model, tok, spec = methods.load(str(bga_run["export"]))
    assert spec.method == "bga" and spec.bga["vision"].endswith("tiny_clip0")
    test = pq.read_table(bga_run["test"]).to_pylist()
    with_image = [r for r in test if r["image"]]
    gold = [r["tags"] for r in with_image]
    with torch.inference_mode():
        real = type_accuracy(gold, methods.tag_with(model, tok, spec, with_image, "visual"))
        text_only = type_accuracy(gold, methods.tag_with(model, tok, spec, with_image, "text"))
        every = methods.tag_with(model, tok, spec, test, "visual")  # rows with a caption only, or neither
    # the name's type is a coin flip from the text; the image decides it
    assert real >= 0.85 and real > text_only + 0.2, (real, text_only)
    assert all(len(p) == len(r["tokens"]) for p, r in zip(every, test))
    nothing = [p for p, r in zip(every, test) if not r["image"] and not r["caption"]]
    assert nothing and sum(t != "O" for p in nothing for t in p) <= len(nothing)
    history = read_metrics(str(bga_run["run"]))
    evals = [r for r in history if "eval/dev_f1" in r]
    assert evals and all(r["eval/dev_f1"] == r["eval/dev_f1_view"] for r in evals)  # select_view=visual
    info = json.loads((bga_run["export"] / "eama_export.json").read_text())
    assert info["step"] == max(evals, key=lambda r: r["eval/dev_f1_view"])["step"]


@pytest.mark.slow
def test_bga_export_tags_and_scores_through_the_jobs_and_a_rerun_adds_nothing(bga_run, tmp_path):
    tag = load_job("tag_entities")
    out = tmp_path / "tagged"
    args = ["--model", str(bga_run["export"]), "--input", str(bga_run["test"]), "--output", str(out), "view=visual",
            "commit_rows=16", "batch_size=16"]
    first = tag.main(args)
    assert first["this_run"]["written"] == 80 and first["this_run"]["errors"] == 0
    again = tag.main(args)
    assert again["this_run"]["written"] == 0
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["sample_id"] for r in rows) == sorted(f"test-{i}" for i in range(80))
    assert {r["view"] for r in rows} == {"visual"}
    scores = load_job("evaluate_mner").main(["--input", str(out), "--output", str(tmp_path / "report")])
    assert scores["gold_spans"] == 72  # 80 posts, every tenth without an entity
    with pytest.raises(SystemExit, match="text | visual"):
        tag.main(["--model", str(bga_run["export"]), "--input", str(bga_run["test"]), "--output",
                  str(tmp_path / "x"), "view=caption"])


def test_an_image_that_does_not_decode_is_an_error_row_in_the_visual_view(bga_run, tmp_path):
    """Tagging with the real image: a row whose image bytes do not decode is an error row naming
    it (not quietly tagged from its caption); its neighbours, with and without images, are tagged."""
    rows = pq.read_table(bga_run["test"]).to_pylist()
    good = next(r for r in rows if r["image"])
    bare = next(r for r in rows if not r["image"])
    broken = dict(good, sample_id="broken", image=b"\x89PNG not really")
    write([good, broken, bare], tmp_path / "in")
    out = tmp_path / "tagged"
    manifest = load_job("tag_entities").main(["--model", str(bga_run["export"]), "--input", str(tmp_path / "in"),
                                              "--output", str(out), "view=visual"])
    assert manifest["this_run"]["written"] == 2 and manifest["this_run"]["errors"] == 1
    assert sorted(r["sample_id"] for r in pq.read_table(out).to_pylist()) == sorted([good["sample_id"], bare["sample_id"]])
    (error,) = pq.read_table(out / "_errors").to_pylist()
    assert error["sample_id"] == "broken" and error["stage"] == "tag"
    assert "sample broken: image does not decode" in error["reason"], error


def test_benchmark_table_reads_the_bga_rows_caption_proxy_view(tmp_path):
    from eama.mner import benchmark

    results = [{"run": f"minilm-twitter2017-bga-s{seed}", "dataset": "twitter2017", "config": "bga", "seed": seed,
                "encoder": "minilm", "train_seconds": 50.0, "test": {"text": {"f1": text}, "visual": {"f1": vis}}}
               for seed, (text, vis) in enumerate([(0.70, 0.74), (0.72, 0.76)])]
    row = next(line for line in benchmark.table(results, mix_versions=True).splitlines() if "| bga |" in line)
    assert "| bga | 71.00 ± 1.41 (n=2) | 75.00 ± 1.41 (n=2) | 50 | 87.71 |" in row
    assert benchmark.eval_views("bga_no_cycle") == ["text", "visual"] and benchmark.eval_views("caption") == ["text", "caption"]


def test_visual_inputs_use_the_image_else_the_caption_else_nothing(shared_data, tiny_clip):
    """Real news photos through EfficientNet's grid and a tiny CLIP; an image that does not decode
    is reported by row (training lets it read its caption); a row with neither has no visual source."""
    from transformers import AutoTokenizer

    from eama.engine import encoders

    photo = sorted((shared_data / "news_sample" / "images").iterdir())[0].read_bytes()
    rows = [{"tokens": ["a"], "image": photo, "caption": "ignored: the image wins"},
            {"tokens": ["b"], "image": b"not an image", "caption": "a red car"},
            {"tokens": ["c"], "caption": "a city"},
            {"tokens": ["d"]}]
    tok = AutoTokenizer.from_pretrained(encoders.locate("minilm"))
    for vision, regions, width in (("efficientnet", 49, 1280), (str(tiny_clip), 5, 32)):
        spec = bga.BgaSpec(vision=vision, image_width=width, proxy_tokens=8)
        out = bga_tagger.visual_inputs(rows, tok, spec)
        assert out["image_features"].shape == (4, regions, width)
        assert out["image_mask"].any(1).tolist() == [True, False, False, False]
        assert float(out["image_features"][0].abs().sum()) > 0 and float(out["image_features"][1:].abs().sum()) == 0
        assert out["proxy_mask"].any(1).tolist() == [True, True, True, False]  # the model prefers the image
        assert out["has_visual"].tolist() == [True, True, True, False]
        assert list(out["undecodable"]) == [1] and "ImageError" in out["undecodable"][1]
    model = bga_tagger.build("minilm", ["PER"], spec, 32)[0].eval()
    with torch.no_grad():
        regions, mask = model.regions(out["image_features"], out["image_mask"], out["proxy_ids"], out["proxy_mask"],
                                      torch.float32)
        assert mask.any(1).tolist() == [True, True, True, False]
        assert int(mask[0].sum()) == 5  # row 0 reads its image's 5 tokens, not its caption
        # the same projection, batched or not (float rounding differs between the two on some CPUs)
        torch.testing.assert_close(regions[0, :5], model.image_proj(out["image_features"][0]), rtol=1e-5, atol=1e-5)
        assert int(mask[1].sum()) == int(out["proxy_mask"][1].sum())  # row 1: its caption's subtokens
