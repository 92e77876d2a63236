"""The MNER controls: each setting changes what it should and nothing else. Captions deranged for
ITA-Random (caption_shuffled), the emission layer at its own rate (text_emission_bgalr), BGA without
its generation losses (bga_no_gen), the samplers' keep budget and the keep rates in the metrics,
and ITA's schedule (text_ita_schedule)."""

from __future__ import annotations

import collections

import pyarrow.parquet as pq
import pytest
import torch

from eama.engine.training.metrics import StepStats, with_ratios
from eama.mner import benchmark, bga_training, tagger, training
from test_mner import conll_slice, numpy_rows


def test_derangement_moves_every_caption_and_keeps_the_multiset():
    values = ["a", "a", "b", "c", "d", None, None, "e", "f", "g"]  # two shared captions, two missing ones
    out = benchmark.derangement(values, seed=0)
    assert collections.Counter(out) == collections.Counter(values)
    assert all(o != v for o, v in zip(out, values))  # not even an equal caption stays in place
    assert out == benchmark.derangement(values, seed=0) and out != benchmark.derangement(values, seed=1)
    distinct = list(range(50))
    assert all(o != v for o, v in zip(benchmark.derangement(distinct, 7), distinct))


def test_caption_shuffled_data_gives_every_post_another_posts_caption(shared_data, tmp_path):
    real = shared_data / "mner" / "twitter2017"
    data = tmp_path / "data" / "twitter2017"
    data.mkdir(parents=True)
    for split, n in (("train", 40), ("valid", 20), ("test", 20)):
        conll_slice(real / f"{split}.txt", data / f"{split}.txt", n)
    (data / "blip2_captions.txt").write_bytes((real / "blip2_captions.txt").read_bytes())
    cfg = benchmark.BenchmarkConfig(data=str(tmp_path / "data"), output=str(tmp_path / "out"))
    plain = benchmark.import_dataset(cfg, "twitter2017")
    shuffled = benchmark.shuffled_dataset(cfg, "twitter2017", plain)
    for split in benchmark.SPLITS:
        before, after = pq.read_table(plain[split]).to_pylist(), pq.read_table(shuffled[split]).to_pylist()
        assert [(r["sample_id"], r["tokens"], r["tags"]) for r in before] == \
               [(r["sample_id"], r["tokens"], r["tags"]) for r in after]
        assert all(a["caption"] != b["caption"] for a, b in zip(after, before))  # no post keeps its own caption
        assert collections.Counter(r["caption"] for r in after) == collections.Counter(r["caption"] for r in before)
        # the same seeded derangement in every split, written once
        assert [r["caption"] for r in after] == benchmark.derangement([r["caption"] for r in before], cfg.shuffle_seed)
    assert benchmark.CONFIGS["caption_shuffled"] == benchmark.CONFIGS["caption_cva"]  # the same recipe otherwise


def test_control_configs_set_what_they_control():
    cfg = benchmark.BenchmarkConfig(epochs=5)
    schedule = benchmark.train_settings(cfg, "twitter2017", "text_ita_schedule")
    assert (schedule["epochs"], schedule["warmup_ratio"], schedule["view"]) == (10, 0.05, "text")
    assert benchmark.train_settings(cfg, "twitter2017", "text")["epochs"] == 5
    assert "warmup_ratio" not in benchmark.train_settings(cfg, "twitter2017", "caption_cva")  # today's: none
    no_gen = benchmark.train_settings(cfg, "twitter2017", "bga_no_gen")
    assert (no_gen["rec_weight"], no_gen["cycle_weight"], no_gen.get("bga_lr", training.MnerTrainConfig.bga_lr)) \
        == (0.0, 0.0, training.MnerTrainConfig.bga_lr)
    assert benchmark.train_settings(cfg, "twitter2017", "text_emission_bgalr")["emission_lr"] == \
        training.MnerTrainConfig.bga_lr
    with pytest.raises(SystemExit, match="unknown config 'nope'"):
        benchmark.train_settings(cfg, "twitter2017", "nope")


def lr_of(groups: list[dict], params) -> set[float]:
    ids = {id(p) for p in params}
    return {g["lr"] for g in groups if any(id(p) in ids for p in g["params"])}


def test_emission_lr_gives_the_emission_layer_its_own_rate_and_only_it():
    def groups(**settings) -> tuple[training.MnerTask, list[dict]]:
        task = training.MnerTask(training.MnerTrainConfig(train="unused", lr=5e-5, **settings), ["PER"])
        return task, task.build_model({}, "cpu", torch.float32).parameters

    task, default = groups()
    assert len(default) == 2 and lr_of(default, task.model.emission.parameters()) == {5e-5}  # today's groups
    task, apart = groups(emission_lr=1e-3)
    assert lr_of(apart, task.model.emission.parameters()) == {1e-3}
    assert lr_of(apart, task.model.encoder.parameters()) == {5e-5} and lr_of(apart, task.model.crf.parameters()) == {0.05}
    assert sum(len(g["params"]) for g in apart) == len(list(task.model.parameters()))
    for bad, why in (({"emission_lr": 1e-3, "method": "bga"}, "emission_lr is ITA's"),
                     ({"keep_budget": 1.0}, "keep_budget weighs BGA's samplers")):
        with pytest.raises(SystemExit, match=why):
            training.validate(training.MnerTrainConfig(train="unused", **bad))


