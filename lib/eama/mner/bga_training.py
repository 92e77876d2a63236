"""BGA-MNER's training as a task on the engine's trainer: ITA's data, trainer settings and
evaluation, with BGA's model, inputs and loss.

* Inputs: the post alone (no view appended), and each post's real visual source (image features
  from the frozen image encoder, else the caption proxy). In training a post with a source attends
  to its real features with probability `real_visual_prob`, else to the generated ones only, so
  the tagger learns both inference modes.
* Loss per post: CRF NLL + rec_weight x reconstruction + cycle_weight x cycle consistency (the
  generation losses only for posts with a visual source) + keep_budget x the samplers' keep rate
  (a sparsity term, 0 by default: without it nothing pushes SCS to drop anything).
* Metrics: each step logs the share of elements the samplers keep, per stage and modality
  (`scs_keep/text/stage1`, `scs_keep/visual/stage2`, ...; over every BGA layer).
* Learning rates: `lr` for the encoder, `crf_lr` for the CRF's scores, `bga_lr` for the new layers.
* Evaluation views on valid: `text` (the paper's inference, no visual input) and `visual`; model
  selection (`dev_f1`) reads the view `select_view` names: text (default), visual, or their mean.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np

from eama.engine import feature_cache
from eama.engine.training.metrics import RATIO_DENOMINATOR, RATIO_NUMERATOR
from eama.engine.training.task import ModelParts
from eama.mner import bga_tagger, tagger, training

log = logging.getLogger("eama.trainer")
KEEP_METRIC = "scs_keep"  # metrics key prefix of the samplers' keep rates
KEEP_MODALITIES = ("text", "visual")


class BgaTask(training.MnerTask):
    """BGA-MNER: encoder + BGA layers + CRF over the post's tokens."""

    columns = training.MnerTask.columns + ("image", "image_uri")
    group_names = ("text_only", "with_visual")
    title = "BGA-MNER tagger training"

    def __init__(self, config: training.MnerTrainConfig, types: list[str]):
        super().__init__(config, types)
        self.settings = bga_tagger.settings_of(config)
        self.spec.method, self.spec.bga = "bga", dataclasses.asdict(self.settings)
        self.spec.view, self.spec.cva = "text", False
        self.length_columns = ("tokens", "caption")  # the caption is the proxy's image side

    def build_model(self, ds_config: dict[str, Any], device: str, dtype: Any) -> ModelParts:
        import torch

        cfg: training.MnerTrainConfig = self.config  # type: ignore[assignment]
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = bga_tagger.build(cfg.encoder, self.types, self.settings, cfg.max_length,
                                                      cfg.dropout, dtype)
        self.model.to(device)
        self.device = device
        self.image_cache = feature_cache.FeatureCache(cfg.image_cache_mb)
        self.labels = self.spec.labels
        images = ("image", "image_uri") if self.settings.vision != "none" else ()
        self.valid_rows = training.read_rows(cfg.valid, images) if cfg.valid else []
        encoder_ids = {id(p) for p in self.model.encoder.parameters()}
        crf_ids = {id(p) for p in self.model.crf.parameters()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) in encoder_ids], "lr": cfg.lr},
            {"params": [p for p in trainable if id(p) in crf_ids], "lr": cfg.crf_lr, "weight_decay": 0.0},
            {"params": [p for p in trainable if id(p) not in encoder_ids | crf_ids], "lr": cfg.bga_lr},
        ]
        return ModelParts(self.model, parameters=groups)

    def collate(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        cfg: training.MnerTrainConfig = self.config  # type: ignore[assignment]
        n = len(rows["sample_id"])
        as_rows = [{k: rows[k][i] for k in rows} for i in range(n)]
        words = [list(r["tokens"]) for r in as_rows]
        text = tagger.encode(self.tokenizer, words, None, cfg.max_length, self.device)
        visual = bga_tagger.visual_inputs(as_rows, self.tokenizer, self.settings, self.device, self.image_cache)
        undecodable = visual.pop("undecodable")
        for i, why in undecodable.items():
            log.warning("sample %s: image does not decode (%s); it trains on its caption or text alone",
                        as_rows[i]["sample_id"], why)
        has = visual.pop("has_visual")
        visual["use_real"] = has & (torch.rand(n, device=has.device) < cfg.real_visual_prob)
        gold = tagger.gold_labels([list(r["tags"]) for r in as_rows], self.labels, text.word_mask.shape[1])
        return {"text": text, "visual": visual, "has_visual": has, "gold": gold.to(self.device),
                "words": sum(len(w) for w in words), "undecodable_images": len(undecodable)}

    def loss(self, engine: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        cfg: training.MnerTrainConfig = self.config  # type: ignore[assignment]
        text = batch["text"]
        emissions, losses = engine(**tagger.model_inputs(text), **batch["visual"], with_losses=True)
        nll = engine.module.crf.nll(emissions.float(), batch["gold"], text.word_mask)
        row_loss = nll + cfg.rec_weight * losses.reconstruction.float() + cfg.cycle_weight * losses.cycle.float()
        if cfg.keep_budget:
            row_loss = row_loss + cfg.keep_budget * losses.keep_rate.float()
        batch["keep_counts"] = {k: (float(kept), float(there)) for k, (kept, there) in losses.keep_counts.items()}
        return row_loss.sum() / cfg.micro_batch_size, row_loss.detach(), batch["has_visual"].long()

    def counts(self, batch: dict[str, Any]) -> Mapping[str, float]:
        """Words, undecodable images, and the samplers' kept / there counts per stage and modality
        (every key on every batch, zeros where a batch has none: the step's counts are all-reduced)."""
        out: dict[str, float] = {"words": batch["words"], "undecodable_images": batch["undecodable_images"]}
        found = batch.get("keep_counts", {})
        for modality in KEEP_MODALITIES:
            for stage in range(1, self.settings.scs_stages + 1):
                kept, there = found.get(f"{modality}/stage{stage}", (0.0, 0.0))
                out[f"{KEEP_METRIC}/{modality}/stage{stage}{RATIO_NUMERATOR}"] = kept
                out[f"{KEEP_METRIC}/{modality}/stage{stage}{RATIO_DENOMINATOR}"] = there
        return out

    def export_info(self) -> dict[str, Any]:
        cfg: training.MnerTrainConfig = self.config  # type: ignore[assignment]
        return {"encoder": cfg.encoder, "method": "bga", "vision": cfg.vision, "scs": cfg.scs,
                "cycle_weight": cfg.cycle_weight, "rec_weight": cfg.rec_weight, "keep_budget": cfg.keep_budget}

    def eval_views(self) -> list[str]:
        return list(bga_tagger.VIEWS)

    def with_selection(self, scores: dict[str, float]) -> dict[str, float]:
        view = self.config.select_view
        if view == "mean":
            scores["dev_f1"] = float(np.mean(list(scores.values())))
        else:
            scores["dev_f1"] = scores["dev_f1_text" if view == "text" else "dev_f1_view"]
        return scores

    def predict(self, engine: Any, rows: list[dict[str, Any]], view: str) -> list[list[str]]:
        return bga_tagger.tag_rows(training.called(engine), self.tokenizer, self.spec, rows, view, self.device,
                                   self.image_cache)

