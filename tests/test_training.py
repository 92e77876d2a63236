"""train_alignment: the loop's pieces alone, then real Ray Train + DeepSpeed (ZeRO-3, gloo, CPU)
runs of a tiny LLaVA: learning, 1 vs 2 worker equivalence, a killed worker, a relaunch, s3://;
and the engine's trainer with a second, non-MLLM task (a small classifier) under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from eama.engine import blobs, deepspeed_config, images, schema, storage
from eama.engine.training import launch
from eama.engine.training.checkpoints import TrainerState, rng_state, set_rng_state
from eama.engine.training.config import TrainerConfig, export_dir, run_dir, validate
from eama.engine.training.metrics import metrics_files, read_metrics, sync_metrics, write_metrics
from eama.engine.training.order import local_micro_batches, plan_steps, row_order, steps_per_epoch, training_dataset
from eama.engine.training.task import ModelParts, TrainingTask
from eama.news import alignment, alignment_training, demo, models

# ---------------------------------------------------------------- data


def task_rows(num_samples: int, seed: int) -> list[dict]:
    """Task rows of demo samples, built in-process by the job's own builder (no Ray needed)."""
    rows, _ = alignment.build_in_process(list(demo.generate_samples(num_samples, seed=seed)))
    return [{k: r[k] for k in schema.TASK.names} for r in rows]


def write_tasks(rows: list[dict], directory: Path, shards: int = 2) -> str:
    size = math.ceil(len(rows) / shards)
    for k in range(shards):
        storage.write_table_atomic(pa.Table.from_pylist(rows[k * size : (k + 1) * size], schema=schema.TASK),
                                   str(directory / f"part-{k:05d}.parquet"))
    return str(directory)


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


@pytest.fixture(scope="module")
def small_rows() -> list[dict]:
    return task_rows(16, seed=3)


# ---------------------------------------------------------------- pieces


