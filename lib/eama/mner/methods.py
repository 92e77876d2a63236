"""The two MNER methods behind one face: ITA (`training`, `tagger`) and BGA-MNER (`bga_training`,
`bga_tagger`). Jobs train, load and tag through here; `method` in the training settings and in an
export's spec says which one.
"""

from __future__ import annotations

from typing import Any, Sequence

from eama.engine.training import launch
from eama.engine.training.order import steps_per_epoch
from eama.mner import bga_tagger, bga_training, tagger, training

VIEWS = tuple(dict.fromkeys(tagger.VIEWS + bga_tagger.VIEWS))  # every inference view of either method


def fit(cfg: training.MnerTrainConfig) -> Any:
    """Train (or resume) a tagger of either method; returns Ray Train's Result."""
    training.validate(cfg)
    types = training.entity_types_of(cfg.train)
    if not types:
        raise SystemExit(f"{cfg.train}: the training rows tag no entities")
    task = (bga_training.BgaTask if cfg.method == "bga" else training.MnerTask)(cfg, types)
    if cfg.valid and cfg.eval_per_epoch:
        cfg.eval_every = steps_per_epoch(training.mner_files(cfg.train)[1], cfg)
    return launch.fit(task)


def load(location: str, device: str = "cpu") -> tuple[Any, Any, tagger.TaggerSpec]:
    """A tagger export (local folder or s3://) of either method, ready for inference."""
    if tagger.read_spec(location).method == "bga":
        return bga_tagger.load(location, device)
    return tagger.load(location, device)


def tag_with(model: Any, tokenizer: Any, spec: tagger.TaggerSpec, rows: Sequence[dict[str, Any]], view: str,
             device: Any = "cpu") -> list[list[str]]:
    """BIO tags of MNER rows by a loaded tagger of either method, in evaluation view `view`."""
    if spec.method == "bga":
        return bga_tagger.tag_rows(model, tokenizer, spec, rows, view, device)
    return tagger.tag_rows(model, tokenizer, rows, view, spec.labels, spec.max_length, device)


def views_of(spec: tagger.TaggerSpec) -> tuple[str, ...]:
    """The evaluation views a tagger accepts at inference."""
    return bga_tagger.VIEWS if spec.method == "bga" else tagger.VIEWS
