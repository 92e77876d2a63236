"""ITA's tagger training as a task on the engine's trainer (eama.engine.training).

The engine runs Ray Train + DeepSpeed, the deterministic order, checkpoints, resume, metrics and
the export; this module supplies the MNER parts:

* `MnerTrainConfig`: the engine's settings + data, encoder, view, CVA and ITA's two learning rates
  (the encoder's `lr`, a much higher `crf_lr` for the CRF's transition scores; `emission_lr`, when
  set, gives the emission layer its own), linear decay;
* `MnerTask.loss`: CRF negative log-likelihood of the text+view input; with `cva`, for every post
  that has a view, 0.5 x NLL(text+view) + 0.5 x T^2 x KL(teacher || student) over the CRF's posterior
  marginals at temperature T, the teacher being the text+view input (detached) and the student the
  text-only input. Summed over the micro-batch and divided by its size;
* `MnerTask.evaluate`: entity F1 on the validation posts for both evaluation views (text-only input
  and text+view input), every rank scoring its share and the counts all-reduced; `dev_f1` is their
  mean (the text F1 alone for view=text): the engine's model selection (`select_metric`) exports
  the model at the evaluation where it peaked. The test set is never read here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from eama.engine import schema, storage
from eama.engine.training import config as trainer_config
from eama.engine.training.task import ModelParts, TrainingTask, rank_share, sum_over_ranks
from eama.mner import crf as crf_module
from eama.mner import spans, tagger


@dataclasses.dataclass
class MnerTrainConfig(trainer_config.TrainerConfig):
    """train_mner settings; the engine's keys (epochs, micro_batch_size, zero_stage, ...) included."""

    train: str = ""  # MNER Parquet rows to train on (import_corpus --format twitter-mner), local or s3://
    valid: str = ""  # MNER Parquet rows for model selection (never the test set); empty = no selection, the last step is exported
    encoder: str = "minilm"  # minilm | mpnet | a Hugging Face id | a local or s3:// folder
    view: str = "text"  # image-text view appended to each post: text (none) | caption | ocr | tags | all
    cva: bool = False  # cross-view alignment (needs a view other than text)
    temperature: float = 2.0  # CVA temperature T (ITA: 4 for Twitter-2015, 2 for Twitter-2017)
    crf_lr: float = 0.05  # learning rate of the CRF's transition, start and end scores
    dropout: float = 0.1  # before the emission layer
    max_length: int = 256  # subtokens per input (post + view)
    eval_batch_size: int = 32  # posts per forward pass when evaluating
    eval_per_epoch: bool = True  # evaluate on valid after every epoch (else every eval_every steps / at the end)
    run_name: str = "mner"
    lr: float = 5e-5  # encoder and emission layer (ITA: 5e-6 for XLM-R-large)
    emission_lr: float = 0.0  # ita: learning rate of the emission layer; 0 = lr (a control for BGA, whose emission layer trains at bga_lr)
    epochs: int = 5
    micro_batch_size: int = 16
    zero_stage: int = 2
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    select_metric: str = "dev_f1"
    checkpoint_every: int = 0
    # BGA-MNER (method=bga); ITA reads none of these
    method: str = "ita"  # ita (encoder + CRF, optional view and CVA) | bga (bidirectional generative alignment)
    vision: str = "efficientnet"  # bga: frozen image encoder for rows with an image: efficientnet | none | a CLIPVisionModel id or folder
    image_cache_mb: float = 1024  # bga, per worker: the frozen encoder's features kept per image, so each is decoded and encoded once, not every epoch; 0 = every step
    caption_proxy: bool = True  # bga: rows without an image use their caption (frozen text encoder) as visual features
    proxy_tokens: int = 32  # bga: caption subtokens kept as proxy regions
    bga_layers: int = 1  # bga: BGA layers
    scs: bool = True  # bga: stage-refined context samplers (false: the "without SCS" ablation)
    scs_stages: int = 2  # bga: refinement stages per sampler
    gumbel_tau: float = 1.0  # bga: Gumbel-sigmoid temperature of the samplers' keep decisions
    generator_layers: int = 2  # bga: transformer decoder layers per generator
    region_slots: int = 0  # bga: image pseudo-features generated from text (0 = as many as the real source has)
    rec_weight: float = 1.0  # bga: weight of the reconstruction loss
    cycle_weight: float = 1.0  # bga: weight of the cycle-consistency loss (0: the "without cycle" ablation)
    real_visual_prob: float = 0.5  # bga: chance that a post with a visual source attends to it in training (else generated features only)
    bga_lr: float = 1e-3  # bga: learning rate of the new layers (BGA layers, projections, emission)
    keep_budget: float = 0.0  # bga: weight of the samplers' keep rate in the loss (a sparsity term that makes SCS drop elements); 0 = none
    select_view: str = "text"  # bga: model selection on the valid F1 of text (the paper's inference) | visual | mean


