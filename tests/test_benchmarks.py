"""What the benchmarks share: the "shown" rule, the refusal to average runs of different versions,
the provenance a result records, and the report that regenerates the docs' tables from the result
JSONs (mean ± std computed here by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_job
from eama.engine import benchmarks, config

PAGE = """# Benchmarks

Prose before, written by hand.

<!-- {name}:begin -->
an old table
<!-- {name}:end -->

Prose after, written by hand.
"""


def test_a_gain_is_shown_only_above_twice_the_seed_std_on_three_seeds():
    # gains 1.0, 1.2, 0.8: mean 1.0, std 0.2 -> shown
    gain = benchmarks.seed_gain({0: 2.0, 1: 2.2, 2: 1.8}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert (gain.mean, gain.n) == (pytest.approx(1.0), 3) and gain.std == pytest.approx(0.2)
    assert gain.shown and gain.verdict == "shown" and gain.cell() == "+100.00 ± 20.00 (n=3)"
    # gains 1, 2, 0: mean 1 is not above 2 x std (2)
    assert not benchmarks.seed_gain({0: 1.0, 1: 2.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0}).shown
    # a large, steady gain on two seeds is not enough
    assert not benchmarks.seed_gain({0: 5.0, 1: 5.1}, {0: 0.0, 1: 0.0}).shown
    # a loss is never shown
    assert not benchmarks.seed_gain({0: 0.0, 1: 0.0, 2: 0.0}, {0: 1.0, 1: 1.1, 2: 0.9}).shown
    # paired by seed: only the seeds both rows hold count
    paired = benchmarks.seed_gain({0: 1.0, 1: 1.0, 2: 1.0, 3: 9.0}, {0: 0.0, 1: 0.0, 2: 0.0, 7: 0.0})
    assert paired.n == 3 and paired.mean == pytest.approx(1.0) and paired.std == 0.0 and paired.shown
    assert benchmarks.seed_gain({0: 1.0}, {1: 1.0}) is None


def test_replace_block_changes_only_the_marked_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE.format(name="bench"))
    benchmarks.replace_block(str(page), "bench", "| a | b |\n|---|---|")
    text = page.read_text()
    assert text == PAGE.format(name="bench").replace("an old table", "| a | b |\n|---|---|")
    with pytest.raises(config.UserError, match="<!-- other:begin -->"):
        benchmarks.replace_block(str(page), "other", "x")
    page.write_text(PAGE.format(name="bench") + "<!-- bench:begin -->\n")  # a second begin marker
    with pytest.raises(config.UserError, match="needs one line"):
        benchmarks.replace_block(str(page), "bench", "x")


def provenance(seed: int, run: str, code: str = "c0de", **settings) -> dict:
    return {"commit": "abcdef1234567890", "dirty": False, "code": code, "packages": {}, "machine": {},
            "config": {"seed": seed, "run_name": run, "output": f"/runs/{run}", "lr": 5e-5, **settings}}


def test_versions_differ_by_code_or_settings_never_by_seed_or_run_paths():
    a = {"run": "r-s0", "provenance": provenance(0, "r-s0")}
    b = {"run": "r-s1", "provenance": provenance(1, "r-s1")}
    assert not benchmarks.mixed([a, b]) and benchmarks.check_versions("row", [a, b], False) == "abcdef1"
    other_code = {"run": "r-s2", "provenance": provenance(2, "r-s2", code="beef")}
    other_lr = {"run": "r-s3", "provenance": provenance(3, "r-s3", lr=1e-4)}
    old = {"run": "r-s4"}  # written before results recorded their provenance
    for odd in (other_code, other_lr, old):
        assert benchmarks.mixed([a, odd])
        with pytest.raises(config.UserError, match=f"row: refusing to average .*r-s0 \\(abcdef1\\), {odd['run']}"):
            benchmarks.check_versions("row", [a, odd], False)
    with pytest.raises(config.UserError, match="settings differ in lr"):
        benchmarks.check_versions("row", [a, other_lr], False)
    assert benchmarks.check_versions("row", [a, old], True) == "abcdef1, unknown †"
    assert benchmarks.check_versions("row", [old], False) == "unknown"  # one run averages nothing
    assert benchmarks.mixed([old, dict(old, run="r-s5")])  # two unknowns are not known to agree


def test_provenance_names_the_code_the_config_and_the_machine():
    prov = benchmarks.provenance({"seed": 3})
    assert prov["config"] == {"seed": 3} and "torch" in prov["packages"] and prov["machine"]["cpus"]
    assert prov["commit"] and len(prov["code"]) == 16 and isinstance(prov["dirty"], bool)


def mner_result(config_name: str, seed: int, text: float, view: float | None = None, code: str = "c0de") -> dict:
    run = f"minilm-twitter2017-{config_name}-s{seed}"
    test = {"text": {"f1": text}}
    if view is not None:
        test["caption"] = {"f1": view}
    return {"run": run, "dataset": "twitter2017", "config": config_name, "seed": seed, "encoder": "minilm",
            "train_seconds": 100.0, "dev": {"dev_f1": 0.8}, "test": test,
            "provenance": provenance(seed, run, code, view=config_name)}


def write_results(folder: Path, results: list[dict]) -> None:
    folder.mkdir(exist_ok=True)
    for r in results:
        (folder / f"{r['run']}.json").write_text(json.dumps(r))


def test_mner_report_writes_the_block_from_the_jsons(tmp_path, capsys):
    results = tmp_path / "benchmark_mner_test"
    rows = [mner_result("text", s, f) for s, f in enumerate([0.80, 0.82, 0.84])]
    rows += [mner_result("caption_cva", s, f, v) for s, (f, v) in enumerate([(0.83, 0.84), (0.86, 0.85), (0.86, 0.87)])]
    rows += [mner_result("caption_shuffled", s, f, f) for s, f in enumerate([0.82, 0.86, 0.83])]
    write_results(results, rows)
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE.format(name="benchmark_mner_test"))
    job = load_job("benchmark_mner")
    job.main(["report=true", f"results={results}", f"report_file={page}"])
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nProse before") and text.endswith("<!-- benchmark_mner_test:end -->\n\n"
                                                                          "Prose after, written by hand.\n")
    block = text.split("<!-- benchmark_mner_test:begin -->")[1].split("<!-- benchmark_mner_test:end -->")[0]
    assert "an old table" not in block and "report=true" in block and "(9 result files)" in block
    # text: 80, 82, 84 -> mean 82.00, sample std 2.00
    assert "| minilm | twitter2017 | text | 82.00 ± 2.00 (n=3) | - | 100 | 85.18 / - | - | abcdef1 |" in block
    # caption + CVA: 83, 86, 86 -> 85.00 ± sqrt(3) = 1.73; with the caption 84, 85, 87 -> 85.33 ± sqrt(7/3) = 1.53
    assert "| caption_cva | 85.00 ± 1.73 (n=3) | 85.33 ± 1.53 (n=3) |" in block
    assert "- minilm twitter2017 text: minilm-twitter2017-text-s0 (abcdef1) 80.00, minilm-twitter2017-text-s1 " \
           "(abcdef1) 82.00, minilm-twitter2017-text-s2 (abcdef1) 84.00" in block
    # gains over text 3, 4, 2: mean 3.00 > 2 x std 1.00 on 3 seeds -> shown
    assert "| caption + CVA: caption_cva vs text | +3.00 ± 1.00 (n=3) | shown |" in block
    # over the shuffled caption 1, 0, 3: mean 1.33, std sqrt(7/3) = 1.53 -> not shown
    assert "own caption vs another post's, same recipe): caption_cva vs caption_shuffled | +1.33 ± 1.53 (n=3) | " \
           "not shown |" in block
    assert block.strip() in capsys.readouterr().out

    # one seed from other code: refused in one line, exit 1, the page untouched
    write_results(results, [mner_result("text", 2, 0.84, code="beef")])
    with pytest.raises(SystemExit) as exit_info:
        config.main(job.main, ["report=true", f"results={results}", f"report_file={page}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: minilm twitter2017 text: refusing to average") and "mix_versions=true" in err
    assert page.read_text() == text
    job.main(["report=true", f"results={results}", f"report_file={page}", "mix_versions=true"])
    block = page.read_text().split("<!-- benchmark_mner_test:begin -->")[1]
    assert "mix_versions=true" in block and "| text | 82.00 ± 2.00 (n=3) | - | 100 | 85.18 / - | - | abcdef1 †" in block


def test_keyphrase_report_judges_each_ablation_by_the_rule(tmp_path):
    results = tmp_path / "benchmark_keyphrase"
    rows = []
    for name, f1s in (("joint", (0.30, 0.34, 0.32)), ("text", (0.28, 0.30, 0.31))):
        for seed, f1 in enumerate(f1s):
            run = f"minilm-{name}-s{seed}"
            scores = {"all": {"F1@1": f1, "F1@3": 0.2, "MAP@5": 0.3}, "present": {"F1@1": 0.5}, "absent": {"F1@1": 0.1}}
            rows.append({"run": run, "config": name, "seed": seed, "encoder": "minilm", "test": scores,
                         "train_seconds": 10.0, "joint_rank": "sum", "tag": "", "provenance": provenance(seed, run)})
    write_results(results, rows)
    page = tmp_path / "page.md"
    page.write_text(PAGE.format(name="benchmark_keyphrase"))
    load_job("benchmark_keyphrase").main(["report=true", f"results={results}", f"report_file={page}"])
    block = page.read_text()
    # joint: 30, 34, 32 -> 32.00 ± 2.00
    assert "| joint | minilm | 32.00 ± 2.00 (n=3) | 20.00 ± 0.00 (n=3) |" in block
    # gains 2, 4, 1: mean 2.33, std sqrt(7/3) = 1.53 -> not shown
    assert "| minilm | OCR + visual entities: joint vs text | +2.33 ± 1.53 (n=3) | not shown |" in block