class Engine:
    """The model called as the trainer's engine is (`engine(**inputs)`, `engine.module`)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)


ROWS = [{"sample_id": f"p{i}", "tokens": words.split(), "tags": tags.split(), "caption": caption,
         "ocr": None, "object_tags": None}
        for i, (words, tags, caption) in enumerate([
            ("Obama visits Paris today", "B-PER O B-LOC O", "a man in a suit waving"),
            ("we love New York", "O O B-LOC I-LOC", "a city skyline at night"),
            ("Merkel meets Macron", "B-PER O B-PER", "two people shaking hands"),
            ("nothing to see here", "O O O O", "a cat on a sofa")] * 2)]


def bga_task(**settings) -> tuple[bga_training.BgaTask, object]:
    cfg = training.MnerTrainConfig(train="unused", method="bga", vision="none", micro_batch_size=len(ROWS),
                                   max_length=32, proxy_tokens=8, real_visual_prob=1.0, lr=0.0, **settings)
    task = bga_training.BgaTask(cfg, ["LOC", "PER"])
    torch.manual_seed(0)
    parts = task.build_model({}, "cpu", torch.float32)
    return task, parts


def test_bga_without_generation_losses_trains_on_the_crf_alone():
    for settings in ({}, {"rec_weight": 0.0, "cycle_weight": 0.0}):
        task, _ = bga_task(**settings)
        task.model.eval()  # no dropout, samplers decide by score: both forward passes below agree
        torch.manual_seed(0)
        batch = task.collate(numpy_rows(ROWS))
        with torch.no_grad():
            _, row_loss, _ = task.loss(Engine(task.model), batch)
            emissions = task.model(**tagger.model_inputs(batch["text"]), **batch["visual"])
            nll = task.model.crf.nll(emissions, batch["gold"], batch["text"].word_mask)
        if settings:
            torch.testing.assert_close(row_loss, nll)
        else:
            assert bool((row_loss > nll + 1e-3).all())  # the generation losses add to every post with a caption


def keep_rate_after(steps: int, keep_budget: float) -> dict[str, float]:
    """Train BGA's new layers a few steps (encoder frozen at lr 0) and return the last step's keep
    rates as the metrics log them."""
    task, parts = bga_task(keep_budget=keep_budget, bga_lr=1e-2)
    optimizer = torch.optim.AdamW(parts.parameters)
    engine = Engine(task.model)
    for _ in range(steps):
        batch = task.collate(numpy_rows(ROWS))
        loss, row_loss, groups = task.loss(engine, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stats = StepStats(len(task.group_names))
    stats.add(loss, row_loss, groups, task.counts(batch))
    return {k: v for k, v in stats.reduce("cpu", 1, 1, task.group_names).items() if k.startswith("scs_keep/")}


def test_a_keep_budget_makes_the_samplers_drop_what_they_kept_and_the_metrics_show_it():
    free, budget = keep_rate_after(12, 0.0), keep_rate_after(12, 20.0)
    stages = [f"scs_keep/{m}/stage{s}" for m in ("text", "visual") for s in (1, 2)]
    assert sorted(free) == sorted(budget) == sorted(stages)  # every stage and modality, as a share
    assert all(0.0 <= v <= 1.0 for v in [*free.values(), *budget.values()])
    assert free["scs_keep/text/stage2"] > 0.5  # nothing pushes the samplers: they keep most of it
    mean = lambda rates: sum(rates.values()) / len(rates)  # noqa: E731
    assert mean(budget) < mean(free) - 0.2 and budget["scs_keep/text/stage2"] < free["scs_keep/text/stage2"], \
        (free, budget)


def test_ratio_counts_become_one_share_per_step():
    stats = StepStats(0)
    stats.add(torch.tensor(1.0), torch.zeros(0), None, {"words": 3, "kept:n": 2.0, "kept:d": 4.0, "none:n": 0.0,
                                                        "none:d": 0.0})
    stats.add(torch.tensor(1.0), torch.zeros(0), None, {"words": 5, "kept:n": 4.0, "kept:d": 4.0, "none:n": 0.0,
                                                        "none:d": 0.0})
    record = stats.reduce("cpu", 1, 2, ())
    assert (record["words"], record["kept"], record["none"]) == (8, 0.75, None)
    assert not any(k.endswith((":n", ":d")) for k in record)
    assert with_ratios({"a": 2.0}) == {"a": 2} and isinstance(with_ratios({"a": 2.0})["a"], int)