def validate(cfg: MnerTrainConfig) -> None:
    if not cfg.train:
        raise SystemExit("train_mner needs --train (MNER Parquet rows: import_corpus --format twitter-mner)")
    if cfg.method not in ("ita", "bga"):
        raise SystemExit(f"method must be ita or bga, got {cfg.method!r}")
    if cfg.method == "bga":
        if cfg.view != "text" or cfg.cva:
            raise SystemExit("method=bga reads the post alone and its image or caption itself: leave --view and --cva unset")
        if cfg.select_view not in ("text", "visual", "mean"):
            raise SystemExit(f"select_view must be text, visual or mean, got {cfg.select_view!r}")
        if not 0 <= cfg.real_visual_prob <= 1:
            raise SystemExit("real_visual_prob must be in [0, 1]")
        if min(cfg.bga_layers, cfg.scs_stages, cfg.generator_layers, cfg.proxy_tokens) < 1 or cfg.region_slots < 0:
            raise SystemExit("bga_layers, scs_stages, generator_layers and proxy_tokens must be >= 1, region_slots >= 0")
        if cfg.emission_lr:
            raise SystemExit("emission_lr is ITA's: method=bga trains its emission layer at bga_lr")
    elif cfg.keep_budget:
        raise SystemExit("keep_budget weighs BGA's samplers: it needs method=bga")
    if cfg.emission_lr < 0 or cfg.keep_budget < 0:
        raise SystemExit("emission_lr and keep_budget must be >= 0")
    if cfg.view not in tagger.VIEWS:
        raise SystemExit(f"view must be one of {', '.join(tagger.VIEWS)}, got {cfg.view!r}")
    if cfg.cva and cfg.view == "text":
        raise SystemExit("cva=true needs an image-text view (--view caption|ocr|tags|all)")
    if cfg.temperature <= 0:
        raise SystemExit("temperature must be > 0")
    for path in (cfg.train, cfg.valid):
        if path and not storage.exists(path):
            raise SystemExit(f"not found: {path}")
    # workers run in other directories: relative paths would not resolve there
    cfg.train, cfg.valid = storage.absolute(cfg.train), storage.absolute(cfg.valid) if cfg.valid else ""
    if not cfg.valid:
        cfg.select_metric = ""
    trainer_config.validate(cfg)


def mner_files(path: str) -> tuple[list[str], int]:
    """The MNER shards under `path` (checked against the contract; tags required) and their rows."""
    files = storage.list_files(path)
    if not files:
        raise SystemExit(f"no Parquet files under {path}")
    for f in files:
        schema.check_schema(storage.read_schema(f), schema.MNER_SAMPLE, f, schema.MNER_REQUIRED + ("tags",))
    return files, sum(storage.parquet_num_rows(f) for f in files)


