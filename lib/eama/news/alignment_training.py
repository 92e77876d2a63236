"""EAMA's multitask alignment training, as a task on the engine's trainer (eama.engine.training).

The engine runs the Ray Train workers, DeepSpeed (ZeRO-3 by default), the deterministic data
order, checkpoints, resume, metrics and the export; this module supplies what is EAMA's:

* `TrainConfig`: the engine's settings + data, model, task_weights, freeze_vision, trust_remote_code;
* `task_files`: the task shards (checked against the TASK contract) and their row count;
* `load_for_training` / `freeze`: the MLLM loaded for (ZeRO-3-partitioned) training, vision tower
  frozen;
* `Collator`: the model's processor (models.encode) over decoded images and prompts wrapped by
  models.format_prompt, with the target + eos appended; labels cover the target tokens only
  (left padding puts them at the end of every row); position ids as generate() computes them
  (`generation_position_ids`), so a padded row is trained at the positions it is generated at;
* `weighted_loss` / `forward_loss`: per-row mean token loss x (row weight x task weight), summed
  over the micro-batch and divided by its size, so gradients do not depend on how rows are spread
  over ranks; the three tasks are the loss groups the engine logs apart;
* `AlignmentTask` ties them to the engine's `TrainingTask`; `fit` runs it;
* `selection_scores`: exact-match accuracy and F1 of an exported model's selection answers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from eama.engine import blobs, images, published_layout, schema, storage
from eama.engine.training import config as trainer_config
from eama.engine.training import launch
from eama.engine.training.config import export_dir, run_dir  # noqa: F401 - this job's API
from eama.engine.training.metrics import read_metrics  # noqa: F401 - this job's API
from eama.engine.training.task import ModelParts, TrainingTask, device_and_dtype, enable_gradient_checkpointing
from eama.news import prompts

VISION_MODULES = ("vision_tower", "vision_model")
IGNORE = -100


@dataclasses.dataclass
class TrainConfig(trainer_config.TrainerConfig):
    """train_alignment settings. Learning-rate defaults follow LLaVA-1.5's recipe for a 7B model."""

    data: str = ""  # task rows from build_alignment_data: directory, file or glob, local or s3://
    images: str = ""  # the task rows' images stored once (sample_id, image); default: DATA/_images
    model: str = "tiny-llava"  # preset, hub id, local path or s3:// URI
    run_name: str = "alignment"
    task_weights: str = "sentence_selection=1,entity_selection=1,captioning=1"  # loss weight of each task, task=w,...
    freeze_vision: bool = True  # EAMA trains connector + language model
    trust_remote_code: bool = False  # run a model's own Python code (off: only transformers' classes)


