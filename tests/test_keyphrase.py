"""Multimodal keyphrases (MM-MKP): the papers' metric, the importer, a short real training run,
exactly-once extraction, bad input, the benchmark's bookkeeping."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import kill_when, load_job
from eama.engine import importing, schema
from eama.engine.training.metrics import StepStats, read_metrics
from eama.keyphrase import baselines, benchmark, corpus, metric, training
from eama.keyphrase import model as kp_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keyphrase_data(shared_data) -> Path:
    folder = shared_data / "keyphrase"
    if not (folder / "test_src.txt").exists():
        pytest.skip(f"the Twitter keyphrase files are not in {folder} (see ../shared/data/README.md)")
    return folder


# ---------------------------------------------------------------- the metric


def test_cmkp_released_predictions_score_exactly_as_published(keyphrase_data):
    """CMKP's best_pred.txt on test_src.txt: F1@1 0.47130, F1@3 0.33224, MAP@5 0.52261 (its paper
    and repository)."""
    scores = load_job("evaluate_keyphrases").main(
        ["--predictions", str(keyphrase_data / "best_pred.txt"), "--source", str(keyphrase_data / "test_src.txt"),
         "--output", "/tmp/eama-test-cmkp-report"])
    a = scores["all"]
    assert (round(a["F1@1"], 5), round(a["F1@3"], 5), round(a["MAP@5"], 5)) == (0.47130, 0.33224, 0.52261)
    assert scores["posts"] == 5372 and scores["present"]["posts"] + scores["absent"]["posts"] >= 5372


def test_metric_counts_by_hand():
    """Stems match ('Running Shoes' = 'running shoe'), a duplicate after stemming is dropped, P@k
    divides by min(k, #predictions), R@k by #targets, F1 from the macro averages."""
    posts = ["new running shoes for the marathon", "cats"]
    gold = [["running shoes", "marathon"], ["dogs"]]
    pred = [["Running Shoe", "running shoes", "race", "marathons"], []]
    r = metric.score(posts, gold, pred, ks=(1, 3))["all"]
    # post 1, deduplicated predictions: running shoe (hit), race, marathon (hit)
    # P@1 = 1, R@1 = 1/2, P@3 = 2/3, R@3 = 1; post 2: no predictions, P = R = 0
    assert r["P@1"] == pytest.approx(0.5) and r["R@1"] == pytest.approx(0.25)
    assert r["P@3"] == pytest.approx(1 / 3) and r["R@3"] == pytest.approx(0.5)
    assert r["F1@1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    # AP@3 of post 1: (1/1 + 2/3) / 2 targets; post 2: 0
    assert r["MAP@3"] == pytest.approx((1 + 2 / 3) / 2 / 2)
    scoped = metric.score(posts, gold, pred, ks=(1,))
    assert scoped["present"]["posts"] == 1 and scoped["absent"]["posts"] == 1  # 'dogs' is not in 'cats'


# ---------------------------------------------------------------- import


def test_both_layouts_import_line_for_line(keyphrase_data, tmp_path):
    counts = {}
    for name in ("test_src", "test_ocr_kw"):
        out = tmp_path / name
        counts[name] = importing.write_shards(corpus.twitter_samples(str(keyphrase_data / f"{name}.txt")), str(out),
                                              100_000, schema.KEYPHRASE_SAMPLE)
    assert counts["test_src"] == counts["test_ocr_kw"] == {"samples": 5372, "errors": 0, "shards": 1}
    src = pq.read_table(tmp_path / "test_src").to_pylist()
    ocr = pq.read_table(tmp_path / "test_ocr_kw").to_pylist()
    assert [r["sample_id"] for r in src] == [r["sample_id"] for r in ocr]
    assert all(a["keyphrases"] == b["keyphrases"] and a["post"] == b["post"] for a, b in zip(src, ocr))
    assert ocr[0]["visual_entities"][:2] == ["potted plant", "don't forget grass"] and ocr[0]["ocr"] is None
    assert ocr[0]["image_text_match"] == pytest.approx(0.99968, abs=1e-5)
    assert src[0]["image_text_match"] is None and src[0]["image_uri"].endswith("D0wn9TnXQAAGWyD.jpg")
    # MM-MKP: "only 63% of the text-image pairs have a matching score above 0.8"
    share = sum(r["image_text_match"] > 0.8 for r in ocr) / len(ocr)
    assert 0.62 < share < 0.64


def test_bad_lines_become_error_rows_naming_file_and_line(tmp_path):
    path = tmp_path / "posts_src.txt"
    lines = [b"good post about cats<sep>cats;pets<sep>http://x/a.jpg",
             b"no separator here",
             b"   <sep>empty<sep>http://x/b.jpg",
             b"caf\xe9 latin-1<sep>coffee<sep>http://x/c.jpg",
             b"post <seg> ocr <seg> a ; b<sep>kp<sep>http://x/d.jpg<sep>tensor([[0.5]])<sep>1<sep>a",
             b"",
             b"another good one <seg>  <seg> dog<sep>dogs<sep>http://x/e.jpg<sep>tensor([[0.1, 0.9]])<sep>1<sep>dog"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    counts = load_job("import_corpus").main(["--format", "twitter-keyphrase", "--source", str(path),
                                             "--output", str(out)])
    assert counts == {"samples": 2, "errors": 4, "shards": 1}
    errors = {r["source_file"].rsplit(":", 1)[1]: r["reason"] for r in pq.read_table(out / "_errors").to_pylist()}
    assert "no <sep>" in errors["2"] and errors["3"] == "empty post" and errors["4"] == "not valid UTF-8"
    assert "tensor([[p0, p1]])" in errors["5"]
    rows = pq.read_table(out).to_pylist()
    assert [r["sample_id"] for r in rows] == ["posts-000001", "posts-000007"]
    assert rows[1]["visual_entities"] == ["dog"] and rows[1]["image_text_match"] == pytest.approx(0.9)


# ---------------------------------------------------------------- the model


def _cycle_tokenizer():
    from transformers import AutoTokenizer

    from eama.engine import encoders

    return AutoTokenizer.from_pretrained(encoders.locate("minilm"))


def test_inputs_keep_segments_and_cut_ocr_before_the_post():
    tok = _cycle_tokenizer()
    spec = kp_model.KeyphraseSpec(classes=["x"], max_length=16)
    row = {"post": "the quick brown fox", "ocr": " ".join(["word"] * 30), "visual_entities": ["fox", "dog"],
           "image_text_match": 0.25}
    enc = kp_model.encode_inputs(tok, [row], spec)
    ids, seg = enc.input_ids[0].tolist(), enc.segments[0].tolist()
    assert len(ids) == 16 and tok.decode(ids[1:5]) == "the quick brown fox"
    assert seg[:6] == [kp_model.POST] * 6 and seg[-4:] == [kp_model.ENTITIES] * 4  # 'fox ; dog' + [SEP]
    assert tok.decode([i for i, s in zip(ids, seg) if s == kp_model.ENTITIES]) == "fox ; dog [SEP]"
    assert enc.match.tolist() == [0.25]
    text_only = kp_model.encode_inputs(tok, [row], kp_model.KeyphraseSpec(classes=["x"], inputs="text"))
    assert set(text_only.segments[0].tolist()) == {kp_model.POST} and torch.isnan(text_only.match).all()
    # one image-derived input at a time: the other segment holds its [SEP] alone; the gate's probability stays
    for inputs, kept, dropped in (("ocr", kp_model.OCR, kp_model.ENTITIES), ("entities", kp_model.ENTITIES, kp_model.OCR)):
        one = kp_model.encode_inputs(tok, [row], kp_model.KeyphraseSpec(classes=["x"], max_length=64, inputs=inputs))
        ids, seg = one.input_ids[0].tolist(), one.segments[0].tolist()
        assert tok.decode([i for i, s in zip(ids, seg) if s == dropped]) == "[SEP]"
        assert len([s for s in seg if s == kept]) > 1 and one.match.tolist() == [0.25]


def object_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as the trainer's numpy columns (one object per row, lists kept whole)."""
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        column = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            column[i] = r.get(key)
        out[key] = column
    return out


class Engine:
    """The model called as the trainer's engine is."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args):
        return self.module(*args)


def test_fine_filter_target_does_not_follow_the_students_query_and_its_loss_is_logged():
    """The keyphrase -> region target has its own query: zeroing the student's query makes the student
    uniform, not the target, so the loss cannot collapse to zero; the step logs the loss's mean.
    gate=fixed turns the coarse gate off (g = 1)."""
    rng = np.random.default_rng(0)
    rows = [dict(r, image_text_match=0.25) for r in synthetic_rows(4, TOPICS[:4], 0, True)]  # images on posts 0, 2
    for r in rows[::2]:  # noise, not one colour: regions that differ from each other
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        r["image"] = buf.getvalue()
    task = training.KeyphraseTask(training.KeyphraseTrainConfig(train="unused", micro_batch_size=4),
                                  [r["keyphrases"][0] for r in rows])
    task.build_model({}, "cpu", torch.float32)
    task.model.eval()
    batch = task.collate(object_columns(rows))
    t = batch.targets
    with torch.no_grad():
        memory = task.model.encode(batch.inputs)
        want = task.model.region_target(memory, t.decoder_out, t.decoder_mask.bool(), t.pair_post)
        task.model.region_query.weight.zero_()
        uniform = task.model.encode(batch.inputs)
        assert torch.allclose(uniform.region_attention, torch.full_like(want, 1 / want.shape[1]))
        assert torch.equal(task.model.region_target(uniform, t.decoder_out, t.decoder_mask.bool(), t.pair_post), want)
        spread = (want - 1 / want.shape[1]).abs().max(-1).values[batch.has_image.bool()]
        assert bool((spread > 2e-3).all()), spread  # the target is not uniform with it
        _, row_loss, groups = task.loss(Engine(task.model), batch)
    stats = StepStats(len(task.group_names))
    stats.add(row_loss.sum(), row_loss, groups, task.counts(batch))
    record = stats.reduce("cpu", 1, 1, task.group_names)
    assert record["loss_part/region_attention"] > 0 and record["loss_part/classification"] > 0
    assert record["loss_part/generation"] > 0 and record["keyphrases"] == 4
    # the coarse gate: the given probability by default, 1 with gate=fixed
    derived = (batch.inputs.segments != kp_model.POST) & batch.inputs.attention_mask.bool()
    with torch.no_grad():
        assert torch.allclose(memory.bias[:, :derived.shape[1]][derived], torch.log(torch.tensor(0.25)))
        task.model.gate_mode = "fixed"
        assert float(task.model.encode(batch.inputs).bias[:, :derived.shape[1]][derived].abs().max()) == 0.0
    with pytest.raises(SystemExit, match="gate must be one of match, fixed"):
        training.validate(training.KeyphraseTrainConfig(train=str(ROOT), gate="off"))


def test_benchmark_ablation_rows_set_one_thing_each():
    assert benchmark.settings("joint") == {"inputs": "all", "mode": "joint", "gate": "match"}
    assert benchmark.settings("joint_gate_fixed") == {"inputs": "all", "mode": "joint", "gate": "fixed"}
    assert benchmark.settings("ocr")["inputs"] == "ocr" and benchmark.settings("entities")["inputs"] == "entities"
    cfg = benchmark.BenchmarkConfig()
    assert {"joint_gate_fixed", "ocr", "entities"} <= set(cfg.configs.split(",")) and cfg.seeds == "0,1"


# ---------------------------------------------------------------- a short real training run

TOPICS = ["harbor lights", "maple syrup", "solar eclipse", "jazz night", "robot parade", "garden gnome",
          "river rafting", "chess final", "comet watch", "vintage cars", "street tacos", "ice sculpture",
          "kite festival", "tulip fields", "desert storm", "night market", "snow leopard", "coral reef",
          "book fair", "paper lanterns", "lava lamps", "pumpkin race", "cloud atlas", "moon landing",
          "salsa class", "tea ceremony", "fog horn", "glass blowing", "train museum", "owl rescue",
          "bike repair", "violin solo", "sand castle", "dragon boat", "wind farm", "city marathon"]
FILLER = ["look at this", "what a day for", "cannot stop thinking about", "everyone is talking about",
          "so proud of our", "first time seeing the", "who else loves", "throwback to the"]


def synthetic_rows(n: int, topics: list[str], seed: int, with_images: bool) -> list[dict]:
    """Posts that name their topic; the keyphrase is the topic. Every other post has an image."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        row = {"sample_id": f"syn-{seed}-{i:04d}", "post": f"{rng.choice(FILLER)} the {topic} ! {rng.choice(FILLER)} it",
               "keyphrases": [topic], "ocr": None, "visual_entities": [topic.split()[0], "photo"],
               "image_text_match": None}
        if with_images and i % 2 == 0:
            buf = io.BytesIO()
            Image.new("RGB", (48, 48), (rng.randrange(256), 90, 160)).save(buf, format="JPEG")
            row["image"] = buf.getvalue()
        rows.append(row)
    return rows


def write_rows(rows: list[dict], folder: Path) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.KEYPHRASE_SAMPLE), folder / "part-00000.parquet",
                   row_group_size=16)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local) -> dict:
    """A MiniLM joint model trained on 24 topics (images on half the posts), selected on held-out
    posts of 6 topics it never saw in training."""
    base = tmp_path_factory.mktemp("kp")
    seen, unseen = TOPICS[:24], TOPICS[24:30]
    train = write_rows(synthetic_rows(192, seen, 0, True), base / "train")
    valid = write_rows(synthetic_rows(24, unseen, 1, True), base / "valid")
    test_rows = synthetic_rows(36, TOPICS[30:] + seen[:3], 2, False)
    test = write_rows(test_rows, base / "test")
    cfg = training.KeyphraseTrainConfig(train=str(train), valid=str(valid), output=str(base / "runs"), run_name="j",
                                        epochs=2, micro_batch_size=16, num_workers=1, cpus_per_worker=1,
                                        lr=2e-4, head_lr=2e-4, beam_size=4, top_n=5)
    result = training.fit(cfg)
    assert result.error is None
    return {"export": base / "runs" / "j" / "export", "run": base / "runs" / "j", "test": test,
            "test_rows": test_rows, "train_rows": synthetic_rows(192, seen, 0, False), "base": base}