def test_deepspeed_config_builder():
    cfg = deepspeed_config.build_config(zero_stage=3, micro_batch_size=4, grad_accum=2, world_size=8, lr=2e-5,
                                        param_persistence_threshold=0)
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"] == {"enabled": False} and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["optimizer"]["params"]["fused"] is True  # torch's one-pass AdamW, not the per-op update
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_gather_16bit_weights_on_model_save"] and "offload_optimizer" not in zero
    gpu = deepspeed_config.build_config(zero_stage=3, micro_batch_size=1, grad_accum=1, world_size=1, lr=1e-5,
                                        bf16=True, offload_optimizer=True, offload_params=True)
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert gpu["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with offload, nothing compiled
    with pytest.raises(ValueError):
        deepspeed_config.build_config(zero_stage=2, micro_batch_size=1, grad_accum=1, world_size=1, lr=1,
                                      offload_params=True)


def test_cosine_schedule_with_warmup():
    ratios = [deepspeed_config.lr_ratio(s, total_steps=100, warmup_steps=10, min_ratio=0.1) for s in range(100)]
    assert ratios[0] == pytest.approx(0.1) and ratios[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(ratios[10:], ratios[11:]))  # decays monotonically
    assert ratios[-1] == pytest.approx(0.1, abs=1e-3)
    assert deepspeed_config.warmup_steps_for(1000, 0.03) == 30


@pytest.mark.parametrize("shuffle,epochs,group", [(True, 2, 0), (False, 1, 0), (True, 2, 2)])
def test_workers_reading_the_data_themselves_get_ray_datas_order(shuffle, epochs, group, tmp_path, ray_local):
    """data_loading=local hands every rank the micro-batches the Ray Data streaming split would:
    the seeded per-epoch order (also grouped by length), micro-batch j to rank j % world, resume
    by skipping."""
    import pyarrow.parquet as pq

    ids = [f"row-{i:03d}" for i in range(38)]
    words = [" ".join(["w"] * (1 + (7 * i) % 23)) for i in range(38)]
    for k in range(2):
        part = slice(k * 19, (k + 1) * 19)
        pq.write_table(pa.table({"sample_id": ids[part], "x": list(range(38))[part], "text": words[part]}),
                       tmp_path / f"part-{k}.parquet")
    files = sorted(str(p) for p in tmp_path.glob("part-*.parquet"))
    cfg = TrainerConfig(micro_batch_size=4, epochs=epochs, seed=3, shuffle=shuffle, group_by_length=group)
    order = row_order(cfg, 38, ["sample_id"], ["text"])
    import ray.data

    context = ray.data.DataContext.get_current()
    kept = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # as the trainer's ingest options set it
    try:
        streamed = [list(b["sample_id"]) for b in training_dataset(files, cfg, 38, order).iter_batches(
            batch_size=4, batch_format="numpy", drop_last=True)]
    finally:
        context.execution_options.preserve_order = kept
    assert len(set(sum(streamed[:9], []))) == 36  # the first epoch: 36 distinct rows
    for world in (1, 2):
        cfg.num_workers = world
        per_rank = plan_steps(38, cfg).micro_batches_per_rank
        ranks = [[list(b["sample_id"]) for b in local_micro_batches(files, cfg, order, None, r, world,
                                                                             per_rank, skip=0)] for r in range(world)]
        assert all(len(r) == per_rank for r in ranks)
        assert [ranks[j % world][j // world] for j in range(world * per_rank)] == streamed[:world * per_rank]
        resumed = local_micro_batches(files, cfg, order, None, 0, world, per_rank, skip=2)
        assert [list(b["sample_id"]) for b in resumed] == ranks[0][2:]


def test_group_by_length_cuts_padding_and_keeps_every_row(tmp_path):
    """Grouped micro-batches hold rows of similar length: padding to each batch's longest row
    costs a few percent instead of ~60% for random batches of uniform lengths 1-60; every epoch
    still sees every row once, and each seed and epoch gives another order."""
    import random

    import pyarrow.parquet as pq

    rng = random.Random(7)
    lengths = {f"post-{i:03d}": rng.randint(1, 60) for i in range(400)}
    pq.write_table(pa.table({"sample_id": list(lengths), "tokens": [["t"] * n for n in lengths.values()]}),
                   tmp_path / "part-0.parquet")
    files = [str(tmp_path / "part-0.parquet")]

    def batches(group: int, seed: int) -> list[list[str]]:
        cfg = TrainerConfig(micro_batch_size=4, epochs=2, seed=seed, group_by_length=group, num_workers=1)
        order = row_order(cfg, 400, ["sample_id"], ["tokens"])
        return [list(b["sample_id"]) for b in local_micro_batches(files, cfg, order, None, 0, 1, 200, 0)]

    def padding(bs: list[list[str]]) -> float:
        return sum(4 * max(lengths[i] for i in b) for b in bs) / sum(lengths[i] for b in bs for i in b)

    grouped, plain = batches(50, 0), batches(0, 0)
    assert padding(grouped) < 1.1 and padding(plain) > 1.4
    for epoch in (grouped[:100], grouped[100:]):
        assert sorted(sum(epoch, [])) == sorted(lengths)
    assert grouped[:100] != grouped[100:] and batches(50, 1)[:100] != grouped[:100]
    with pytest.raises(SystemExit, match="length_columns"):
        row_order(TrainerConfig(group_by_length=50), 400, ["sample_id"], [])
    with pytest.raises(SystemExit, match="shuffle"):
        validate(TrainerConfig(group_by_length=50, shuffle=False))


def test_task_weights_and_step_plan():
    assert alignment_training.parse_task_weights("captioning=0.5") == {
        "sentence_selection": 1.0, "entity_selection": 1.0, "captioning": 0.5}
    with pytest.raises(ValueError):
        alignment_training.parse_task_weights("captions=1")
    one = plan_steps(101, alignment_training.TrainConfig(num_workers=1, micro_batch_size=2, grad_accum=2))
    two = plan_steps(101, alignment_training.TrainConfig(num_workers=2, micro_batch_size=2, grad_accum=1))
    assert one.total_steps == two.total_steps == 25 and one.rows_per_step == two.rows_per_step == 4


def jpeg(color: str) -> bytes:
    """A small one-colour JPEG, as build_alignment_data stores images."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


def hand_rows() -> list[dict]:
    """One hand-written row of each task, of very different lengths (so the batch is padded)."""
    return [
        {"task": "sentence_selection", "sample_id": "hand-a", "image": jpeg("red"), "weight": 1.0, "target": "1",
         "prompt": "Article:\n[1] Maria Gonzalez spoke in Paris.\n[2] It rained.\n\nWhich numbered sentences name a person?"},
        {"task": "entity_selection", "sample_id": "hand-b", "image": jpeg("blue"), "weight": 1.0,
         "prompt": "Entities: Maria Gonzalez; Paris; Monday\n\nWhich entities belong in the caption?",
         "target": "Maria Gonzalez; Paris"},
        {"task": "captioning", "sample_id": "hand-c", "image": jpeg("green"), "weight": 1.0,
         "prompt": "Write the news caption of this image.", "target": "Maria Gonzalez speaks in Paris."},
    ]


def test_collator_joins_images_stored_once(tmp_path):
    """Rows whose image is null (build_alignment_data's layout) get theirs from the _images folder
    by sample_id: the same pixels as the same rows written with their images inline."""
    lm = models.load_model("tiny-llava", for_training=True)
    inline = hand_rows() + [dict(hand_rows()[0], task="captioning", target="It rained.")]  # hand-a twice
    blobs.write_blobs([{"sample_id": r["sample_id"], "image": r["image"]} for r in inline], schema.TASK_IMAGE,
                      str(tmp_path / "_images" / "part-0.parquet"))
    weights = alignment_training.parse_task_weights("")
    stored = alignment_training.Collator(lm, weights, blobs.BlobTable(str(tmp_path / "_images")))
    joined = stored(as_batch([dict(r, image=None) for r in inline]))
    expected = alignment_training.Collator(lm, weights)(as_batch(inline))
    assert torch.equal(joined.inputs["pixel_values"], expected.inputs["pixel_values"])
    assert not torch.equal(joined.inputs["pixel_values"][0], joined.inputs["pixel_values"][1])  # red vs blue
    with pytest.raises(blobs.MissingBlob, match="hand-z"):
        stored(as_batch([dict(inline[0], sample_id="hand-z", image=None)]))
    with pytest.raises(blobs.MissingBlob, match="no blob folder"):
        alignment_training.Collator(lm, weights)(as_batch([dict(inline[0], image=None)]))


# What each family's model reads for a row: literal chat layout, image slots, target and eos.
EXPECTED_TEXT = {
    "tiny-llava": lambda r: "<s>USER: " + "<image>" * 16 + "\n" + r["prompt"] + " ASSISTANT: " + r["target"] + "</s>",
    "tiny-instructblip": lambda r: "<image>" * 4 + "<s>" + r["prompt"] + "\nAnswer: " + r["target"] + "</s>",
}
QUERY_TOKENS = {"tiny-llava": 0, "tiny-instructblip": 4}  # InstructBLIP's query tokens come before the padding


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-instructblip"])
def test_collator_labels_only_the_target(family):
    lm = models.load_model(family, for_training=True)
    tok = lm.tokenizer
    rows = hand_rows()
    weights = alignment_training.parse_task_weights("captioning=0.5")
    batch = alignment_training.Collator(lm, weights)(as_batch(rows))
    ids, labels, mask = batch.inputs["input_ids"], batch.labels, batch.inputs["attention_mask"]
    width, q = ids.shape[1], QUERY_TOKENS[family]
    for i, r in enumerate(rows):
        real = int(mask[i].sum())
        # query tokens (InstructBLIP), then left padding, then the row's text
        assert mask[i].tolist() == [1] * q + [0] * (width - real) + [1] * (real - q)
        assert tok.decode(ids[i][mask[i].bool()]) == EXPECTED_TEXT[family](r)
        # labels: the answer's own tokens (" target" + eos) at the very end, IGNORE everywhere else
        answer = tok(" " + r["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[i].tolist() == [alignment_training.IGNORE] * (width - len(answer)) + answer
    assert batch.target_tokens == sum(len(tok(" " + r["target"], add_special_tokens=False)["input_ids"]) + 1
                                      for r in rows)
    assert batch.weights.tolist() == [1.0, 1.0, 0.5]
    loss, per_row = alignment_training.forward_loss(lm.model, batch, micro_batch_size=3)
    assert loss.requires_grad and per_row.shape == (3,) and math.isclose(float(loss), float(
        (per_row * batch.weights).sum() / 3), rel_tol=1e-5)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-instructblip"])
def test_loss_does_not_depend_on_how_rows_are_split(family, small_rows):
    """Two half batches (two ranks or two accumulation steps) average to the whole batch's loss."""
    lm = models.load_model(family)
    col = alignment_training.Collator(lm, alignment_training.parse_task_weights("entity_selection=2"))
    rows = small_rows[:4]
    with torch.no_grad():
        whole = alignment_training.forward_loss(lm.model, col(as_batch(rows)), 4)[0]
        halves = [alignment_training.forward_loss(lm.model, col(as_batch(rows[k : k + 2])), 2)[0] for k in (0, 2)]
    assert float(whole) == pytest.approx(float(sum(halves) / 2), rel=1e-5)


def sharpen_attention(model: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale the language model's query and key projections, so attention (and with it the loss)
    depends strongly on positions; a randomly initialised tiny model barely notices them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)


# the module whose generate() runs the text, looked up here independently of the trainer's code
GENERATING_MODULE = {"tiny-llava": lambda m: m, "tiny-instructblip": lambda m: m.language_model}


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-instructblip"])
def test_padded_rows_train_at_the_positions_they_are_generated_at(family):
    """A row in a left-padded batch has the loss it has alone (no padding), and the batch's
    position ids are those generate() gives the same inputs. Without them InstructBLIP's text sat
    as many positions after its query tokens as the row had padding."""
    lm = models.load_model(family)
    sharpen_attention(lm.model)
    col = alignment_training.Collator(lm, alignment_training.parse_task_weights(""))
    rows = hand_rows()
    batch = col(as_batch(rows))
    assert not batch.inputs["attention_mask"].all()  # the short rows are padded
    with torch.no_grad():
        padded = alignment_training.forward_loss(lm.model, batch, len(rows))[1]
        alone = [float(alignment_training.forward_loss(lm.model, col(as_batch([r])), 1)[1][0]) for r in rows]
    assert padded.tolist() == pytest.approx(alone, rel=1e-5)

    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        if not seen:
            seen.append(kwargs["position_ids"])

    hook = GENERATING_MODULE[family](lm.model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
        lm.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert "position_ids" in batch.inputs, "the collator passes no position ids: the model counts over the padding"
    assert torch.equal(batch.inputs["position_ids"], seen[0])


def test_load_for_training_with_gradient_checkpointing(small_rows):
    cfg = alignment_training.TrainConfig(zero_stage=2, gradient_checkpointing=True)
    ds_config = deepspeed_config.build_config(zero_stage=2, micro_batch_size=2, grad_accum=1, world_size=1, lr=1e-3)
    lm, handle = alignment_training.load_for_training(cfg, ds_config)
    assert handle is None and lm.model.is_gradient_checkpointing and lm.model.training
    collate = alignment_training.Collator(lm, alignment_training.parse_task_weights(""))
    loss, _ = alignment_training.forward_loss(lm.model, collate(as_batch(small_rows[:2])), 2)
    loss.backward()
    assert lm.model.lm_head.weight.grad is not None
    assert all(p.grad is None for n, p in lm.model.named_parameters() if ".vision_tower." in n)


def test_freeze_vision_tower():
    lm = models.load_model("tiny-llava", for_training=True)
    assert alignment_training.freeze(lm.model, alignment_training.VISION_MODULES) == ["model.vision_tower"]
    frozen = {n for n, p in lm.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".vision_tower." in n for n in frozen)
    assert any(p.requires_grad for n, p in lm.model.named_parameters() if "multi_modal_projector" in n)


# ---------------------------------------------------------------- real runs


def fit(tmp: Path, **overrides) -> tuple[alignment_training.TrainConfig, list[dict], object]:
    cfg = alignment_training.TrainConfig(**{"output": str(tmp / "runs"), "num_workers": 2, "cpus_per_worker": 0.5,
                                            "zero_stage": 3, "param_persistence_threshold": 0, "lr": 1e-3,
                                            "warmup_ratio": 0.1, "keep_checkpoints": 2, **overrides})
    result = alignment_training.fit(cfg)
    assert result.error is None, result.error
    return cfg, alignment_training.read_metrics(alignment_training.run_dir(cfg)), result


@pytest.fixture(scope="module")
def small_tasks(tmp_path_factory, small_rows) -> str:
    return write_tasks(small_rows, tmp_path_factory.mktemp("tasks_small"))


@pytest.mark.slow
def test_two_workers_zero3_learn_the_demo_and_export(tmp_path, ray_local):
    """Loss falls clearly, and the exported model answers held-out selection questions better than
    the untrained one."""
    rows = task_rows(96, seed=0)
    data = write_tasks(rows, tmp_path / "tasks")
    held_out = [r for r in task_rows(24, seed=99) if r["task"] != "captioning"]
    cfg, history, result = fit(tmp_path, data=data, run_name="learn", micro_batch_size=4, epochs=7,
                               max_steps=240, lr=5e-3, warmup_ratio=0.05, checkpoint_every=120,
                               param_persistence_threshold=-1)
    losses = [r["loss"] for r in history]
    assert len(losses) == 240 and history[-1]["step"] == 240
    assert np.mean(losses[-10:]) < 0.35 * np.mean(losses[:3])
    for task in schema.TASK_NAMES:
        first = next(r[f"loss/{task}"] for r in history if r[f"loss/{task}"] is not None)
        assert np.mean([r[f"loss/{task}"] for r in history[-20:] if r[f"loss/{task}"] is not None]) < 0.5 * first
    assert all(r["tokens_per_s"] > 0 for r in history)
    # every step holds 2 workers x 4 rows, and the first epoch's steps hold every row exactly once
    assert all(sum(r[f"rows/{t}"] for t in schema.TASK_NAMES) == 8 for r in history)
    assert len(rows) % 8 == 0 and len(rows) // 8 < len(history)
    first_epoch = history[: len(rows) // 8]
    for task in schema.TASK_NAMES:
        assert sum(r[f"rows/{task}"] for r in first_epoch) == sum(x["task"] == task for x in rows), task
    assert storage.exists(storage.join(alignment_training.run_dir(cfg), "loss_curves.png"))

    trained = models.load_model(alignment_training.export_dir(cfg))
    untrained = models.load_model("tiny-llava")
    after = alignment_training.selection_scores(trained, held_out)
    before = alignment_training.selection_scores(untrained, held_out)
    print("selection before", json.dumps(before), "after", json.dumps(after))
    for task in ("sentence_selection", "entity_selection"):
        assert after[task]["f1"] > before[task]["f1"] + 0.05, (task, before, after)
        assert after[task]["accuracy"] >= before[task]["accuracy"]
    # the export generates what its own forward pass picks greedily, token by token (no cache)
    inputs = models.encode(trained, [f"USER: <image>\n{held_out[0]['prompt']} ASSISTANT:"],
                           [images.load_rgb(held_out[0]["image"])])
    out = trained.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    prompt_ids, picked = inputs["input_ids"], []
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([prompt_ids, torch.tensor([picked], dtype=prompt_ids.dtype)], 1)
            logits = trained.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   pixel_values=inputs["pixel_values"]).logits
            picked.append(int(logits[0, -1].argmax()))
            if picked[-1] == trained.tokenizer.eos_token_id:
                break
    assert out[0, : prompt_ids.shape[1]].tolist() == prompt_ids[0].tolist()
    assert out[0, prompt_ids.shape[1]:].tolist() == picked


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_tasks, ray_local):
    """1 worker, 2 accumulation steps of 2 rows: the curve the 2-worker runs must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    return fit(tmp, data=small_tasks, run_name="ref", num_workers=1, cpus_per_worker=1.0, micro_batch_size=2,
               grad_accum=2, max_steps=8, checkpoint_every=100, export=False)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, small_tasks, ray_local):
    """2 workers x 2 rows on s3://, rank 1 killed after step 5 (checkpoints every 3 steps), fed by
    Ray Data's streaming split (the reference run's workers read the data themselves)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    marker = tmp / "killed.txt"
    cfg, history, result = fit(tmp, data=small_tasks, output="s3://eama-test/train-runs", run_name="killed",
                               micro_batch_size=2, grad_accum=1, max_steps=8, checkpoint_every=3,
                               fail_at_step=5, fail_rank=1, fail_marker=str(marker), max_failures=2,
                               data_loading="stream")
    return cfg, history, result, marker


@pytest.mark.slow
def test_one_and_two_workers_follow_the_same_curve(reference_run, interrupted_run):
    _, ref, _ = reference_run
    _, two, _, _ = interrupted_run
    assert [r["step"] for r in ref] == [r["step"] for r in two] == list(range(1, 9))
    print("1 vs 2 workers, max |loss difference|:", max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, two)))
    for a, b in zip(ref, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3, abs=2e-3), (a["step"], a["loss"], b["loss"])
        for task in schema.TASK_NAMES:
            assert a[f"rows/{task}"] == b[f"rows/{task}"]  # the same rows in every global step
    assert ref[-1]["loss"] < ref[0]["loss"]


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint_on_s3(interrupted_run):
    cfg, history, result, marker = interrupted_run
    assert marker.exists()  # rank 1 really died once
    assert history[-1]["step"] == 8
    assert [r["attempt"] for r in history] == [1, 1, 1, 2, 2, 2, 2, 2]  # steps 4-8 redone after the restart
    fs = storage.filesystem(cfg.output)
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(storage.strip(alignment_training.run_dir(cfg)))
                  if p.rsplit("/", 1)[-1].startswith("checkpoint-"))
    assert kept == ["checkpoint-00000006", "checkpoint-00000008"]  # keep-last-2 on S3
    assert result.checkpoint.path.endswith("checkpoint-00000008")
    lm = models.load_model(alignment_training.export_dir(cfg))  # the export round-trips through s3://
    row = task_rows(1, seed=11)[0]
    answer = models.generate_text(lm, [row["prompt"]], [images.load_rgb(row["image"])], 6)
    assert isinstance(answer[0], str)


