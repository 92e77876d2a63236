"""Data contract, config layer, importers, demo corpus, images, tiny models, spaCy, cluster config."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import load_job
from eama.engine import config, entities, images, schema, storage
from eama.news import demo, importers, models


# ---------------------------------------------------------------- contract


def _sample_table(**overrides):
    rows = [{"sample_id": "s1", "article_id": "a1", "headline": None, "article": "Text.", "image": b"x",
             "image_uri": None, "caption": "C."}]
    table = pa.Table.from_pylist(rows, schema=schema.SAMPLE)
    for name, col in overrides.items():
        idx = table.column_names.index(name)
        table = table.set_column(idx, name, col) if col is not None else table.remove_column(idx)
    return table


def test_missing_required_column_names_file_and_column():
    with pytest.raises(schema.SchemaError, match=r"shard-7\.parquet: missing required column 'article'"):
        schema.conform(_sample_table(article=None), schema.SAMPLE, "shard-7.parquet")


def test_mistyped_column_names_file_column_and_types():
    with pytest.raises(schema.SchemaError, match=r"bad\.parquet: column 'article' has type int64, expected string"):
        schema.conform(_sample_table(article=pa.array([5])), schema.SAMPLE, "bad.parquet")


def test_extra_columns_pass_through_and_optional_columns_are_filled():
    table = _sample_table(caption=None).append_column("source_url", pa.array(["https://x"]))
    table = table.set_column(table.column_names.index("article"), "article", pa.array(["Big"], pa.large_string()))
    out = schema.conform(table, schema.SAMPLE, "t")
    assert out.column_names[: len(schema.SAMPLE)] == schema.SAMPLE.names
    assert out.column("source_url").to_pylist() == ["https://x"]
    assert out.column("caption").to_pylist() == [None]
    assert out.schema.field("article").type == pa.string()


# ---------------------------------------------------------------- config


def test_config_layers_and_errors(tmp_path):
    cap = load_job("caption_corpus")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("batch_size: 4\nmode: plain\n")
    cfg = config.parse_args(cap.CaptionCorpusConfig, "t", cap.FLAGS,
                            ["--config", str(yaml_file), "--model", "tiny-instructblip", "batch_size=2"])
    assert (cfg.batch_size, cfg.mode, cfg.model) == (2, "plain", "tiny-instructblip")
    mixed = config.parse_args(cap.CaptionCorpusConfig, "t", cap.FLAGS, ["max_new_tokens=9", "--mode", "plain", "batch_size=3"])
    assert (mixed.max_new_tokens, mixed.mode, mixed.batch_size) == (9, "plain", 3)
    with pytest.raises(config.ConfigError, match="batch_sise"):
        config.parse_args(cap.CaptionCorpusConfig, "t", cap.FLAGS, ["batch_sise=3"])
    with pytest.raises(config.ConfigError, match="batch_size"):
        config.parse_args(cap.CaptionCorpusConfig, "t", cap.FLAGS, ["batch_size=many"])
    assert config.parse_args(cap.CaptionCorpusConfig, "t", cap.FLAGS, ["mode="]).mode == ""
    with pytest.raises(config.ConfigError, match="batch_size"):
        config.parse_args(cap.CaptionCorpusConfig, "t", cap.FLAGS, ["batch_size="])


JOB_CONFIGS = {
    "caption_corpus": "CaptionCorpusConfig", "import_corpus": "ImportConfig", "evaluate": "EvaluateConfig",
    "build_alignment_data": None, "train_alignment": None, "demo": "DemoConfig",
    "benchmark_caption": "BenchConfig", "benchmark_train": "BenchConfig",
    "image_views": None, "train_mner": None, "tag_entities": None, "evaluate_mner": None, "benchmark_mner": None,
    "train_keyphrase": None, "extract_keyphrases": None, "evaluate_keyphrases": None, "benchmark_keyphrase": None,
    "enrich_posts": None,
}


@pytest.mark.parametrize("job", sorted(JOB_CONFIGS))
def test_every_job_yaml_validates_against_its_config(job):
    """Each jobs/configs/<job>.yaml names only keys its job knows, with the right types."""
    from eama.engine import enrichment
    from eama.keyphrase import benchmark as kp_benchmark
    from eama.keyphrase import extraction, training as kp_training
    from eama.keyphrase import report as kp_report
    from eama.mner import benchmark, report, tagging, training, views
    from eama.news import alignment, alignment_training

    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", f"{job}.yaml")
    schema_cls = {"build_alignment_data": alignment.BuildConfig,
                  "train_alignment": alignment_training.TrainConfig,
                  "image_views": views.ImageViewsConfig, "train_mner": training.MnerTrainConfig,
                  "tag_entities": tagging.TagConfig, "evaluate_mner": report.ScoreConfig,
                  "benchmark_mner": benchmark.BenchmarkConfig,
                  "train_keyphrase": kp_training.KeyphraseTrainConfig, "extract_keyphrases": extraction.ExtractConfig,
                  "evaluate_keyphrases": kp_report.ScoreConfig, "benchmark_keyphrase": kp_benchmark.BenchmarkConfig,
                  "enrich_posts": enrichment.EnrichConfig}.get(job)
    if schema_cls is None:
        schema_cls = getattr(load_job(job), JOB_CONFIGS[job])
    cfg = config.build_config(schema_cls, path)
    if job in ("caption_corpus", "import_corpus", "demo", "benchmark_caption", "image_views", "train_mner",
               "tag_entities", "evaluate_mner", "benchmark_mner", "train_keyphrase", "extract_keyphrases",
               "evaluate_keyphrases", "benchmark_keyphrase", "enrich_posts"):
        assert cfg == schema_cls()  # these files document the defaults


# ---------------------------------------------------------------- demo corpus


def test_demo_corpus_is_deterministic_and_entity_rich(tmp_path):
    a = demo.write_demo_corpus(str(tmp_path / "a"), num_samples=10, shard_size=4, seed=3)
    b = demo.write_demo_corpus(str(tmp_path / "b"), num_samples=10, shard_size=4, seed=3)
    c = demo.write_demo_corpus(str(tmp_path / "c"), num_samples=10, shard_size=4, seed=4)
    ta = pa.concat_tables(pq.read_table(p) for p in a)
    assert ta.num_rows == 10 and len(a) == 3
    assert ta.equals(pa.concat_tables(pq.read_table(p) for p in b))
    assert not ta.equals(pa.concat_tables(pq.read_table(p) for p in c))
    schema.check_schema(ta.schema, schema.SAMPLE, "demo")
    for row in ta.to_pylist():
        assert row["caption"].split(" and ")[0] in row["article"]  # the caption names article entities
        Image.open(io.BytesIO(row["image"])).verify()


# ---------------------------------------------------------------- importers


def test_goodnews_import_of_the_real_nyt_sample(shared_data, tmp_path):
    src = shared_data / "news_sample"
    imp = load_job("import_corpus")
    counts = imp.main(["--source", str(src / "caption.json"), "--images", str(src / "images"),
                       "--output", str(tmp_path), "--shard-size", "5"])
    captions = json.loads((src / "caption.json").read_text())
    expected = sum(len(importers._literal(v["images"])) for v in captions.values())
    assert counts["samples"] + counts["errors"] == expected
    table = pa.concat_tables(pq.read_table(p) for p in storage.list_files(str(tmp_path)))
    assert table.num_rows == counts["samples"] and counts["shards"] == -(-counts["samples"] // 5)
    row = table.filter(pa.compute.equal(table["sample_id"], "54453eab38f0d832c813e7f5_0")).to_pylist()[0]
    assert row["caption"] == "Mark Zuckerberg is the chief executive of Facebook."
    assert row["headline"] == "Facebook Seeps Onto Other Web Sites"
    assert row["image"] == (src / "images" / "54453eab38f0d832c813e7f5_0.jpg").read_bytes()  # original bytes


def test_goodnews_missing_image_becomes_error_row(tmp_path):
    (tmp_path / "imgs").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    (tmp_path / "imgs" / "art1_0.jpg").write_bytes(png.getvalue())
    (tmp_path / "imgs" / "art1_2.jpg").write_bytes(b"not an image")
    (tmp_path / "c.json").write_text(json.dumps({"art1": {
        "images": str({"0": "Cap zero.", "1": "Cap one.", "2": "Cap two."}), "headline": str({"main": "H"}),
        "article": "Body."}}))
    counts = importers.write_shards(importers.goodnews_samples(str(tmp_path / "c.json"), str(tmp_path / "imgs")),
                                    str(tmp_path / "out"))
    assert counts == {"samples": 1, "errors": 2, "shards": 1}
    errs = pq.read_table(tmp_path / "out" / "_errors" / "import.parquet").to_pylist()
    reasons = {e["sample_id"]: e["reason"] for e in errs}
    assert "not found" in reasons["art1_1"] and "unreadable" in reasons["art1_2"]


def test_jsonl_import_paths_base64_and_bad_lines(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    (tmp_path / "img.png").write_bytes(png.getvalue())
    lines = [
        json.dumps({"sample_id": "p", "article": "A.", "image_path": "img.png", "caption": "c"}).encode(),
        json.dumps({"sample_id": "b", "article": "B.", "image_base64": base64.b64encode(png.getvalue()).decode()}).encode(),
        b'{"sample_id": "u", "article": "\xff\xfe bad"}',
        b"{not json",
        json.dumps({"sample_id": "m", "article": "M.", "image_path": "missing.png"}).encode(),
        json.dumps({"sample_id": "p", "article": "dup", "image_path": "img.png"}).encode(),
    ]
    (tmp_path / "s.jsonl").write_bytes(b"\n".join(lines))
    counts = importers.write_shards(importers.jsonl_samples(str(tmp_path / "s.jsonl")), str(tmp_path / "out"))
    assert counts["samples"] == 2 and counts["errors"] == 4
    errs = pq.read_table(tmp_path / "out" / "_errors" / "import.parquet").to_pylist()
    text = " | ".join(f"{e['source_file']} {e['reason']}" for e in errs)
    assert "s.jsonl:3 invalid UTF-8" in text and "s.jsonl:4 invalid JSON" in text
    assert "missing.png" in text and "duplicate sample_id" in text


# ---------------------------------------------------------------- images


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("make", [
    lambda: _encode(Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
    lambda: _encode(Image.new("I;16", (20, 20), 40000), "PNG"),
    lambda: _encode(Image.new("RGBA", (20, 20), (0, 0, 255, 0)), "PNG"),
    lambda: _encode(Image.new("P", (20, 20)), "GIF"),
    lambda: _encode(Image.new("RGB", (2000, 500), "blue"), "WEBP"),
])
def test_images_normalise_to_bounded_rgb(make):
    out = images.load_rgb(images.normalize_image(make(), max_side=256))
    assert out.mode == "RGB" and max(out.size) <= 256


def test_alpha_is_composited_on_white():
    out = images.load_rgb(images.normalize_image(_encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")))
    assert min(out.getpixel((4, 4))) > 240


@pytest.mark.parametrize("data,reason", [
    (b"", "empty image"),
    (b"\xff\xd8\xff\xe0garbage", "undecodable"),
    (_encode(Image.new("RGB", (64, 64)), "PNG")[:60], "undecodable"),
    (None, "no image"),
])
def test_bad_images_raise_with_reason(data, reason):
    with pytest.raises(images.ImageError, match=reason):
        images.normalize_image(data)


def test_huge_image_is_refused_before_decoding():
    with pytest.raises(images.ImageError, match="too large"):
        images.normalize_image(_encode(Image.new("L", (3000, 3000)), "PNG"), max_pixels=1_000_000)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_tiny_model_build_save_reload_generate_and_backward(family, tmp_path):
    import torch

    path = models.build_tiny_model(family, str(tmp_path / family))
    assert any(f.endswith(".safetensors") for f in os.listdir(path))
    lm = models.load_model(path)
    assert lm.family == family and type(lm.model).__name__.lower().startswith(family)
    assert lm.fingerprint.startswith("sha256:")
    samples = list(demo.generate_samples(2, seed=1))
    imgs = [images.load_rgb(images.normalize_image(s["image"])) for s in samples]
    answers = models.generate_text(lm, ["Write the caption.", "Name the entities.\nA; B"], imgs, max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    lm.model.train()
    batch = models.encode(lm, [models.format_prompt(family, s["caption"]) for s in samples], imgs)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = lm.model(**batch, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in lm.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    import torch

    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors only"):
        models.load_model(str(tmp_path))


def test_model_loads_from_s3(s3_server, tmp_path):
    path = models.build_tiny_model("llava", str(tmp_path / "m"))
    fs = storage.filesystem("s3://eama-test")
    fs.put(path + "/", "eama-test/models/tiny-llava/", recursive=True)
    lm = models.load_model("s3://eama-test/models/tiny-llava")
    assert lm.family == "llava"


# ---------------------------------------------------------------- spaCy


def test_spacy_finds_entities_in_a_real_article(shared_data):
    article = json.loads((shared_data / "news_sample" / "caption.json").read_text())["54453eab38f0d832c813e7f5"]["article"]
    nlp = entities.load_nlp()
    (ents, sents), = entities.annotate(nlp, [article])
    found = {(e["text"], e["label"]) for e in ents}
    assert ("Forrester Research", "ORG") in found and ("Chris Messina", "PERSON") in found
    assert any(text.startswith("Facebook") for text, _ in found)
    assert len(sents) > 5 and all(s in article for s in sents[:5])


def test_unknown_spacy_pipeline_names_the_fix():
    with pytest.raises(RuntimeError, match="not installed"):
        entities.load_nlp("en_core_web_nonexistent")


@pytest.mark.parametrize("a,b,same", [
    ("Liu", "Grace Liu", True), ("Yankees", "the New York Yankees", True), ("Bess Wohl’s", "Bess Wohl", True),
    ("Mr. Obama", "Barack Obama", True), ("New York", "New York Yankees", False), ("Grace", "Grace Liu", False),
])
def test_entity_matching(a, b, same):
    assert entities.mentions_match(a, b) is same


# ---------------------------------------------------------------- cluster config


def test_ray_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    import yaml

    root = os.path.join(os.path.dirname(__file__), "..")
    cluster = yaml.safe_load(open(os.path.join(root, "ray_cluster.yaml")))
    ray_schema = json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))
    jsonschema.validate(cluster, ray_schema)
    types = cluster["available_node_types"]
    assert any("p5" in t["node_config"]["InstanceType"] or "g5" in t["node_config"]["InstanceType"] for t in types.values())
    assert "ray-ml" not in cluster["docker"]["image"]
    assert any("pip install" in c and "eama" in c for c in cluster["setup_commands"])


ENTITY_CHOICES = ["Grace Liu", "Tokyo", "Paris", "Rome", "Washington, D.C."]


@pytest.mark.parametrize("kind,answer,kept,not_reached", [
    ("entities", " Grace Liu; Tokyo; Grace Liu; Paris; Rome", " Grace Liu; Tokyo; Grace Liu;", "Paris"),  # a repeat
    ("entities", " Berlin; Grace Liu; Oslo; Paris", " Berlin; Grace Liu; Oslo;", "Paris"),  # two items name no choice
    ("entities", " Grace Liu; qqqqqqqqqqqqqqqqqqqqqqqqqqqqqq; Paris", " Grace Liu; q", "Paris"),  # runaway item
    ("entities", " none; Tokyo", " none;", "Tokyo"),  # a complete 'none'
    ("entities", " Berlin; Grace Liu; Tokyo; Paris; Rome; Washington, D.C.", None, None),  # one stray item, a comma inside an entity
    ("sentences", " 2, 5, 2, 7", " 2, 5, 2,", "7"),
    ("sentences", " 2, 12, 3, 4", None, None),  # one out-of-range number (5 candidates) is tolerated
    ("sentences", " 2, 12, 31, 4", " 2, 12, 31", "4"),  # two are not
])
def test_list_answers_stop_once_finished_or_runaway(kind, answer, kept, not_reached):
    """Decoding a selection answer stops once it is finished or runaway; a stray item is tolerated."""
    import torch

    from eama.news import prompts

    tok = models.load_model("tiny-llava").tokenizer
    prompt = tok("USER: list them ASSISTANT:")["input_ids"]
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    choices = prompts.answer_choices(kind, ENTITY_CHOICES if kind == "entities" else ["s"] * 5)
    criterion = models.StopWhenListEnds(tok, [(kind, choices)])
    stopped_at = None
    for k in range(1, len(ids) + 1):
        if bool(criterion(torch.tensor([prompt + ids[:k]]))[0]):
            stopped_at = tok.decode(ids[:k])
            break
    if kept is None:
        assert stopped_at is None
    else:
        assert stopped_at is not None and stopped_at.startswith(kept) and not_reached not in stopped_at


def test_a_row_that_stops_early_leaves_the_others_decoding():
    import torch

    tok = models.load_model("tiny-llava").tokenizer
    prompt = tok("USER: list them ASSISTANT:")["input_ids"]
    good, bad = (tok(a, add_special_tokens=False)["input_ids"] for a in (" 1, 2, 3", " 9, 8, 1"))
    n = min(len(good), len(bad))
    criterion = models.StopWhenListEnds(tok, [("sentences", ["1", "2", "3"])] * 2)
    flags = [criterion(torch.tensor([prompt + good[:k], prompt + bad[:k]])).tolist() for k in range(1, n + 1)]
    assert any(row[1] for row in flags) and not any(row[0] for row in flags)  # 9 and 8 are out of range


# ---------------------------------------------------------------- resource plan


def test_plan_on_a_two_cpu_laptop_leaves_cpu_for_io():
    from eama.engine import resources

    plan = resources.plan_stages(cpus=2, gpus=0)
    actors = plan.ner_actors * plan.ner_cpus + plan.mllm_actors * plan.mllm_cpus \
        + plan.caption_ner_actors * plan.caption_ner_cpus
    assert plan.device == "cpu" and actors + 2 * plan.io_cpus <= 2  # two I/O tasks can always run
    assert min(plan.ner_actors, plan.mllm_actors, plan.caption_ner_actors) >= 1


def test_plan_on_a_gpu_cluster_puts_one_model_per_gpu():
    from eama.engine import resources

    plan = resources.plan_stages(cpus=192, gpus=8)
    assert (plan.device, plan.mllm_actors, plan.mllm_gpus) == ("cuda", 8, 1.0)
    assert plan.ner_actors * plan.ner_cpus + plan.mllm_actors * plan.mllm_cpus <= 192 - 2
    trf = resources.plan_stages(cpus=192, gpus=8, ner_on_gpu=True)
    assert trf.ner_gpus > 0 and trf.mllm_actors * trf.mllm_gpus + trf.ner_actors * trf.ner_gpus <= 8
    cold = resources.plan_stages(cpus=8, gpus=0, device="cuda", mllm_actors=4)  # GPU workers not up yet
    assert (cold.device, cold.mllm_actors, cold.mllm_gpus) == ("cuda", 4, 1.0)  # the pool grows to 4 (test_gpu_plan)


@pytest.mark.parametrize("job", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "jobs").glob("*.py")))
def test_every_job_prints_its_help(job, capsys):
    """`python jobs/JOB.py --help` exits 0 with a usage line, whatever its help strings hold (a "10%")."""
    with pytest.raises(SystemExit) as done:
        load_job(job).main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_help_explains_every_key(capsys):
    """--help lists every config key with its default and a one-line meaning."""
    from eama.news.caption_job import CaptionCorpusConfig

    cap = load_job("caption_corpus")
    with pytest.raises(SystemExit) as done:
        cap.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[out.splitlines().index("") + 1].startswith("caption_corpus: EAMA captioning")
    for field in dataclasses.fields(CaptionCorpusConfig):
        line = next(row for row in out.splitlines() if row.strip().startswith(f"{field.name} (default "))
        assert "): " in line, line
    assert "  commit_rows (default 2000): rows per committed file; a crash loses at most the uncommitted ones" in out