def read_rows(path: str, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every row of an MNER dataset (the view columns, tags and `extra` columns where present), in
    file order."""
    cols = ["sample_id", "tokens", "tags", "caption", "ocr", "object_tags", *extra]
    rows: list[dict[str, Any]] = []
    for f in mner_files(path)[0]:
        names = storage.read_schema(f).names
        rows.extend(storage.read_table(f, [c for c in cols if c in names]).to_pylist())
    return rows


def entity_types_of(path: str) -> list[str]:
    files = mner_files(path)[0]
    types: set[str] = set()
    for f in files:
        for tags in storage.read_table(f, ["tags"]).column("tags").to_pylist():
            types.update(spans.entity_types([tags or []]))
    return sorted(types)


@dataclasses.dataclass
class Batch:
    text: Any  # tagger.Encoding of the post alone
    with_view: Any | None  # tagger.Encoding of post + view (None for view=text)
    has_view: Any  # [B] bool: the post has a non-empty view
    gold: Any  # [B, W] BIOES label ids
    words: int


def ita_loss(forward: Any, crf: Any, batch: Batch, temperature: float | None) -> Any:
    """Per-post losses [B]: CRF NLL of the text+view input (of the text for view=text); with a CVA
    `temperature` T, posts with a view get 0.5 x NLL(text+view) + 0.5 x T^2 x KL(teacher || student)
    over the CRF marginals at T (teacher: text+view, detached; student: text only) and the others
    NLL(text). `forward` maps an encoding's inputs to emissions (the DeepSpeed engine in training).
    The number of forward passes depends on the settings only (1, or 2 with CVA), as ZeRO-3 needs."""
    import torch

    if batch.with_view is None:
        return crf.nll(forward(**tagger.model_inputs(batch.text)), batch.gold, batch.text.word_mask)
    emit_v = forward(**tagger.model_inputs(batch.with_view))
    row_loss = crf.nll(emit_v, batch.gold, batch.with_view.word_mask)
    if temperature is None:
        return row_loss
    t = temperature
    emit_t = forward(**tagger.model_inputs(batch.text))
    nll_t = crf.nll(emit_t, batch.gold, batch.text.word_mask)
    teacher = crf.marginals(emit_v.detach(), batch.with_view.word_mask, t)
    student = crf.marginals(emit_t, batch.text.word_mask, t)
    kl = crf_module.kl_divergence(teacher, student, batch.text.word_mask & batch.with_view.word_mask)
    return torch.where(batch.has_view, 0.5 * row_loss + 0.5 * t * t * kl, nll_t)


class MnerTask(TrainingTask):
    """ITA: encoder + CRF over the post's tokens, an image-text view, optional CVA."""

    sort_columns = ("sample_id",)
    columns = ("sample_id", "tokens", "tags", "caption", "ocr", "object_tags")
    group_names = ("text_only", "with_view")
    title = "ITA tagger training"

    def __init__(self, config: MnerTrainConfig, types: list[str]):
        super().__init__(config)
        self.types = types
        self.spec = tagger.TaggerSpec(types=types, view=config.view, max_length=config.max_length,
                                      encoder=config.encoder, cva=config.cva, temperature=config.temperature)
        self.length_columns = ("tokens",) + tagger.VIEW_COLUMNS[config.view]

    def validate(self) -> None:
        validate(self.config)

    def data_files(self) -> tuple[list[str], int]:
        files, rows = mner_files(self.config.train)
        present = set(storage.read_schema(files[0]).names)
        self.columns = tuple(c for c in type(self).columns if c in present)
        return files, rows

    def build_model(self, ds_config: dict[str, Any], device: str, dtype: Any) -> ModelParts:
        import torch

        cfg: MnerTrainConfig = self.config  # type: ignore[assignment]
        self.model, self.tokenizer = tagger.build(cfg.encoder, self.types, cfg.dropout, dtype)
        self.model.to(device)
        self.device = device
        self.labels = self.spec.labels
        self.valid_rows = read_rows(cfg.valid) if cfg.valid else []
        crf_params = list(self.model.crf.parameters())
        apart = list(self.model.emission.parameters()) if cfg.emission_lr else []  # emission_lr: its own group
        ids = {id(p) for p in crf_params + apart}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        groups = [{"params": rest, "lr": cfg.lr}, {"params": crf_params, "lr": cfg.crf_lr, "weight_decay": 0.0}]
        if apart:
            groups.append({"params": apart, "lr": cfg.emission_lr})
        torch.manual_seed(cfg.seed)
        return ModelParts(self.model, parameters=groups)

    def _view(self, row: Mapping[str, Any]) -> str:
        return tagger.view_text(row, self.config.view, self.tokenizer.sep_token or "|")

    def collate(self, rows: dict[str, np.ndarray]) -> Batch:
        import torch

        cfg: MnerTrainConfig = self.config  # type: ignore[assignment]
        n = len(rows["sample_id"])
        words = [list(rows["tokens"][i]) for i in range(n)]
        tags = [list(rows["tags"][i]) for i in range(n)]
        as_rows = [{k: rows[k][i] for k in rows} for i in range(n)]
        views = [self._view(r) for r in as_rows]
        has_view = torch.tensor([bool(v) for v in views])
        text = tagger.encode(self.tokenizer, words, None, cfg.max_length, self.device)
        with_view = None if cfg.view == "text" else tagger.encode(self.tokenizer, words, views, cfg.max_length,
                                                                   self.device)
        gold = tagger.gold_labels(tags, self.labels, text.word_mask.shape[1]).to(self.device)
        return Batch(text, with_view, has_view.to(self.device), gold, sum(len(w) for w in words))

    def loss(self, engine: Any, batch: Batch) -> tuple[Any, Any, Any]:
        cfg: MnerTrainConfig = self.config  # type: ignore[assignment]
        row_loss = ita_loss(engine, engine.module.crf, batch, cfg.temperature if cfg.cva else None)
        return row_loss.sum() / cfg.micro_batch_size, row_loss.detach(), batch.has_view.long()

    def counts(self, batch: Batch) -> Mapping[str, int]:
        return {"words": batch.words}

    def save_export(self, module: Any, state_dict: dict[str, Any], directory: str) -> None:
        tagger.save_export(module, state_dict, self.tokenizer, self.spec, directory)

    def export_info(self) -> dict[str, Any]:
        return {"encoder": self.config.encoder, "view": self.config.view, "cva": self.config.cva}

    def evaluate(self, engine: Any, step: int) -> Mapping[str, float] | None:
        """Validation F1 in both evaluation views; every rank scores rows rank::world."""
        import torch

        if not self.valid_rows:
            return None
        cfg: MnerTrainConfig = self.config  # type: ignore[assignment]
        mine, _, world = rank_share(self.valid_rows)
        views = self.eval_views()
        counts = torch.zeros(len(views), 3, dtype=torch.float64)
        # every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)
        batches = -(-len(self.valid_rows) // world // cfg.eval_batch_size) + 1
        for k in range(batches):
            chunk = mine[k * cfg.eval_batch_size:(k + 1) * cfg.eval_batch_size] or mine[:1]
            real = bool(mine[k * cfg.eval_batch_size:(k + 1) * cfg.eval_batch_size])
            for j, view in enumerate(views):
                pred = self.predict(engine, chunk, view)
                if real:
                    counts[j] += torch.tensor(spans.span_counts([r["tags"] for r in chunk], pred), dtype=torch.float64)
        counts = sum_over_ranks(counts, self.device)
        scores = {f"dev_f1_{v if v == 'text' else 'view'}": spans.f1(*map(int, counts[j].tolist()))
                  for j, v in enumerate(views)}
        return self.with_selection(scores)

    def eval_views(self) -> list[str]:
        """Evaluation views on valid: text-only input, and the text+view input where there is a view."""
        return tagger.evaluation_views(self.config.view)

    def with_selection(self, scores: dict[str, float]) -> dict[str, float]:
        """`dev_f1`, what model selection reads: the mean of the views' F1."""
        scores["dev_f1"] = float(np.mean(list(scores.values())))
        return scores

    def predict(self, engine: Any, rows: list[dict[str, Any]], view: str) -> list[list[str]]:
        return tagger.tag_rows(called(engine), self.tokenizer, rows, view, self.labels,
                               self.config.max_length, self.device)


def called(engine: Any) -> "_Called":
    """The DeepSpeed engine seen as a tagger by tagger.predict (forward through the engine)."""
    return _Called(engine, engine.module.crf)


class _Called:
    """The DeepSpeed engine seen as a Tagger by tagger.predict (forward through the engine)."""

    def __init__(self, engine: Any, crf: Any):
        self.engine, self.crf = engine, crf

    def __call__(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