@pytest.mark.slow
def test_training_learns_to_copy_keyphrases_it_never_saw(trained):
    history = read_metrics(str(trained["run"]))
    evals = [r for r in history if "eval/dev_score" in r]
    assert len(evals) == 2
    info = json.loads((trained["export"] / "eama_export.json").read_text())
    assert info["step"] == max(evals, key=lambda r: r["eval/dev_score"])["step"]

    model, tok, spec = kp_model.load(str(trained["export"]))
    rows = trained["test_rows"]
    untrained, _ = kp_model.build(spec)

    def f1_at_1(net) -> float:
        with torch.no_grad():
            ranked = kp_model.predict(net.eval(), tok, rows, spec)
        return baselines.score_rows(rows, [[p for p, _ in r] for r in ranked])["all"]["F1@1"], ranked

    trained_f1, ranked = f1_at_1(model)
    untrained_f1, _ = f1_at_1(untrained)
    frequent_f1 = baselines.score_rows(rows, [baselines.most_frequent(trained["train_rows"])] * len(rows))["all"]["F1@1"]
    assert trained_f1 > 0.5 and trained_f1 > untrained_f1 + 0.3 and trained_f1 > frequent_f1 + 0.3, \
        (trained_f1, untrained_f1, frequent_f1)
    # keyphrases the classifier cannot know (topics absent from training), produced by copying from the post
    copied = {r["keyphrases"][0] for r, found in zip(rows, ranked) if found and found[0][0] == r["keyphrases"][0]}
    assert copied - set(spec.classes), copied