@pytest.mark.slow
def test_relaunch_with_the_same_run_name_resumes(interrupted_run, small_tasks):
    cfg, before, _, _ = interrupted_run
    again = dataclasses.replace(cfg, max_steps=10, fail_at_step=0, export=False)
    result = alignment_training.fit(again)
    assert result.error is None
    after = alignment_training.read_metrics(alignment_training.run_dir(again))
    assert [r["step"] for r in after] == list(range(1, 11))
    assert after[:8] == before  # the history came back from the checkpoint
    assert all(r["attempt"] == 3 for r in after[8:])  # started from checkpoint 8, not from scratch
    assert result.checkpoint.path.endswith("checkpoint-00000010")


# ---------------------------------------------------------------- a second task on the engine


def toy_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8 features; the label is whether a fixed linear score is positive (learnable, about balanced)."""
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return x, (x @ (np.linspace(-1, 1, 8, dtype=np.float32) + 0.3) > 0).astype(np.int64)


@dataclasses.dataclass
class ToyConfig(TrainerConfig):
    data: str = ""


class ToyClassifierTask(TrainingTask):
    """A small encoder-style classifier (plain torch, no Hugging Face): the engine's second task."""

    sort_columns = ("row_id",)
    columns = ("row_id", "x", "y")
    length_columns = ("x", "caption")  # no caption column in the data: group_by_length leaves it out
    group_names = ("negative", "positive")
    title = "toy classifier"

    def data_files(self):
        files = storage.list_files(self.config.data)
        return files, sum(storage.parquet_num_rows(f) for f in files)

    def build_model(self, ds_config, device, dtype):
        torch.manual_seed(self.config.seed)
        self.device = device
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        return ModelParts(model.to(device, dtype))

    def collate(self, rows):
        x, y = np.stack(rows["x"]).astype(np.float32), rows["y"].astype(np.int64)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def loss(self, engine, batch):
        x, y = batch
        per_row = torch.nn.functional.cross_entropy(engine(x), y, reduction="none")
        return per_row.sum() / self.config.micro_batch_size, per_row.detach(), y

    def counts(self, batch):
        return {"examples": len(batch[1])}

    def save_export(self, module, state_dict, directory):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(directory, "model.safetensors"))

    def evaluate(self, engine, step):
        x, y = toy_rows(128, seed=1)  # held out; every rank runs the same forward (ZeRO-3 needs them all)
        return {"accuracy": float((engine(torch.from_numpy(x).to(self.device)).argmax(1).cpu().numpy() == y).mean())}


