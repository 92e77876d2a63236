"""Multimodal NER (ITA): import of the real Twitter sets, span scoring, the CRF, CVA, a real
training run that learns, exactly-once tagging after a kill, and bad input as error rows."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import kill_when, load_job
from eama.engine import schema
from eama.engine.training.metrics import read_metrics
from eama.mner import crf as crf_module
from eama.mner import methods, spans, tagger, training

ROOT = Path(__file__).resolve().parents[1]


def import_split(src: Path, out: Path, captions: Path | None = None, images: Path | None = None) -> dict:
    args = ["--format", "twitter-mner", "--source", str(src), "--output", str(out)]
    if captions:
        args += ["--captions", str(captions)]
    if images:
        args += ["--images", str(images)]
    return load_job("import_corpus").main(args)


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# ---------------------------------------------------------------- import and scoring conventions


@pytest.mark.parametrize("dataset,sizes,test_spans,test_i_starts", [
    ("twitter2015", (4000, 1000, 3257), 5207, 135),
    ("twitter2017", (3373, 723, 723), 1351, None),
])
def test_real_twitter_sets_import_with_their_published_counts(shared_data, tmp_path, dataset, sizes, test_spans,
                                                              test_i_starts):
    folder = shared_data / "mner" / dataset
    for split, size in zip(("train", "valid", "test"), sizes):
        counts = import_split(folder / f"{split}.txt", tmp_path / split, folder / "blip2_captions.txt")
        assert counts == {"samples": size, "errors": 0, "shards": 1 + (size - 1) // 256}
    test = rows_of(tmp_path / "test")
    assert sum(len(spans.bio_spans(r["tags"])) for r in test) == test_spans
    if test_i_starts is not None:
        starts = sum(1 for r in test for _, s, _ in spans.bio_spans(r["tags"]) if r["tags"][s].startswith("I-"))
        assert starts == test_i_starts
    # the BLIP-2 captions cover every image of the test split; tokens and tags line up
    assert all(r["caption"] for r in test)
    assert all(len(r["tokens"]) == len(r["tags"]) > 0 for r in test)
    assert len({r["sample_id"] for r in test}) == sizes[2]


def test_bad_conll_lines_become_error_rows_naming_file_and_line(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_text(
        "IMGID:1\nHello\tO\nWorld\tB-LOC\n\n"      # lines 1-4: fine
        "IMGID:2\n\n"                                # line 5: a post with no tokens
        "IMGID:3\nfoo\tbar\tO\n\n"                   # line 8: a token holding a tab
        "IMGID:4\nAlice\tB-PER\nBob\tQ-PER\n\n"       # line 10: a tag that is not O / B-X / I-X
        "IMGID:5\n\xa0\tO\nParis\tB-LOC\n\n"          # lines 14-17: a lone no-break space is a token (real data has one)
        "IMGID:6\nNice\tB-LOC\n"                      # line 18: its image does not decode (and no final blank line)
    )
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    for i in (1, 3, 4, 5):
        Image.new("RGB", (8, 8), "red").save(images / f"{i}.jpg")
    (images / "6.jpg").write_bytes(b"not a jpeg at all")
    counts = import_split(src, tmp_path / "out", images=images)
    errors = {r["sample_id"]: r for r in rows_of(tmp_path / "out" / "_errors" / "import.parquet")}
    assert counts == {"samples": 2, "errors": 4, "shards": 1}  # 6 posts in = 2 rows + 4 error rows
    assert errors["2"]["source_file"] == f"{src}:5" and "no tokens" in errors["2"]["reason"]
    assert errors["3"]["source_file"] == f"{src}:8" and "token<TAB>tag" in errors["3"]["reason"]
    assert errors["4"]["source_file"] == f"{src}:10" and "Q-PER" in errors["4"]["reason"]
    assert errors["6"]["source_file"] == f"{src}:18" and "unreadable image" in errors["6"]["reason"]
    first, fifth = rows_of(tmp_path / "out")
    assert first["tokens"] == ["Hello", "World"] and first["tags"] == ["O", "B-LOC"] and first["image"]
    assert fifth["tokens"] == ["\xa0", "Paris"] and fifth["tags"] == ["O", "B-LOC"]


def test_spans_follow_the_conlleval_lenient_reading():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "B-PER"]
    assert spans.bio_spans(tags) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 6, 7), ("PER", 7, 8)]
    # BIOES round trip (the tagger's internal scheme) and a tolerant reading of ill-formed BIOES
    assert spans.to_bioes(spans.bio_spans(tags), len(tags)) == ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC",
                                                                "S-ORG", "S-PER"]
    assert spans.bioes_spans(["I-PER", "E-PER", "E-LOC", "B-ORG", "O", "S-PER"]) == [
        ("PER", 0, 2), ("LOC", 2, 3), ("ORG", 3, 4), ("PER", 5, 6)]


def test_scores_count_spans_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold spans: PER(0,2) LOC(3,4) ORG(0,1); predicted: PER(0,2) ORG(3,4) ORG(0,1); 2 correct of 3 and 3
    s = spans.score(gold, pred)
    assert (s["gold_spans"], s["predicted_spans"]) == (3, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["per_type"]["LOC"]["recall"] == 0.0 and s["per_type"]["PER"]["f1"] == 1.0
    assert s["per_type"]["ORG"]["precision"] == pytest.approx(0.5)
    assert spans.span_counts(gold, pred) == (2, 3, 3)


# ---------------------------------------------------------------- the CRF and CVA


def test_crf_matches_brute_force_enumeration():
    torch.manual_seed(0)
    labels, length = 3, 4
    crf = crf_module.CRF(labels)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    emissions = torch.randn(2, length, labels)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    gold = torch.tensor([[0, 1, 2, 1], [2, 0, 0, 0]])
    nll = crf.nll(emissions, gold, mask)
    best = crf.decode(emissions, mask)
    for b in range(2):
        n = int(mask[b].sum())

        def score(path, temperature=1.0):
            s = crf.start[path[0]] + emissions[b, 0, path[0]] + crf.end[path[-1]]
            s = s + sum(crf.transitions[path[t - 1], path[t]] + emissions[b, t, path[t]] for t in range(1, n))
            return s / temperature

        paths = list(itertools.product(range(labels), repeat=n))
        for temperature in (1.0, 3.0):
            scores = torch.stack([score(p, temperature) for p in paths])
            log_z = torch.logsumexp(scores, 0)
            marginals = torch.zeros(n, labels)
            for p, s in zip(paths, scores):
                for t, y in enumerate(p):
                    marginals[t, y] += torch.exp(s - log_z)
            got = crf.marginals(emissions, mask, temperature)[b, :n]
            assert torch.allclose(got, marginals, atol=1e-5)
        scores = torch.stack([score(p) for p in paths])
        assert float(nll[b]) == pytest.approx(float(torch.logsumexp(scores, 0) - score(tuple(gold[b, :n].tolist()))),
                                              abs=1e-4)
        assert best[b] == list(paths[int(scores.argmax())])


def minilm_task(view: str = "caption", cva: bool = True) -> training.MnerTask:
    cfg = training.MnerTrainConfig(train="unused", view=view, cva=cva, temperature=2.0, micro_batch_size=2)
    task = training.MnerTask(cfg, ["LOC", "PER"])
    task.build_model({}, "cpu", torch.float32)
    task.model.eval()
    return task


def numpy_rows(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_cva_kl_is_zero_when_both_views_are_identical():
    task = minilm_task()
    rows = [{"sample_id": "a", "tokens": ["Obama", "visits", "Paris"], "tags": ["B-PER", "O", "B-LOC"],
             "caption": "a man in a suit", "ocr": None, "object_tags": None},
            {"sample_id": "b", "tokens": ["hello"], "tags": ["O"], "caption": "a dog", "ocr": None, "object_tags": None}]
    batch = task.collate(numpy_rows(rows))
    with torch.no_grad():
        nll_view = training.ita_loss(task.model, task.model.crf, batch, None)
        # the student sees exactly the teacher's input: the KL term vanishes, half the NLL remains
        same = training.Batch(batch.with_view, batch.with_view, batch.has_view, batch.gold, batch.words)
        assert torch.allclose(training.ita_loss(task.model, task.model.crf, same, 2.0), 0.5 * nll_view, atol=1e-5)
        # with a different student input (the post alone) the KL is positive
        assert bool((training.ita_loss(task.model, task.model.crf, batch, 2.0) > 0.5 * nll_view).all())


def test_view_positions_get_no_tag():
    task = minilm_task()
    enc = tagger.encode(task.tokenizer, [["New", "York", "rocks"]], ["a city skyline"], 64)
    assert enc.word_mask.tolist() == [[True, True, True]]
    positions = enc["word_index"][0].tolist()
    ids = enc["input_ids"][0].tolist()
    sep = ids.index(task.tokenizer.sep_token_id)
    assert all(p < sep for p in positions)  # every tagged position lies in the post, before the separator
    assert task.tokenizer.decode(ids[sep + 1:]).replace("[SEP]", "").split() == ["a", "city", "skyline"]


# ---------------------------------------------------------------- training, tagging, scoring


@pytest.fixture(scope="module")
def small_sets(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Twitter-2017 slices: 640 train posts, 96 valid posts, 160 held-out test posts."""
    out = tmp_path_factory.mktemp("mner_sets")
    folder = shared_data / "mner" / "twitter2017"
    paths = {}
    for split, n in (("train", 640), ("valid", 96), ("test", 160)):
        import_split(folder / f"{split}.txt", out / f"{split}_all", folder / "blip2_captions.txt")
        table = pq.read_table(out / f"{split}_all").slice(0, n)
        (out / split).mkdir()
        pq.write_table(table, out / split / "part-00000.parquet", row_group_size=32)
        paths[split] = out / split
    return paths