@pytest.mark.slow
def test_extract_keyphrases_is_exactly_once_after_a_kill_and_scores(trained, tmp_path):
    bad = [{"sample_id": "empty", "post": "  ", "keyphrases": ["x"]},
           {"sample_id": "blank-kp", "post": "fine post", "keyphrases": ["ok", ""]}]
    rows = trained["test_rows"] + bad
    src = write_rows(rows, tmp_path / "in")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "jobs" / "extract_keyphrases.py"), "--model", str(trained["export"]),
           "--input", str(src), "--output", str(out), "batch_size=8", "commit_rows=8", "extract_batch_size=4"]
    kill_when(cmd, lambda: len(list(out.glob("part-*.parquet"))) >= 2, tmp_path / "killed.log")
    partial = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    assert 0 < partial < len(trained["test_rows"])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = pq.read_table(out).to_pylist()
    errors = pq.read_table(out / "_errors").to_pylist()
    assert sorted(r["sample_id"] for r in got) == sorted(r["sample_id"] for r in trained["test_rows"])
    assert {e["sample_id"]: e["reason"] for e in errors} == {"empty": "empty post",
                                                             "blank-kp": "gold keyphrases hold an empty phrase"}
    assert all(0 < len(r["predicted_keyphrases"]) <= 5 and len(r["predicted_scores"]) == len(r["predicted_keyphrases"])
               for r in got)
    report_dir = tmp_path / "report"
    scores = load_job("evaluate_keyphrases").main(["--input", str(out), "--output", str(report_dir)])
    expected = metric.score([r["post"] for r in got], [r["keyphrases"] for r in got],
                            [r["predicted_keyphrases"] for r in got])
    assert scores["all"]["F1@1"] == pytest.approx(expected["all"]["F1@1"]) and scores["posts"] == len(got)
    assert {p.name for p in report_dir.iterdir()} == {"report.json", "report.md", "report.png"}