def write_toy(tmp_path: Path, n: int = 256) -> str:
    """The toy task's rows (seed 0) as one Parquet file; returns its folder."""
    x, y = toy_rows(n, seed=0)
    storage.write_table_atomic(pa.table({"row_id": [f"r{i}" for i in range(n)], "x": list(x), "y": y}),
                               str(tmp_path / "toy" / "part-00000.parquet"))
    return str(tmp_path / "toy")


def toy_export(cfg: ToyConfig) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(export_dir(cfg), "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_engine_trains_a_small_classifier_task(zero_stage, tmp_path, ray_local, caplog):
    import ray.cloudpickle
    from safetensors.torch import load_file

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    cfg = ToyConfig(data=write_toy(tmp_path), output=str(tmp_path / "runs"), run_name=f"toy-zero{zero_stage}",
                    num_workers=2, zero_stage=zero_stage, param_persistence_threshold=0, micro_batch_size=8,
                    epochs=3, lr=1e-2, warmup_ratio=0.05, checkpoint_every=100, eval_every=16,
                    group_by_length=2 if zero_stage == 2 else 0)
    caplog.set_level(logging.INFO, logger="eama.trainer")
    result = launch.fit(ToyClassifierTask(cfg))
    assert result.error is None, result.error

    history = read_metrics(run_dir(cfg))
    losses = [r["loss"] for r in history]
    assert [r["step"] for r in history] == list(range(1, 49))  # 256 rows x 3 epochs / (2 x 8)
    assert np.mean(losses[-5:]) < 0.5 * losses[0], (losses[0], losses[-5:])
    assert all(r["examples"] == 16 and r["rows/negative"] + r["rows/positive"] == 16 for r in history)
    assert [r["step"] for r in history if "eval/accuracy" in r] == [16, 32, 48]
    assert history[-1]["eval/accuracy"] > 0.85
    assert storage.exists(storage.join(run_dir(cfg), "loss_curves.png"))
    assert result.checkpoint.path.endswith("checkpoint-00000048")

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    model.load_state_dict(load_file(os.path.join(export_dir(cfg), "model.safetensors")))  # gathered whole
    xt, yt = toy_rows(128, seed=1)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean()
    assert accuracy == pytest.approx(history[-1]["eval/accuracy"], abs=1 / 128)
    info = json.loads(Path(export_dir(cfg), "eama_export.json").read_text())
    assert (info["zero_stage"], info["world_size"], info["step"]) == (zero_stage, 2, 48)

    lines = caplog.messages  # rank 0's lines, relayed to the driver
    if zero_stage == 2:  # 256 rows in buckets of 2 global micro-batches (2 x 8 rows) or fewer: 8 buckets
        assert "group_by_length: rows sorted by x inside 8 random buckets per epoch" in lines, lines
    assert any(m.startswith("step ") and "ETA" in m and "s/step" in m for m in lines), lines
    assert any("engine ready" in m for m in lines) and any("model loaded" in m for m in lines)
    assert any(m.startswith("step 48/48") for m in lines) and any("exported" in m for m in lines)
    if zero_stage == 2:
        same_steps_in_one_process(cfg, history)


def same_steps_in_one_process(on_ray: ToyConfig, want: list[dict]) -> None:
    """launcher=local (one process, torch AdamW, no Ray or DeepSpeed) with the same settings takes
    the steps of the 2 Ray Train workers under ZeRO-2: the same rows per step, the same losses,
    learning rates and evaluations, the same exported weights up to float rounding."""
    here = dataclasses.replace(on_ray, run_name="toy-local", launcher="local")
    assert launch.fit(ToyClassifierTask(here)).error is None
    got = read_metrics(run_dir(here))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert all(r["examples"] == 16 for r in got)
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4)
    np.testing.assert_allclose([r["lr"] for r in got], [r["lr"] for r in want], rtol=1e-9)
    assert [r.get("eval/accuracy") for r in got] == [r.get("eval/accuracy") for r in want]
    for name, tensor in toy_export(on_ray).items():
        torch.testing.assert_close(toy_export(here)[name], tensor, rtol=1e-4, atol=1e-5)
    info = json.loads(Path(export_dir(here), "eama_export.json").read_text())
    assert (info["launcher"], info["zero_stage"], info["world_size"]) == ("local", None, 1)