def parse_task_weights(spec: str) -> dict[str, float]:
    """'sentence_selection=1,captioning=0.5' -> weights of all tasks (unnamed ones get 1)."""
    weights = {t: 1.0 for t in schema.TASK_NAMES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in weights or not value:
            raise ValueError(f"task_weights: expected task=weight with a task in {schema.TASK_NAMES}, got {part!r}")
        weights[name.strip()] = float(value)
    return weights


def validate(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise SystemExit("train_alignment needs --data (task rows from build_alignment_data)")
    trainer_config.validate(cfg)
    parse_task_weights(cfg.task_weights)


def images_folder(cfg: TrainConfig) -> str:
    """Where rows whose `image` is null find theirs: `images`, else the _images folder beside the
    task rows (DATA itself when it is a folder, else the folder holding DATA)."""
    if cfg.images:
        return cfg.images
    base = cfg.data if storage.isdir(cfg.data) else cfg.data.rsplit("/", 1)[0]
    return storage.join(base, schema.TASK_IMAGES_DIR)


def task_files(data: str) -> tuple[list[str], int]:
    """The task shards under `data` (checked against the TASK contract) and their row count."""
    files = storage.list_files(data)
    if not files:
        raise SystemExit(f"no task Parquet files under {data}")
    for f in files:
        schema.check_schema(storage.read_schema(f), schema.TASK, f)
    return files, sum(storage.parquet_num_rows(f) for f in files)


# ---------------------------------------------------------------- model


def load_for_training(cfg: TrainConfig, ds_config: dict[str, Any], device: str | None = None,
                      dtype: Any = None) -> tuple[Any, Any]:
    """(LoadedModel, keep-alive handle). Under ZeRO-3 an HfDeepSpeedConfig must stay alive while
    from_pretrained runs so transformers partitions the weights as it loads them; the handle is
    returned so the caller keeps it for the whole run. Device and dtype default to the engine's
    choice for `ds_config` (bf16 on GPU, fp32 on CPU)."""
    from eama.news import models

    keep_alive = None
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    default_device, default_dtype = device_and_dtype(ds_config)
    lm = models.load_model(cfg.model, device=device or default_device, dtype=dtype or default_dtype,
                           trust_remote_code=cfg.trust_remote_code, for_training=True)
    if cfg.freeze_vision:
        freeze(lm.model, VISION_MODULES)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm.model)
    return lm, keep_alive


def freeze(model: Any, names: Sequence[str]) -> list[str]:
    """Stop gradients into every submodule whose attribute name is in `names`; return their paths."""
    frozen = []
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in names and not any(path.startswith(f + ".") for f in frozen):
            for p in module.parameters():
                p.requires_grad_(False)
            frozen.append(path)
    return frozen


# ---------------------------------------------------------------- collation and loss


@dataclasses.dataclass
class Batch:
    inputs: dict[str, Any]  # model inputs (input_ids, attention_mask, pixel_values, ...)
    labels: Any  # [B, L] target token ids, IGNORE elsewhere
    weights: Any  # [B] row weight x task weight
    task_ids: Any  # [B] index into schema.TASK_NAMES
    tokens: int  # non-padding tokens in the batch
    target_tokens: int


def generation_position_ids(attention_mask: Any) -> Any:
    """The position ids transformers' generate() gives a prompt batch
    (GenerationMixin._prepare_position_ids_for_generation): the running count of attended tokens
    minus one, 0 at padding. Left padding thus starts every row's text at 0, and InstructBLIP's
    query tokens (before the padding) are followed directly by the text, with no gap."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def generation_decoder(lm: Any) -> Any:
    """The module whose generate() runs the text: InstructBLIP hands its embeddings to its language
    model's generate(); LLaVA (and other families) generate themselves."""
    return lm.model.language_model if lm.family == "instructblip" else lm.model


def generation_uses_position_ids(lm: Any) -> bool:
    """Whether generate() passes position ids for this model: as transformers decides it, when the
    generating module is decoder-only and its forward takes `position_ids` (not InstructBLIP-T5)."""
    import inspect

    decoder = generation_decoder(lm)
    if lm.family == "instructblip" and not lm.model.config.use_decoder_only_language_model:
        return False
    return (not getattr(decoder.config, "is_encoder_decoder", False)
            and "position_ids" in inspect.signature(decoder.forward).parameters)


class Collator:
    """Task rows -> model inputs with target-only labels, through the model's own processor.

    The inputs carry the position ids generate() would use for the same left-padded rows: without
    them the language model counts positions over the padding (a plain arange), which shifts
    LLaVA's rows by their padding and, for InstructBLIP, opens a gap of that size between the
    query tokens and the text that generation never sees."""

    def __init__(self, lm: Any, task_weights: dict[str, float], images: blobs.BlobTable | None = None):
        self.lm = lm
        self.task_weights = task_weights
        self.images = images
        self.eos = lm.tokenizer.eos_token or ""  # left-padded, as hf.load_image_text_model sets it
        self.positions = generation_uses_position_ids(lm)

    def texts(self, prompt: str, target: str) -> tuple[str, str]:
        """(prompt as the model sees it at inference, the same with the answer appended)."""
        from eama.news import models

        wrapped = models.format_prompt(self.lm.family, prompt)
        return wrapped, f"{wrapped} {target}{self.eos}"

    def target_lengths(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Tokens the answer adds to the prompt (image-token expansion cancels out)."""
        tok = self.lm.tokenizer
        head = tok([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
        full = tok([f for _, f in pairs], add_special_tokens=True)["input_ids"]
        return [max(1, len(f) - len(h)) for h, f in zip(head, full)]

    def __call__(self, rows: dict[str, np.ndarray]) -> Batch:
        import torch

        from eama.news import models

        pairs = [self.texts(p, t) for p, t in zip(rows["prompt"], rows["target"])]
        pics = [images.load_rgb(b) for b in blobs.fill(rows, self.images)]
        enc = models.encode(self.lm, [f for _, f in pairs], pics)
        if self.positions:
            enc["position_ids"] = generation_position_ids(enc["attention_mask"])
        ids = enc["input_ids"]
        labels = torch.full_like(ids, IGNORE)
        lengths = self.target_lengths(pairs)
        for i, n in enumerate(lengths):
            labels[i, -n:] = ids[i, -n:]
        tasks = [schema.TASK_NAMES.index(t) for t in rows["task"]]
        weights = torch.tensor([float(w) * self.task_weights[t] for w, t in zip(rows["weight"], rows["task"])],
                               dtype=torch.float32, device=ids.device)
        return Batch(enc, labels, weights, torch.tensor(tasks, device=ids.device),
                     int(enc["attention_mask"].sum()), sum(lengths))


def weighted_loss(logits: Any, labels: Any, weights: Any, micro_batch_size: int) -> tuple[Any, Any]:
    """(Σ_i w_i · mean token loss of row i) / micro_batch_size, and the per-row losses (detached).

    `logits` may cover only the last K positions (logits_to_keep): they are aligned to the end of
    `labels`, as left padding puts every target there."""
    import torch.nn.functional as F

    k = logits.shape[1]
    shifted = labels[:, labels.shape[1] - k + 1:]
    tok_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE,
                               reduction="none")
    mask = (shifted != IGNORE).float()
    row_loss = (tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (row_loss * weights).sum() / micro_batch_size, row_loss.detach()


def forward_loss(model: Any, batch: Batch, micro_batch_size: int) -> tuple[Any, Any]:
    """Run the model on the batch, computing logits only where targets are predicted when the
    model supports `logits_to_keep`."""
    keep = int((batch.labels != IGNORE).sum(1).max()) + 1
    kwargs = dict(batch.inputs)
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    return weighted_loss(out.logits, batch.labels, batch.weights, micro_batch_size)


def accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    inner = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


# ---------------------------------------------------------------- the task


class AlignmentTask(TrainingTask):
    """EAMA's three alignment tasks (sentence selection, entity selection, captioning) on an MLLM."""

    sort_columns = ("task", "sample_id", "prompt")
    columns = tuple(schema.TASK.names)
    length_columns = ("prompt", "target")
    group_names = tuple(schema.TASK_NAMES)
    title = "EAMA alignment training"

    config: TrainConfig

    def validate(self) -> None:
        validate(self.config)
        self.config.data = storage.absolute(self.config.data)

    def data_files(self) -> tuple[list[str], int]:
        return task_files(self.config.data)

    def build_model(self, ds_config: dict[str, Any], device: str, dtype: Any) -> ModelParts:
        self.lm, keep_alive = load_for_training(self.config, ds_config, device, dtype)
        folder = images_folder(self.config)
        self.collator = Collator(self.lm, parse_task_weights(self.config.task_weights),
                                 blobs.BlobTable(folder) if storage.exists(folder) else None)
        return ModelParts(self.lm.model, keep_alive=keep_alive)

    def collate(self, rows: dict[str, np.ndarray]) -> Batch:
        return self.collator(rows)

    def loss(self, engine: Any, batch: Batch) -> tuple[Any, Any, Any]:
        loss, row_losses = forward_loss(engine, batch, self.config.micro_batch_size)
        return loss, row_losses, batch.task_ids

    def counts(self, batch: Batch) -> Mapping[str, int]:
        return {"tokens": batch.tokens, "target_tokens": batch.target_tokens}

    def save_export(self, module: Any, state_dict: dict[str, Any], directory: str) -> None:
        """A Hugging Face model (safetensors) + processor that models.load_model and vLLM read
        (published_layout.save_image_text_model: the published key layout)."""
        published_layout.save_image_text_model(module, self.lm.processor, directory, state_dict=state_dict)

    def export_info(self) -> dict[str, Any]:
        return {"base_model": self.config.model, "task_weights": self.config.task_weights}


def fit(cfg: TrainConfig) -> Any:
    """Run (or resume, when OUTPUT/RUN_NAME holds checkpoints) the training; returns Ray's Result."""
    return launch.fit(AlignmentTask(cfg))


# ---------------------------------------------------------------- selection accuracy


def selection_scores(lm: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                     max_new_tokens: int = 40, image_table: blobs.BlobTable | None = None
                     ) -> dict[str, dict[str, float]]:
    """Exact-match accuracy and micro F1 of the model's answers to sentence- and entity-selection
    rows (answers parsed as at inference); rows without an image find it in `image_table`."""
    from eama.news import models

    tally: dict[str, list[float]] = {}
    for task, kind in (("sentence_selection", "sentences"), ("entity_selection", "entities")):
        todo = [r for r in rows if r["task"] == task]
        exact = tp = n_pred = n_gold = 0
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            cands = [prompts.listed_entities(r["prompt"]) if kind == "entities"
                     else prompts.sentence_choices(len(prompts.numbered_sentences(r["prompt"]))) for r in chunk]
            pics = blobs.fill({k: [r[k] for r in chunk] for k in ("image", "sample_id")}, image_table)
            answers = models.generate_text(lm, [r["prompt"] for r in chunk], [images.load_rgb(b) for b in pics],
                                           max_new_tokens, [(kind, c) for c in cands])
            for r, answer, c in zip(chunk, answers, cands):
                if kind == "sentences":
                    pred, gold = prompts.parse_sentence_ids(answer, len(c))[0], prompts.parse_sentence_ids(r["target"], len(c))[0]
                else:
                    pred, gold = prompts.parse_entities(answer, c)[0], prompts.parse_entities(r["target"], c)[0]
                exact += set(pred) == set(gold)
                tp += len(set(pred) & set(gold))
                n_pred += len(set(pred))
                n_gold += len(set(gold))
        tally[task] = [exact, tp, n_pred, n_gold, len(todo)]
    out = {}
    for task, (exact, tp, n_pred, n_gold, n) in tally.items():
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gold if n_gold else 0.0
        out[task] = {"accuracy": exact / n if n else math.nan, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                     "rows": n}
    return out