@pytest.fixture(scope="module")
def trained(small_sets, tmp_path_factory, ray_local) -> Path:
    """A MiniLM tagger trained with the caption view and CVA, selected on valid."""
    runs = tmp_path_factory.mktemp("mner_runs")
    cfg = training.MnerTrainConfig(train=str(small_sets["train"]), valid=str(small_sets["valid"]), output=str(runs),
                                   run_name="cva", view="caption", cva=True, epochs=2, micro_batch_size=16,
                                   num_workers=2, lr=1e-4)
    result = methods.fit(cfg)
    assert result.error is None
    return runs / "cva"


@pytest.mark.slow
def test_training_learns_and_exports_the_epoch_selected_on_valid(trained, small_sets):
    history = read_metrics(str(trained))
    evals = [r for r in history if "eval/dev_f1" in r]
    assert len(evals) == 2  # once per epoch, in both evaluation views
    assert all({"eval/dev_f1_text", "eval/dev_f1_view"} <= set(r) for r in evals)
    info = json.loads((trained / "export" / "eama_export.json").read_text())
    best = max(evals, key=lambda r: r["eval/dev_f1"])
    assert info["step"] == best["step"] and info["selected_value"] == pytest.approx(best["eval/dev_f1"])

    model, tok, spec = tagger.load(str(trained / "export"))
    untrained, _ = tagger.build("minilm", spec.types)
    test = rows_of(small_sets["test"])
    words = [r["tokens"] for r in test]
    views = [r["caption"] for r in test]
    gold = [r["tags"] for r in test]

    def f1(net):
        with torch.no_grad():
            pred = tagger.predict(net.eval(), tagger.encode(tok, words, views, spec.max_length), spec.labels,
                                  [len(w) for w in words])
        return spans.score(gold, pred)["f1"]

    trained_f1, base_f1 = f1(model), f1(untrained)
    assert trained_f1 > 0.35 and trained_f1 > base_f1 + 0.3, (trained_f1, base_f1)


