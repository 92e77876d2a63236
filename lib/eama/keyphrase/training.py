"""MM-MKP training as a task on the engine's trainer (eama.engine.training).

The engine runs Ray Train + DeepSpeed, the order, checkpoints, resume, metrics, model selection and
the export; this module supplies the keyphrase parts:

* `KeyphraseTrainConfig`: the engine's keys + data, encoder, ablation settings and loss weights;
* `split_holdout`: without --valid, a seeded share of the training posts (by a hash of sample_id,
  the same for every training seed) is held out for model selection, written once under the run;
* `KeyphraseTask`: the model of `eama.keyphrase.model`, its per-post loss (each step also logs the
  mean of each part: `loss_part/classification`, `loss_part/generation`, and
  `loss_part/region_attention`, the fine filter's error over the posts with an image), and `evaluate`: beam
  search on the held-out posts, every rank scoring its share and the metric's sums all-reduced;
  `dev_score` = mean(F1@1, F1@3, MAP@5) picks the exported epoch. The test set is never read here.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Mapping

import numpy as np

from eama.engine import images as image_io
from eama.engine import feature_cache, schema, storage
from eama.engine.training import config as trainer_config
from eama.engine.training import launch
from eama.engine.training.metrics import RATIO_DENOMINATOR, RATIO_NUMERATOR
from eama.engine.training.order import steps_per_epoch
from eama.engine.training.task import ModelParts, TrainingTask, rank_share, sum_over_ranks
from eama.keyphrase import metric
from eama.keyphrase import model as kp_model

COLUMNS = ("sample_id", "post", "keyphrases", "ocr", "visual_entities", "image_text_match", "image")


@dataclasses.dataclass
class KeyphraseTrainConfig(trainer_config.TrainerConfig):
    """train_keyphrase settings; the engine's keys (epochs, micro_batch_size, zero_stage, ...) included."""

    train: str = ""  # keyphrase Parquet rows to train on (import_corpus --format twitter-keyphrase), local or s3://
    valid: str = ""  # keyphrase Parquet rows for model selection; empty = hold out `holdout` of --train
    holdout: float = 0.1  # share of --train held out for model selection when --valid is not given
    holdout_seed: int = 0  # which posts are held out (the same for every training seed)
    encoder: str = "minilm"  # minilm | mpnet | a Hugging Face id | a local or s3:// folder
    mode: str = "joint"  # joint (classifier + generator copying from it) | classify | generate
    inputs: str = "all"  # text (the post alone) | all (post + OCR + visual entities) | ocr (post + OCR) | entities (post + visual entities)
    gate: str = "match"  # coarse noise filter: match (the image-text matching probability, given or from the matching head) | fixed (g = 1: the ablation)
    images: bool = True  # region features (EfficientNet-Lite0 7x7 grid) for rows that carry an image
    image_cache_mb: float = 1024  # per worker: region features kept per image, so each is decoded and encoded once, not every epoch; 0 = every step
    min_class_count: int = 1  # a training keyphrase joins the classifier's vocabulary from this many posts
    generation_weight: float = 1.0  # loss weight of the decoder's NLL
    classification_weight: float = 1.0  # loss weight of the classifier's cross-entropy
    region_attention_weight: float = 1.0  # loss weight of the fine (text -> region) attention's squared error
    copy_top_k: int = 5  # classifier predictions the decoder may copy from (mode=joint)
    beam_size: int = 10  # beams at evaluation and in the export
    top_n: int = 10  # keyphrases per post
    joint_rank: str = "sum"  # mode=joint: sum (a phrase's decoder + classifier probability) | beams_first (beams, then classes)
    max_length: int = 96  # subtokens of post + OCR + entities (median 51, 90th percentile 85 on the Twitter posts)
    max_phrase_tokens: int = 8  # subtokens of one keyphrase
    dropout: float = 0.1
    eval_batch_size: int = 32  # posts per beam search when evaluating
    eval_per_epoch: bool = True  # evaluate on the held-out posts after every epoch
    run_name: str = "keyphrase"
    lr: float = 5e-5  # the encoder's learning rate
    head_lr: float = 1e-3  # the new layers' (classifier, decoder, filters); 0 = lr
    epochs: int = 8
    micro_batch_size: int = 16
    group_by_length: int = 50  # posts of similar length share a micro-batch, in random buckets of this many (less padding); 0 = off
    zero_stage: int = 2
    schedule: str = "linear"
    warmup_ratio: float = 0.05
    select_metric: str = "dev_score"
    checkpoint_every: int = 0