# ---------------------------------------------------------------- benchmark bookkeeping


def test_joint_list_adds_the_two_heads_probabilities_per_phrase():
    """sum: a phrase both heads back rises above either head's single pick; beams_first keeps the
    decoder's order and fills with classes."""
    import math

    beams = [("a", math.log(0.30)), ("b", math.log(0.25)), ("d", math.log(0.01))]
    classes = [("c", math.log(0.50)), ("b", math.log(0.28)), ("e", math.log(0.02))]
    summed = kp_model.joint_ranking(beams, classes, 4)
    assert [p for p, _ in summed] == ["b", "c", "a", "e"]  # 0.53, 0.50, 0.30, 0.02
    assert summed[0][1] == pytest.approx(math.log(0.53))
    assert [p for p, _ in kp_model.joint_ranking(beams, classes, 4, "beams_first")] == ["a", "b", "d", "c"]


def test_benchmark_names_a_ranking_and_decodes_a_trained_run_again():
    cfg = benchmark.BenchmarkConfig(tag="headlr")
    assert benchmark.run_name(cfg, "joint", 0) == "minilm-joint-s0-headlr"
    cfg.joint_rank = "beams_first"
    assert benchmark.run_name(cfg, "joint", 0) == "minilm-joint-s0-headlr-beams_first"
    assert benchmark.train_name(cfg, "joint", 0) == "minilm-joint-s0-headlr"  # the same trained model
    assert benchmark.run_name(cfg, "classify", 1) == "minilm-classify-s1-headlr"  # no joint list to rank