def test_per_epoch_steps_end_on_the_runs_last_step():
    """4,870 rows x 4 epochs in micro-batches of 16 make 1,217 steps (the epochs' tail rows carry
    over): an epoch is 305 steps, so the fourth per-epoch evaluation is the final step's, not a
    second evaluation one step after the fourth."""
    cfg = TrainerConfig(epochs=4, micro_batch_size=16, num_workers=1)
    assert plan_steps(4870, cfg).total_steps == 1217
    assert steps_per_epoch(4870, cfg) == 305
    cfg2 = TrainerConfig(epochs=2, micro_batch_size=16, num_workers=2)
    assert steps_per_epoch(640, cfg2) == 20  # 640 x 2 / 2 workers / 16 = 40 steps, 20 an epoch


# ---------------------------------------------------------------- the local launcher


def test_local_launcher_resumes_after_a_crash(tmp_path):
    """A local run that dies after step 20 (checkpoints every 8 steps) resumes from step 16 when
    relaunched under the same name and ends with the weights and losses of a run never stopped."""
    import subprocess

    common = dict(data=write_toy(tmp_path), output=str(tmp_path / "runs"), launcher="local", num_workers=1,
                  micro_batch_size=8, epochs=2, lr=1e-2, warmup_ratio=0.1, checkpoint_every=8, keep_checkpoints=2)
    whole = ToyConfig(run_name="whole", **common)
    assert launch.fit(ToyClassifierTask(whole)).error is None

    marker = tmp_path / "failed"
    broken = dict(common, run_name="broken", fail_at_step=20, fail_marker=str(marker))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_training import ToyClassifierTask, ToyConfig\nfrom eama.engine.training import launch\n"
            f"launch.fit(ToyClassifierTask(ToyConfig(**{broken!r})))\n")
    died = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert died.returncode == 1 and marker.read_text().startswith("rank 0 exited after step 20"), died.stderr[-2000:]
    cfg = ToyConfig(**broken)
    result = launch.fit(ToyClassifierTask(cfg))  # the marker exists: no second failure
    assert result.error is None and result.checkpoint.path.endswith("checkpoint-00000064")
    kept = sorted(p.name for p in Path(run_dir(cfg), "local-checkpoints").iterdir())
    assert kept == ["checkpoint-00000056", "checkpoint-00000064"]

    want, got = read_metrics(run_dir(whole)), read_metrics(run_dir(cfg))
    assert [r["step"] for r in got] == list(range(1, 65))  # 256 x 2 / 8, each step once
    assert {r["attempt"] for r in got[:16]} == {1} and {r["attempt"] for r in got[16:]} == {2}
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    for name, tensor in toy_export(whole).items():
        assert torch.equal(toy_export(cfg)[name], tensor), name