def validate(cfg: KeyphraseTrainConfig) -> None:
    if not cfg.train:
        raise SystemExit("train_keyphrase needs --train (keyphrase Parquet rows: import_corpus --format twitter-keyphrase)")
    if cfg.mode not in kp_model.MODES:
        raise SystemExit(f"mode must be one of {', '.join(kp_model.MODES)}, got {cfg.mode!r}")
    if cfg.joint_rank not in kp_model.JOINT_RANKS:
        raise SystemExit(f"joint_rank must be one of {', '.join(kp_model.JOINT_RANKS)}, got {cfg.joint_rank!r}")
    if cfg.inputs not in kp_model.INPUTS:
        raise SystemExit(f"inputs must be one of {', '.join(kp_model.INPUTS)}, got {cfg.inputs!r}")
    if cfg.gate not in kp_model.GATES:
        raise SystemExit(f"gate must be one of {', '.join(kp_model.GATES)}, got {cfg.gate!r}")
    if cfg.zero_stage > 2:
        raise SystemExit("zero_stage must be 0, 1 or 2: the decoder's output layer is tied to the encoder's word "
                         "embeddings, which ZeRO-3 would partition outside their module")
    if not 0.0 <= cfg.holdout < 1.0:
        raise SystemExit(f"holdout must be in [0, 1), got {cfg.holdout}")
    if cfg.head_lr < 0:
        raise SystemExit(f"head_lr must be >= 0 (0: lr), got {cfg.head_lr}")
    if min(cfg.beam_size, cfg.top_n, cfg.max_phrase_tokens, cfg.copy_top_k, cfg.min_class_count) < 1:
        raise SystemExit("beam_size, top_n, max_phrase_tokens, copy_top_k and min_class_count must be >= 1")
    for path in (cfg.train, cfg.valid):
        if path and not storage.exists(path):
            raise SystemExit(f"not found: {path}")
    cfg.train, cfg.valid = storage.absolute(cfg.train), storage.absolute(cfg.valid) if cfg.valid else ""
    cfg.output = storage.absolute(cfg.output)
    trainer_config.validate(cfg)


def keyphrase_files(path: str) -> tuple[list[str], int]:
    """The keyphrase shards under `path` (checked against the contract) and their rows."""
    files = storage.list_files(path)
    if not files:
        raise SystemExit(f"no Parquet files under {path}")
    for f in files:
        schema.check_schema(storage.read_schema(f), schema.KEYPHRASE_SAMPLE, f, schema.KEYPHRASE_REQUIRED)
    return files, sum(storage.parquet_num_rows(f) for f in files)