@pytest.mark.slow
def test_tag_entities_is_exactly_once_after_a_kill_and_scores(trained, small_sets, tmp_path):
    out = tmp_path / "tagged"
    cmd = [sys.executable, str(ROOT / "jobs" / "tag_entities.py"), "--model", str(trained / "export"),
           "--input", str(small_sets["test"]), "--output", str(out), "batch_size=16", "commit_rows=16",
           "tag_batch_size=4"]
    kill_when(cmd, lambda: len(list(out.glob("part-*.parquet"))) >= 2, tmp_path / "killed.log")
    partial = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    assert 0 < partial < 160
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["sample_id"] for r in rows) == sorted(r["sample_id"] for r in rows_of(small_sets["test"]))
    for r in rows:
        assert len(r["predicted_tags"]) == len(r["tokens"]) == len(r["tags"])
        assert [(e["label"], e["start"], e["end"]) for e in r["entities"]] == spans.bio_spans(r["predicted_tags"])
        assert all(e["text"] == " ".join(r["tokens"][e["start"]:e["end"]]) for e in r["entities"])
    report_dir = tmp_path / "report"
    scores = load_job("evaluate_mner").main(["--input", str(out), "--output", str(report_dir)])
    assert scores["gold_spans"] == sum(len(spans.bio_spans(r["tags"])) for r in rows)
    assert {p.name for p in report_dir.iterdir()} == {"report.json", "report.md", "report.png"}
    assert "| PER |" in (report_dir / "report.md").read_text()