def test_benchmark_skips_finished_runs_and_reports_mean_and_std(tmp_path):
    cfg = benchmark.BenchmarkConfig(results=str(tmp_path / "results"), output=str(tmp_path / "out"),
                                    data=str(tmp_path / "missing"), configs="joint", seeds="0,1", baselines="tfidf", tag="")
    scores = {"all": {"F1@1": 0.30, "F1@3": 0.20, "MAP@5": 0.35}, "present": {"F1@1": 0.6}, "absent": {"F1@1": 0.1}}
    for seed, f1 in ((0, 0.30), (1, 0.34)):
        test = json.loads(json.dumps(scores))
        test["all"]["F1@1"] = f1
        (tmp_path / "results").mkdir(exist_ok=True)
        (tmp_path / "results" / f"minilm-joint-s{seed}.json").write_text(json.dumps(
            {"run": f"minilm-joint-s{seed}", "config": "joint", "seed": seed, "encoder": "minilm", "test": test,
             "train_seconds": 10.0}))
    (tmp_path / "results" / "baseline-tfidf.json").write_text(json.dumps(
        {"run": "baseline-tfidf", "config": "tfidf", "seed": None, "encoder": None, "test": scores,
         "train_seconds": 3.0}))
    results = benchmark.run_matrix(cfg)  # everything is done: no data is read, nothing is trained
    assert len(results) == 3
    lines = benchmark.table(results, mix_versions=True).splitlines()  # no provenance: unknown versions
    joint = next(line for line in lines if line.startswith("| joint |"))
    assert "32.00 ± 2.83 (n=2)" in joint  # mean and sample std of 30 and 34
    assert lines.index(next(line for line in lines if line.startswith("| tfidf |"))) < lines.index(joint)
    assert any(line.startswith("| MM-MKP (paper") and "48.19" in line for line in lines)