def read_rows(path: str, with_images: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in keyphrase_files(path)[0]:
        names = storage.read_schema(f).names
        cols = [c for c in COLUMNS if c in names and (with_images or c != "image")]
        rows.extend(storage.read_table(f, cols).to_pylist())
    return rows


def held_out(sample_id: str, share: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def write_split(source: str, base: str, share: float, seed: int) -> tuple[str, str]:
    """BASE/train and BASE/holdout from the rows under `source`: a post is held out when a seeded
    hash of its sample_id falls below `share`. Written once (the split is deterministic)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dirs = storage.join(base, "train"), storage.join(base, "holdout")
    parts = [storage.join(d, "part-00000.parquet") for d in dirs]
    if not all(storage.exists(p) for p in parts):
        table = pa.concat_tables([schema.conform(storage.read_table(f), schema.KEYPHRASE_SAMPLE, f)
                                  for f in keyphrase_files(source)[0]], promote_options="permissive")
        mask = pa.array([held_out(i, share, seed) for i in table.column("sample_id").to_pylist()])
        held = sum(mask.to_pylist())
        if held == 0 or held == table.num_rows:
            raise SystemExit(f"holdout={share} of {table.num_rows} posts leaves no training or no held-out post")
        storage.write_table_atomic(table.filter(pc.invert(mask)), parts[0], storage.ROW_GROUP_ROWS)
        storage.write_table_atomic(table.filter(mask), parts[1], storage.ROW_GROUP_ROWS)
    return dirs


def split_holdout(cfg: KeyphraseTrainConfig) -> None:
    """Without --valid: hold out cfg.holdout of --train under RUN/data and train on the rest."""
    cfg.train, cfg.valid = write_split(cfg.train, storage.join(trainer_config.run_dir(cfg), "data"), cfg.holdout,
                                       cfg.holdout_seed)


def class_vocabulary(path: str, min_count: int) -> list[str]:
    """Training keyphrases in at least `min_count` posts, most frequent first (ties: alphabetical)."""
    counts: collections.Counter[str] = collections.Counter()
    for f in keyphrase_files(path)[0]:
        for kps in storage.read_table(f, ["keyphrases"]).column("keyphrases").to_pylist():
            counts.update(set(kps or []))
    return [k for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]


def region_features(rows: list[dict[str, Any]], use: bool, cache: feature_cache.FeatureCache | None = None,
                    pictures: list[Any] | None = None) -> tuple[Any, Any]:
    """([B, 49, 1280] grid features, [B] has-image) when `use` and a row has an image, else (None,
    None); with `cache`, an image's grid is computed once and kept. `pictures`: each row's image
    already decoded (None: the row has none), used instead of decoding its `image` bytes."""
    import torch

    has = [p is not None for p in pictures] if pictures is not None else [bool(r.get("image")) for r in rows]
    if not use or not any(has):
        return None, None
    from eama.engine import vision

    with_image = [i for i, h in enumerate(has) if h]

    def picture(i: int) -> Any:
        return pictures[i] if pictures is not None else image_io.open_image(rows[i]["image"]).convert("RGB")

    def compute(todo: list[int]) -> dict[int, Any]:
        grid = vision.feature_grid([picture(with_image[j]) for j in todo])
        return dict(zip(todo, grid))

    keys = [None if pictures is not None else feature_cache.image_key(rows[i]["image"]) for i in with_image]
    found = feature_cache.lookup(cache, keys, compute)
    out = torch.zeros(len(rows), 49, vision.HEAD_CHANNELS)
    for j, grid in found.items():
        out[with_image[j]] = grid
    return out, torch.tensor(has)


LOSS_PARTS = ("classification", "generation", "region_attention")  # logged per step as loss_part/<name>


@dataclasses.dataclass
class Batch:
    inputs: kp_model.Inputs
    targets: kp_model.Targets
    has_image: Any  # [B] long
    pairs: int
    parts: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # loss part -> (sum, posts it covers)


class KeyphraseTask(TrainingTask):
    """MM-MKP: encoder + noise filtering + classifier + copy decoder, one loss per post."""

    sort_columns = ("sample_id",)
    columns = COLUMNS
    group_names = ("without_image", "with_image")
    title = "keyphrase training"

    def __init__(self, config: KeyphraseTrainConfig, classes: list[str]):
        super().__init__(config)
        self.spec = kp_model.KeyphraseSpec(
            classes=classes, mode=config.mode, inputs=config.inputs, images=config.images,
            max_length=config.max_length, max_phrase_tokens=config.max_phrase_tokens, copy_top_k=config.copy_top_k,
            beam_size=config.beam_size, top_n=config.top_n, encoder=config.encoder, joint_rank=config.joint_rank,
            gate=config.gate)
        self.length_columns = ("post",) + tuple(c for c, part in (("ocr", "ocr"), ("visual_entities", "entities"))
                                                if self.spec.uses(part))

    def validate(self) -> None:
        validate(self.config)

    def data_files(self) -> tuple[list[str], int]:
        files, rows = keyphrase_files(self.config.train)
        present = set(storage.read_schema(files[0]).names)
        self.columns = tuple(c for c in COLUMNS if c in present and (self.config.images or c != "image"))
        return files, rows

    def build_model(self, ds_config: dict[str, Any], device: str, dtype: Any) -> ModelParts:
        import torch

        cfg: KeyphraseTrainConfig = self.config  # type: ignore[assignment]
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = kp_model.build(self.spec, cfg.dropout, dtype)
        self.model.weights = kp_model.LossWeights(cfg.generation_weight, cfg.classification_weight,
                                                  cfg.region_attention_weight)
        self.model.to(device)
        self.device = device
        self.image_cache = feature_cache.FeatureCache(cfg.image_cache_mb)
        self.class_index = {c: i for i, c in enumerate(self.spec.classes)}
        self.valid_rows = read_rows(cfg.valid, cfg.images) if cfg.valid else []
        encoder_ids = {id(p) for p in self.model.encoder.parameters()}
        heads = [p for p in self.model.parameters() if id(p) not in encoder_ids]
        groups = [{"params": list(self.model.encoder.parameters()), "lr": cfg.lr},
                  {"params": heads, "lr": cfg.head_lr or cfg.lr}]
        return ModelParts(self.model, parameters=groups)

    def collate(self, rows: dict[str, np.ndarray]) -> Batch:
        n = len(rows["sample_id"])
        as_rows = [{k: rows[k][i] for k in rows} for i in range(n)]
        for r in as_rows:
            for k in ("keyphrases", "visual_entities"):
                if r.get(k) is not None:
                    r[k] = list(r[k])
        regions, has = region_features(as_rows, self.config.images, self.image_cache)
        inputs = kp_model.encode_inputs(self.tokenizer, as_rows, self.spec, regions, has).to(self.device)
        targets = kp_model.make_targets(self.tokenizer, as_rows, self.spec, self.class_index).to(self.device)
        import torch

        flag = has.long() if has is not None else torch.zeros(n, dtype=torch.long)
        return Batch(inputs, targets, flag.to(self.device), int(targets.pair_post.numel()))

    def loss(self, engine: Any, batch: Batch) -> tuple[Any, Any, Any]:
        total, parts = engine(batch.inputs, batch.targets)
        posts = {"classification": total.shape[0], "generation": int((batch.targets.pair_post.bincount(
            minlength=total.shape[0]) > 0).sum()), "region_attention": int(batch.has_image.sum())}
        batch.parts = {k: (float(v.detach().sum()), posts[k]) for k, v in parts.items()}
        return total.sum() / self.config.micro_batch_size, total.detach(), batch.has_image

    def counts(self, batch: Batch) -> Mapping[str, float]:
        """Keyphrases, and each loss part's sum and posts (logged as its mean; every key on every batch)."""
        out: dict[str, float] = {"keyphrases": batch.pairs}
        for name in LOSS_PARTS:
            total, posts = batch.parts.get(name, (0.0, 0))
            out[f"loss_part/{name}{RATIO_NUMERATOR}"], out[f"loss_part/{name}{RATIO_DENOMINATOR}"] = total, posts
        return out

    def save_export(self, module: Any, state_dict: dict[str, Any], directory: str) -> None:
        kp_model.save_export(module, state_dict, self.tokenizer, self.spec, directory)

    def export_info(self) -> dict[str, Any]:
        return {"encoder": self.config.encoder, "mode": self.config.mode, "inputs": self.config.inputs,
                "gate": self.config.gate}

    def evaluate(self, engine: Any, step: int) -> Mapping[str, float] | None:
        """The metric on the held-out posts (beam search); every rank scores rows rank::world."""
        import torch

        if not self.valid_rows:
            return None
        cfg: KeyphraseTrainConfig = self.config  # type: ignore[assignment]
        mine, _, _ = rank_share(self.valid_rows)
        sums = metric.accumulate([], [], [])
        for k in range(0, len(mine), cfg.eval_batch_size):
            chunk = mine[k:k + cfg.eval_batch_size]
            ranked = predict_rows(engine.module, self.tokenizer, chunk, self.spec, cfg.images, self.device,
                                  self.image_cache)
            part = metric.accumulate([r["post"] for r in chunk], [r.get("keyphrases") or [] for r in chunk],
                                     [[p for p, _ in x] for x in ranked])
            for scope in sums:
                for key, v in part[scope].items():
                    sums[scope][key] = sums[scope].get(key, 0.0) + v
        keys = ["posts"] + list(metric.SUM_KEYS)
        flat = torch.tensor([sums["all"].get(k, 0.0) for k in keys], dtype=torch.float64)
        flat = sum_over_ranks(flat, self.device)
        merged = {"all": dict(zip(keys, flat.tolist())), "present": {"posts": 0.0}, "absent": {"posts": 0.0}}
        report = metric.finish(merged)
        a = report["all"]
        return {"dev_f1@1": a["F1@1"], "dev_f1@3": a["F1@3"], "dev_map@5": a["MAP@5"],
                "dev_score": metric.headline(report)}


def predict_rows(model: Any, tokenizer: Any, rows: list[dict[str, Any]], spec: kp_model.KeyphraseSpec,
                 images: bool, device: Any, cache: feature_cache.FeatureCache | None = None,
                 pictures: list[Any] | None = None) -> list[list[tuple[str, float]]]:
    """Ranked keyphrases of rows (region features computed, or taken from `cache`, where a row has an
    image; `pictures`: the rows' images already decoded, as region_features takes them)."""
    import torch

    regions, has = region_features(rows, images and spec.images, cache, pictures)
    with torch.no_grad():
        return kp_model.predict(model, tokenizer, rows, spec, regions, has, device)



def fit(cfg: KeyphraseTrainConfig) -> Any:
    """Train (or resume) a keyphrase model; returns Ray Train's Result."""
    validate(cfg)
    if not cfg.valid and cfg.holdout > 0:
        split_holdout(cfg)
    if not cfg.valid:
        cfg.select_metric = ""
    classes = class_vocabulary(cfg.train, cfg.min_class_count)
    if not classes:
        raise SystemExit(f"{cfg.train}: no training post has keyphrases")
    task = KeyphraseTask(cfg, classes)
    if cfg.valid and cfg.eval_per_epoch:
        cfg.eval_every = steps_per_epoch(keyphrase_files(cfg.train)[1], cfg)
    return launch.fit(task)