def test_launcher_settings_are_checked():
    with pytest.raises(SystemExit, match="launcher must be one of ray, local, got 'slurm'"):
        validate(ToyConfig(launcher="slurm"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            launch.fit(ToyClassifierTask(ToyConfig(launcher="local", use_gpu=True, data="unused")))


# ---------------------------------------------------------------- the trainer's storage: export pointer, resume plan, metrics files


def s3_or_local(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A run folder on local disk, or (where='s3') on the moto S3 server under a fresh prefix."""
    if where == "local":
        return str(tmp_path / "runs" / "r")
    request.getfixturevalue("s3_server")
    return f"s3://eama-test/storage-{tmp_path.name}/r"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_crash_mid_export_leaves_readers_a_complete_export(where, tmp_path, request):
    """Readers (models.load_model of RUN/export) see a legacy plain export folder, then the export the
    pointer names: a half-written export-<step> folder (a crash before the pointer switch) is never
    loaded; the switch makes them load the new one, and the older folders go only after it."""
    from eama.engine import exports

    run = s3_or_local(where, tmp_path, request)
    lm = models.load_model("tiny-llava")
    folders = {}
    for name, shift in (("old", 0.0), ("new", 1.0)):
        with torch.no_grad():
            lm.model.lm_head.weight.add_(shift)
        folders[name] = str(tmp_path / name)
        lm.model.save_pretrained(folders[name])
        lm.processor.save_pretrained(folders[name])
    weights = {k: models.load_model(v).model.lm_head.weight for k, v in folders.items()}

    def loaded(path: str) -> str:
        w = models.load_model(path).model.lm_head.weight
        return next(k for k, v in weights.items() if torch.equal(v, w))

    def export_folders() -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in storage.filesystem(run).ls(storage.strip(run))
                      if exports.FOLDER.fullmatch(p.rstrip("/").rsplit("/", 1)[-1]))

    exports.upload_dir(folders["old"], storage.join(run, "export"))  # a run written before the pointer
    assert exports.resolve_export(storage.join(run, "export")) == storage.join(run, "export")
    assert loaded(storage.join(run, "export")) == "old"

    first = exports.publish_export(folders["old"], run, 4)
    assert exports.resolve_export(storage.join(run, "export")) == exports.resolve_export(run) == first
    assert storage.read_json(storage.join(run, "export.json")) == {"export": first.rsplit("/", 1)[-1], "step": 4}
    if where == "s3":  # the legacy folder went once the pointer was there; locally it became the link
        assert not storage.exists(storage.join(run, "export", "config.json"))
    else:
        assert os.readlink(os.path.join(run, "export")) == os.path.basename(first)

    # a crash halfway through the next export: some files of export-<step> written, the pointer not switched
    half = storage.join(run, "export-00000008-0badf00d")
    storage.write_bytes_atomic(storage.join(half, "config.json"), Path(folders["new"], "config.json").read_bytes())
    assert loaded(storage.join(run, "export")) == "old" and loaded(run) == "old"
    assert exports.export_exists(storage.join(run, "export"))

    second = exports.publish_export(folders["new"], run, 8)
    assert loaded(storage.join(run, "export")) == "new"
    assert export_folders() == [second.rsplit("/", 1)[-1]]  # the old and the half-written one are gone
    assert json.loads(storage.read_bytes(storage.join(run, "export.json")))["step"] == 8
    assert exports.resolve_export("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # hub ids pass
    assert not exports.export_exists(storage.join(run + "-none", "export"))


def records(first: int, last: int, attempt: int = 1) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s, "attempt": attempt} for s in range(first, last + 1)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_metrics_files_hold_each_step_once_across_resumes(where, tmp_path, request):
    """One small file per checkpoint; an attempt that resumes from a checkpoint rewrites that
    checkpoint's pending records and drops what a lost attempt wrote past it, so read_metrics gives
    every step once. A legacy metrics.jsonl and checkpoint (its whole history) carry over."""
    run = s3_or_local(where, tmp_path, request)
    assert read_metrics(run) == []
    for a, b in ((1, 4), (5, 8), (9, 10)):  # checkpoints at 4 and 8; 9-10 written by an attempt that then died
        write_metrics(records(a, b), run)
    assert [s for s, _ in metrics_files(run)] == [4, 8, 10]
    assert read_metrics(run) == records(1, 10)
    resumed = TrainerState.resumed(json.dumps(dataclasses.asdict(
        TrainerState(step=8, pending=records(5, 8)))))  # checkpoint 8, saved before its file was written
    sync_metrics(run, resumed)
    assert read_metrics(run) == records(1, 8)
    write_metrics(records(9, 12, attempt=2), run)
    assert read_metrics(run) == records(1, 8) + records(9, 12, attempt=2)

    storage.write_bytes_atomic(storage.join(run, "metrics.jsonl"),
                               "".join(json.dumps(r) + "\n" for r in records(1, 6)).encode())
    legacy = TrainerState.resumed(json.dumps({"step": 4, "history": records(1, 4), "world_size": 2,
                                                      "attempts": 1, "best_value": None, "best_step": 0}))
    assert (legacy.pending, legacy.attempts, legacy.plan) == (records(1, 4), 2, {})
    sync_metrics(run, legacy)
    assert read_metrics(run) == records(1, 4)
    assert not storage.exists(storage.join(run, "metrics.jsonl"))
    sync_metrics(run, TrainerState())  # from scratch: nothing
    assert read_metrics(run) == []


def test_random_generators_round_trip():
    """Python's, numpy's and torch's generators go through JSON and continue where they were."""
    import random

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


def test_a_resume_needs_the_plan_its_checkpoint_was_trained_with(tmp_path):
    """A relaunch under the same run name with other data, another seed or another batch geometry is
    refused with one line naming the change (a SystemExit, no traceback); with the same plan (a
    longer max_steps) it resumes and each step's metrics are there once."""
    import subprocess

    data = write_toy(tmp_path, n=64)
    cfg = ToyConfig(data=data, output=str(tmp_path / "runs"), run_name="plan", launcher="local", num_workers=1,
                    micro_batch_size=8, max_steps=4, checkpoint_every=2, lr=1e-2)
    assert launch.fit(ToyClassifierTask(cfg)).error is None
    saved = json.loads(Path(run_dir(cfg), "local-checkpoints", "checkpoint-00000004", "trainer_state.json")
                       .read_text())
    assert saved["plan"]["data"]["rows"] == 64 and saved["plan"]["total_steps"] == 4
    assert [r["step"] for r in saved["pending"]] == [3, 4]  # the records since the previous checkpoint only

    for change, message in ((dict(seed=1), "seed 0 -> 1"), (dict(micro_batch_size=4), "micro_batch_size 8 -> 4"),
                            (dict(num_workers=2), "num_workers 1 -> 2")):
        with pytest.raises(SystemExit, match="cannot resume") as refused:
            launch.fit(ToyClassifierTask(dataclasses.replace(cfg, max_steps=6, **change)))
        assert message in str(refused.value) and "\n" not in str(refused.value), refused.value
    x, y = toy_rows(1, seed=5)
    storage.write_table_atomic(pa.table({"row_id": ["extra"], "x": list(x), "y": y}), f"{data}/part-00001.parquet")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_training import ToyClassifierTask, ToyConfig\nfrom eama.engine.training import launch\n"
            f"launch.fit(ToyClassifierTask(ToyConfig(**{dataclasses.asdict(cfg)!r})))\n")
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"cannot resume {run_dir(cfg)} from its checkpoint at step 4: the plan changed "
                           "since (data 1 files, 64 rows, ") and "-> 2 files, 65 rows" in line, line
    assert "start fresh under another run_name" in line

    os.remove(f"{data}/part-00001.parquet")
    longer = dataclasses.replace(cfg, max_steps=6)
    assert launch.fit(ToyClassifierTask(longer)).error is None
    history = read_metrics(run_dir(longer))
    assert [(r["step"], r["attempt"]) for r in history] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]
    assert [s for s, _ in metrics_files(run_dir(longer))] == [2, 4, 6]