@pytest.mark.slow
def test_bad_posts_become_error_rows(trained, ray_local, tmp_path):
    good = {"sample_id": "ok", "tokens": ["Obama", "in", "Paris"], "tags": ["B-PER", "O", "B-LOC"], "caption": "x"}
    bad = [
        {"sample_id": "empty", "tokens": [], "tags": []},
        {"sample_id": "tab", "tokens": ["a\tb", "c"], "tags": ["O", "O"]},
        {"sample_id": "short", "tokens": ["a", "b"], "tags": ["O"]},
        {"sample_id": "ok", "tokens": ["again"], "tags": ["O"]},
    ]
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist([good] + bad, schema=schema.MNER_SAMPLE), src / "part-0.parquet")
    job = load_job("tag_entities")
    manifest = job.main(["--model", str(trained / "export"), "--input", str(src), "--output", str(tmp_path / "out")])
    assert manifest["this_run"]["written"] == 1 and manifest["this_run"]["errors"] == 4
    errors = {(r["sample_id"], r["row"]): r["reason"] for r in pq.read_table(tmp_path / "out" / "_errors").to_pylist()}
    assert "empty post" in errors[("empty", 1)]
    assert "tab" in errors[("tab", 2)]
    assert "1 gold tags for 2 tokens" in errors[("short", 3)]
    assert "duplicate sample_id" in errors[("ok", 4)]
    again = job.main(["--model", str(trained / "export"), "--input", str(src), "--output", str(tmp_path / "out")])
    assert again["this_run"]["written"] == 0 and again["this_run"]["errors"] == 0


def test_relative_paths_are_made_absolute_before_workers_see_them(tmp_path, monkeypatch):
    """Ray Train workers and tagger actors run in other directories: a relative --train, --valid or
    --model would not resolve there."""
    (tmp_path / "t").mkdir()
    (tmp_path / "v").mkdir()
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = training.MnerTrainConfig(train="t", valid="v")
    training.validate(cfg)
    assert (cfg.train, cfg.valid) == (str(tmp_path / "t"), str(tmp_path / "v"))
    from eama.mner import tagging

    tag = tagging.TagConfig(input="t", output="out", model="m")
    tagging.validate(tag)
    assert tag.model == str(tmp_path / "m")


