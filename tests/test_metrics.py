"""Evaluation: Transform-and-Tell's preprocessing and entity rule, pycocoevalcap parity, the job."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eama.engine import schema, storage
from eama.news import evaluation, generations, metrics

ROOT = Path(__file__).resolve().parents[1]
TAT_FILE = Path("nytimes800k") / "generations.jsonl"


def _load_job():
    spec = importlib.util.spec_from_file_location("eama_job_evaluate", ROOT / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses / OmegaConf resolve annotations through it
    spec.loader.exec_module(module)
    return module


job = _load_job()


@pytest.fixture(scope="module")
def tat_rows(shared_data: Path) -> list[dict]:
    return generations.read_generations(str(shared_data / TAT_FILE)).to_pylist()


def _ent(text: str, label: str) -> dict:
    return {"text": text, "label": label, "start": None, "end": None}


def _write_parquet(path: Path, rows: list[dict], with_entities: bool = True) -> str:
    fields = [pa.field("sample_id", pa.string()), pa.field("caption", pa.string()),
              pa.field("generated_caption", pa.string())]
    if with_entities:
        fields += [pa.field("reference_entities", pa.list_(schema.ENTITY)),
                   pa.field("caption_entities", pa.list_(schema.ENTITY))]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return str(path)


SMALL_ROWS = [
    {"sample_id": "a", "caption": "Barack Obama speaks in Chicago on Monday.",
     "generated_caption": "Barack Obama at a rally in Chicago.",
     "reference_entities": [_ent("Barack Obama", "PERSON"), _ent("Chicago", "GPE"), _ent("Monday", "DATE")],
     "caption_entities": [_ent("Barack Obama", "PERSON"), _ent("Chicago", "GPE")]},
    {"sample_id": "b", "caption": "Angela Merkel and Emmanuel Macron met in Berlin.",
     "generated_caption": "Angela Merkel in Paris with Angela Merkel.",
     "reference_entities": [_ent("Angela Merkel", "PERSON"), _ent("Emmanuel Macron", "PERSON"), _ent("Berlin", "GPE")],
     "caption_entities": [_ent("Angela Merkel", "PERSON"), _ent("Paris", "GPE"), _ent("Angela Merkel", "PERSON")]},
    {"sample_id": "c", "caption": "Fans of the New York Yankees at the stadium.",
     "generated_caption": "The Yankees celebrate.",
     "reference_entities": [_ent("the New York Yankees", "ORG")], "caption_entities": [_ent("Yankees", "ORG")]},
    {"sample_id": "null-ref", "caption": None, "generated_caption": "Something.",
     "reference_entities": None, "caption_entities": None},
    {"sample_id": "empty-gen", "caption": "A reference.", "generated_caption": "  ",
     "reference_entities": [], "caption_entities": []},
    {"sample_id": "punct-ref", "caption": "“...”", "generated_caption": "A caption.",
     "reference_entities": [], "caption_entities": []},
]


# ---------------------------------------------------------------- preprocessing, importer


def test_preprocess_keeps_case_and_strips_punctuation():
    text = "Bess Wohl’s “Make Believe.” — at St. Paul's,  $5!\n(N.Y.)"
    assert metrics.preprocess(text) == "Bess Wohls Make Believe at St Pauls 5 NY"
    assert metrics.preprocess("Obama OBAMA obama") == "Obama OBAMA obama"


def test_iter_json_objects_reads_lines_and_pretty_printed():
    text = '{"a": 1}\n{"a": 2}' + json.dumps({"a": 3, "b": [1, 2]}, indent=2) + "\n\n"
    assert [o["a"] for o in generations.iter_json_objects(text)] == [1, 2, 3]
    with pytest.raises(ValueError, match="invalid JSON"):
        list(generations.iter_json_objects('{"a": 1} {"a": ', source="x.jsonl"))


def test_tat_importer_rows(tat_rows, shared_data):
    assert len(tat_rows) == 40
    ids = [r["sample_id"] for r in tat_rows]
    assert len(set(ids)) == 40 and ids[0].startswith("tat-000000-")
    again = generations.read_generations(str(shared_data / TAT_FILE)).column("sample_id").to_pylist()
    assert again == ids
    assert all(r["caption"] and r["generated_caption"] and r["article"] for r in tat_rows)
    assert tat_rows[0]["reference_entities"][0] == _ent("Alexa Skye Swinton", "PERSON")


# ---------------------------------------------------------------- entity rule


def test_tat_entity_rule_reproduces_published_counts(tat_rows):
    counts = metrics.pooled_entity_counts([r["reference_entities"] for r in tat_rows],
                                          [r["caption_entities"] for r in tat_rows])
    overall = metrics.entity_summary(counts)["all"]
    assert (overall["generated_matched"], overall["generated"]) == (27, 112)
    assert (overall["reference_matched"], overall["reference"]) == (26, 108)
    assert round(overall["precision"], 4) == 0.2411 and round(overall["recall"], 4) == 0.2407


def test_pooling_counts_mentions_with_duplicates_exact_case_and_label():
    ref = [[_ent("Angela Merkel", "PERSON"), _ent("Paris", "GPE")], [_ent("Apple", "ORG")]]
    gen = [[_ent("Angela Merkel", "PERSON"), _ent("Angela Merkel", "PERSON"), _ent("paris", "GPE")],
           [_ent("Apple", "PRODUCT")]]
    summary = metrics.entity_summary(metrics.pooled_entity_counts(ref, gen))
    assert (summary["all"]["generated_matched"], summary["all"]["generated"]) == (2, 4)
    assert (summary["all"]["reference_matched"], summary["all"]["reference"]) == (1, 3)
    assert summary["by_label"]["PERSON"]["precision"] == 1.0
    assert summary["by_label"]["ORG"]["recall"] == 0.0 and summary["by_label"]["ORG"]["precision"] is None
    assert summary["rare"] is None


def test_rare_entities_are_those_unseen_in_training():
    ref = [[_ent("Angela Merkel", "PERSON"), _ent("Zanele Muholi", "PERSON")]]
    gen = [[_ent("Zanele Muholi", "PERSON")]]
    rare = metrics.entity_summary(metrics.pooled_entity_counts(ref, gen, {"Angela Merkel"}))["rare"]
    assert (rare["reference_matched"], rare["reference"], rare["generated_matched"], rare["generated"]) == (1, 1, 1, 1)


# ---------------------------------------------------------------- text metrics


def test_text_metrics_equal_direct_pycocoevalcap(tat_rows):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, gens = [r["caption"] for r in tat_rows], [r["generated_caption"] for r in tat_rows]
    scores, unavailable = metrics.caption_scores(refs, gens, meteor=False)
    gts = {i: [metrics.preprocess(r)] for i, r in enumerate(refs)}
    res = {i: [metrics.preprocess(g)] for i, g in enumerate(gens)}
    assert scores["BLEU-4"] == Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    assert scores["ROUGE-L"] == Rouge().compute_score(gts, res)[0]
    assert scores["CIDEr"] == Cider().compute_score(gts, res)[0]
    assert scores["METEOR"] is None and "meteor=false" in unavailable["METEOR"]
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1


def test_meteor_unavailable_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    scores, unavailable = metrics.caption_scores(["Barack Obama in Chicago"], ["Obama in Chicago"])
    assert scores["METEOR"] is None and "java" in unavailable["METEOR"]
    assert scores["BLEU-1"] > 0


def test_meteor_failure_of_a_broken_java_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    scores, unavailable = metrics.caption_scores(["Barack Obama in Chicago"], ["Obama in Chicago"], meteor_timeout_s=30)
    assert scores["METEOR"] is None and unavailable["METEOR"].startswith("METEOR failed")


# ---------------------------------------------------------------- the job


def test_job_end_to_end_writes_report(tmp_path, capsys):
    data = _write_parquet(tmp_path / "captioned.parquet", SMALL_ROWS)
    out = tmp_path / "report"
    assert job.main(["--input", data, "--output", str(out)]) == 0
    assert sorted(os.listdir(out)) == list(job.REPORT_FILES)
    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["scored"] == 3 and report["rows"]["skipped"] == 3
    assert report["rows"]["distinct_generations"] == 3
    assert report["rows"]["skipped_by_reason"] == {
        "empty_reference": 1, "empty_generation": 1, "reference_without_words": 1}
    assert {e["sample_id"] for e in report["rows"]["skipped_examples"]} == {"null-ref", "empty-gen", "punct-ref"}
    assert 0 < report["metrics"]["METEOR"] < 1 and report["unavailable"] == {}
    assert report["metrics_x100"]["BLEU-4"] == pytest.approx(100 * report["metrics"]["BLEU-4"])
    assert report["entities"]["source"]["reference"].startswith("spaCy")
    assert report["entities"]["all"]["generated"] > 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| BLEU-4 |" in md and "| Entity recall |" in md
    assert "| CIDEr |" in capsys.readouterr().out


def test_distinct_generations_count_one_template_once(tmp_path):
    rows = [dict(r, generated_caption="Grace Liu  at a rally.") for r in SMALL_ROWS[:3]]
    report = evaluation.evaluate(evaluation.EvaluateConfig(input=_write_parquet(tmp_path / "c.parquet", rows),
                                                           output=str(tmp_path / "r"), meteor=False))
    assert report["rows"]["scored"] == 3 and report["rows"]["distinct_generations"] == 1
    assert "; 1 distinct generations." in evaluation.markdown_report(report)


def test_job_stored_entities_and_rare_recall(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java: the report says METEOR is unavailable
    data = _write_parquet(tmp_path / "captioned.parquet", SMALL_ROWS)
    train = _write_parquet(tmp_path / "train.parquet", [
        {"sample_id": "t", "caption": "Barack Obama and Angela Merkel.", "generated_caption": None,
         "reference_entities": [_ent("Barack Obama", "PERSON"), _ent("Angela Merkel", "PERSON")],
         "caption_entities": None}])
    out = tmp_path / "report"
    assert job.main(["--input", data, "--output", str(out), "--train-captions", train,
                     "--use-stored-entities"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["METEOR"] is None and "java" in report["unavailable"]["METEOR"]
    ent = report["entities"]
    assert ent["source"] == {"reference": "stored column 'reference_entities'",
                             "generated": "stored column 'caption_entities'"}
    # gen: Obama, Chicago | Merkel, Paris, Merkel | Yankees -> 4 of 6 matched
    # ref: Obama, Chicago, Monday | Merkel, Macron, Berlin | the New York Yankees -> 3 of 7 matched
    assert (ent["all"]["generated_matched"], ent["all"]["generated"]) == (4, 6)
    assert (ent["all"]["reference_matched"], ent["all"]["reference"]) == (3, 7)
    # rare = texts other than Barack Obama / Angela Merkel
    assert (ent["rare"]["reference_matched"], ent["rare"]["reference"]) == (1, 5)
    assert ent["train_captions"]["entity_texts"] == 2
    assert "n/a" in (out / "report.md").read_text()


def test_job_reads_tat_file_with_stored_entities(shared_data, tmp_path):
    cfg = job.EvaluateConfig(input=str(shared_data / TAT_FILE), output=str(tmp_path),
                             use_stored_entities=True, meteor=False)
    report = job.evaluate(cfg)
    # 38 distinct generations: some of the 40 Transform-and-Tell generations repeat a text word for word
    assert report["rows"] == {"total": 40, "scored": 40, "skipped": 0, "skipped_by_reason": {}, "skipped_examples": [],
                              "distinct_generations": 38}
    assert report["entities"]["all"]["precision"] == 27 / 112
    assert report["entities"]["all"]["recall"] == 26 / 108


def test_job_reads_and_writes_s3(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    local = _write_parquet(tmp_path / "x.parquet", SMALL_ROWS[:3], with_entities=False)
    storage.write_bytes_atomic("s3://eama-test/eval/in/part-0.parquet", Path(local).read_bytes())
    assert job.main(["--input", "s3://eama-test/eval/in", "--output", "s3://eama-test/eval/report"]) == 0
    report = storage.read_json("s3://eama-test/eval/report/report.json")
    assert report["rows"]["scored"] == 3
    assert storage.exists("s3://eama-test/eval/report/report.png")


def test_job_config_errors(tmp_path):
    with pytest.raises(SystemExit):
        job.main(["--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        job.main(["--input", "x", "--output", str(tmp_path), "ray_min_rows=many"])
    assert job.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 1


def test_yaml_defaults_match_config_dataclass():
    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "jobs" / "configs" / "evaluate.yaml"))
    assert yaml == dataclasses.asdict(job.EvaluateConfig())


# ---------------------------------------------------------------- Ray path


def test_ray_entity_extraction_matches_in_process(ray_local, tat_rows):
    texts = {"reference": [r["caption"] for r in tat_rows], "generated": [r["generated_caption"] for r in tat_rows]}
    local = metrics.tag_entities(texts, use_ray=False)
    on_ray = metrics.tag_entities(texts, use_ray=True, batch_size=16)
    assert on_ray == local
    counts = [metrics.entity_summary(metrics.pooled_entity_counts(e["reference"], e["generated"]))["all"]
              for e in (local, on_ray)]
    assert counts[0] == counts[1] and counts[0]["generated"] > 0