class DropoutToyTask(ToyClassifierTask):
    """The toy classifier with dropout: its steps depend on torch's random generator."""

    def build_model(self, ds_config, device, dtype):
        torch.manual_seed(self.config.seed)
        self.device = device
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(32, 2))
        return ModelParts(model.to(device, dtype))


@pytest.mark.slow
def test_ray_workers_resume_their_random_generators_and_metrics_once(tmp_path, ray_local):
    """2 Ray Train workers (ZeRO-2) with dropout, one killed after step 6 and restarted from the
    checkpoint at step 4, take the steps of a run never stopped (each rank's generators come back from
    the checkpoint); every step's metrics are there once; a relaunch with another seed is refused on
    the driver; the export is behind its pointer."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    common = dict(data=write_toy(tmp_path), output=str(tmp_path / "runs"), num_workers=2, zero_stage=2,
                  micro_batch_size=8, max_steps=8, checkpoint_every=4, lr=1e-2, warmup_ratio=0.1)
    whole = ToyConfig(run_name="whole", **common)
    assert launch.fit(DropoutToyTask(whole)).error is None
    marker = tmp_path / "killed.txt"
    killed = ToyConfig(run_name="killed", fail_at_step=6, fail_marker=str(marker), **common)
    result = launch.fit(DropoutToyTask(killed))
    assert result.error is None and marker.exists()

    want, got = read_metrics(run_dir(whole)), read_metrics(run_dir(killed))
    assert [(r["step"], r["attempt"]) for r in got] == [(s, 1 if s <= 4 else 2) for s in range(1, 9)]
    assert [s for s, _ in metrics_files(run_dir(killed))] == [4, 8]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)
    ckpt = Path(result.checkpoint.path)
    assert {p.name for p in ckpt.glob("rng-*.json")} == {"rng-rank00000.json", "rng-rank00001.json"}
    assert json.loads((ckpt / "trainer_state.json").read_text())["plan"]["num_workers"] == 2
    info = json.loads(Path(run_dir(killed), "export", "eama_export.json").read_text())
    assert info["step"] == 8 and Path(run_dir(killed), "export.json").exists()

    with pytest.raises(SystemExit, match="seed 0 -> 1"):
        launch.fit(DropoutToyTask(dataclasses.replace(killed, seed=1, fail_at_step=0)))