def test_benchmark_skips_finished_runs_and_reports_mean_and_std(tmp_path):
    """A finished run's JSON means the run is never redone; the table is mean ± std over seeds."""
    from eama.mner import benchmark

    cfg = benchmark.BenchmarkConfig(data=str(tmp_path / "no-data"), output=str(tmp_path / "out"),
                                    results=str(tmp_path / "results"), datasets="twitter2017", configs="caption_cva",
                                    seeds="0,1")
    (tmp_path / "results").mkdir()
    for seed, (text, view) in enumerate([(0.80, 0.82), (0.84, 0.86)]):
        result = {"run": benchmark.run_name(cfg, "twitter2017", "caption_cva", seed), "dataset": "twitter2017",
                  "config": "caption_cva", "seed": seed, "encoder": "minilm", "train_seconds": 100.0 + seed,
                  "test": {"text": {"f1": text}, "caption": {"f1": view}}}
        (tmp_path / "results" / f"{result['run']}.json").write_text(json.dumps(result))
    results = benchmark.run_matrix(cfg)  # the data folder does not exist: any new run would fail
    assert len(results) == 2

    def row(found: list[dict]) -> str:  # results without provenance are of unknown version: mixed on purpose
        return next(line for line in benchmark.table(found, mix_versions=True).splitlines()
                    if line.startswith("| minilm | twitter2017 | caption_cva |"))

    # mean 82.00 / 84.00, sample std of (80, 84) and (82, 86) = 2.83
    assert "| 82.00 ± 2.83 (n=2) | 84.00 ± 2.83 (n=2) | 100 |" in row(results) and "85.96 / 85.85" in row(results)
    assert row(results).endswith("| unknown † |")
    # a seed whose selected epoch scored 0 on valid (it tags everything O) is named, not averaged
    dead = dict(result, run="minilm-twitter2017-caption_cva-s2", seed=2, train_seconds=104.0,
                dev={"dev_f1": 0.0}, test={"text": {"f1": 0.0}, "caption": {"f1": 0.0}})
    assert "| 82.00 ± 2.83 (n=2) + 1 collapsed (seed 2) | 84.00 ± 2.83 (n=2) | 102 |" in row(results + [dead])


def conll_slice(src: Path, dst: Path, posts: int) -> None:
    """The first `posts` posts of a UMT CoNLL file (blocks separated by blank lines)."""
    blocks = [b for b in src.read_text(encoding="utf-8").split("\n\n") if b.strip()][:posts]
    dst.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")


@pytest.mark.slow
def test_benchmark_without_ray_scores_test_as_tag_entities_does(shared_data, tmp_path, ray_local):
    """launcher=local trains and tags the test posts in the benchmark's own process (no Ray, no
    DeepSpeed: how it runs on a GPU machine that has neither); its test scores are those of
    tag_entities on Ray Data for the same export, and the result names the launcher."""
    from eama.mner import benchmark

    data = tmp_path / "data" / "twitter2017"
    data.mkdir(parents=True)
    real = shared_data / "mner" / "twitter2017"
    for split, n in (("train", 64), ("valid", 32), ("test", 64)):
        conll_slice(real / f"{split}.txt", data / f"{split}.txt", n)
    (data / "blip2_captions.txt").write_bytes((real / "blip2_captions.txt").read_bytes())
    cfg = benchmark.BenchmarkConfig(data=str(tmp_path / "data"), output=str(tmp_path / "out"),
                                    results=str(tmp_path / "results"), datasets="twitter2017", configs="caption",
                                    seeds="0", epochs=1, lr=1e-4, launcher="local", throughput=False)
    [result] = benchmark.run_matrix(cfg)
    assert (result["launcher"], result["device"]) == ("local", f"cpu ({os.cpu_count()} cores)")
    run = tmp_path / "out" / "runs" / result["run"]
    # nothing of Ray Train's in the run folder; one checkpoint kept per epoch (keep_checkpoints=1)
    names = {p.name for p in run.iterdir()}
    exported = [n for n in names if n.startswith("export-0")]  # the export behind the pointer and link
    assert names == {"metrics", "loss_curves.png", "export", "export.json", "local-checkpoints", *exported}
    assert len(exported) == 1 and (run / "export").resolve() == (run / exported[0]).resolve()
    assert [p.name for p in (run / "local-checkpoints").iterdir()] == ["checkpoint-00000004"]  # 64 posts / 16

    export = str(tmp_path / "out" / "runs" / result["run"] / "export")
    test = tmp_path / "out" / "data" / "twitter2017" / "test"
    want = benchmark.tag_and_score(dataclasses.replace(cfg, launcher="ray"), export, str(test), str(tmp_path / "tagged"),
                                   "caption")
    got = result["test"]["caption"]
    assert got["gold_spans"] == want["gold_spans"] == sum(len(spans.bio_spans(r["tags"])) for r in rows_of(test))
    assert (got["f1"], got["per_type"]) == (want["f1"], want["per_type"])
    assert set(result["test"]) == {"text", "caption"}
