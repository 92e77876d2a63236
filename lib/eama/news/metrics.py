"""Caption metrics the way Transform-and-Tell reports them.

* Text metrics: pycocoevalcap's own scorers (Bleu(4), Meteor(), Rouge(), Cider()), each fed the
  whole scored set at once. Captions are preprocessed like Transform-and-Tell's compute_metrics.py:
  every character that is neither a word character nor whitespace is removed (all ASCII and
  Unicode punctuation and symbols), case is kept, no PTB tokenizer; whitespace is then collapsed to
  single spaces (TaT skipped this step; it only matters for ROUGE-L, whose scorer splits on " ").
  BLEU uses the 'closest' reference length (pycocoevalcap's Bleu.compute_score hard-codes it).
  `Cider` is CIDEr-D (clipped counts, Gaussian length penalty, sigma 6); its idf comes from the
  scored references, so it is a corpus-level number.
* Entities: exact, case-sensitive (text, label) matches of spaCy entities, pooled over the set; see
  `pooled_entity_counts` for the rule.

All scores here are raw (fractions; CIDEr on its own scale); reports multiply by 100.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from eama.engine import schema
from eama.engine.entities import DEFAULT_SPACY_MODEL, extract_entities, load_nlp

log = logging.getLogger(__name__)

_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")

TEXT_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def preprocess(text: str) -> str:
    """Transform-and-Tell's caption preprocessing: strip punctuation, keep case, collapse spaces."""
    return _SPACES.sub(" ", _NOT_WORD_OR_SPACE.sub("", text)).strip()


# ---------------------------------------------------------------- text metrics (pycocoevalcap)


def _as_coco(references: Sequence[str], generations: Sequence[str]) -> tuple[dict, dict]:
    """pycocoevalcap's (gts, res) dicts, keyed by position so duplicate sample ids cannot collide."""
    gts = {i: [preprocess(r)] for i, r in enumerate(references)}
    res = {i: [preprocess(g)] for i, g in enumerate(generations)}
    return gts, res


def meteor_score(gts: dict, res: dict, timeout_s: float = 600.0) -> tuple[float | None, str | None]:
    """(METEOR, None), or (None, why) when Java is missing, the jar fails or it exceeds `timeout_s`."""
    if shutil.which("java") is None:
        return None, "java not found on PATH (METEOR 1.5 runs as a Java jar)"
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except Exception as exc:  # noqa: BLE001 - any start-up failure makes METEOR unavailable
        return None, f"METEOR failed to start: {exc}"
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["score"] = float(scorer.compute_score(gts, res)[0])
        except Exception as exc:  # noqa: BLE001 - e.g. the JVM died: empty or broken pipe
            result["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=work, name="meteor", daemon=True)
    thread.start()
    thread.join(timeout_s)
    _close_meteor(scorer)
    if "score" in result:
        return result["score"], None
    return None, f"METEOR failed: {result.get('error', f'no answer within {timeout_s:g} s')}"


def _close_meteor(scorer: Any) -> None:
    """Stop the jar and free the scorer's lock (its __del__ would otherwise block after a failure)."""
    process = scorer.meteor_p
    for step in (process.stdin.close, process.kill, lambda: process.wait(timeout=10)):
        try:
            step()
        except Exception:  # noqa: BLE001 - a dead jar: broken pipe, already reaped
            pass
    if scorer.lock.locked():
        scorer.lock.release()


def caption_scores(
    references: Sequence[str], generations: Sequence[str], meteor: bool = True, meteor_timeout_s: float = 600.0
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of generations against one reference each.

    Returns (scores, unavailable): a metric that could not be computed is None in `scores` and its
    reason is in `unavailable`."""
    if len(references) != len(generations):
        raise ValueError(f"{len(references)} references but {len(generations)} generations")
    if not references:
        return dict.fromkeys(TEXT_METRICS), dict.fromkeys(TEXT_METRICS, "no rows to score")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _as_coco(references, generations)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    unavailable: dict[str, str] = {}
    if meteor:
        scores["METEOR"], reason = meteor_score(gts, res, meteor_timeout_s)
    else:
        scores["METEOR"], reason = None, "disabled by config (meteor=false)"
    if reason:
        unavailable["METEOR"] = reason
    return {k: scores[k] for k in TEXT_METRICS}, unavailable


# ---------------------------------------------------------------- entity precision / recall

COUNT_KEYS = ("generated", "generated_matched", "reference", "reference_matched")


def _key(entity: Mapping[str, Any]) -> tuple[str, str]:
    return entity["text"], entity["label"]


def pooled_entity_counts(
    references: Iterable[Sequence[Mapping[str, Any]] | None],
    generations: Iterable[Sequence[Mapping[str, Any]] | None],
    known_texts: set[str] | None = None,
) -> dict[str, Counter]:
    """Transform-and-Tell's entity counting, per label, summed ("pooled") over the whole set.

    Per sample, entities are *lists of mentions*, duplicates included. A generated mention counts as
    matched when the same sample's reference has a mention with the exact, case-sensitive same
    (text, label), and vice versa; a mention repeated twice counts twice, even against a single
    mention on the other side. So precision = sum(matched generated) / sum(generated) and
    recall = sum(matched reference) / sum(reference) over all samples (micro-averaged), and the two
    numerators may differ. (Per-sample sets or multiset intersections give other numbers: on the 40
    NYTimes800k generations only this rule gives precision 27/112 and recall 26/108.)

    With `known_texts` (entity texts seen in training captions), mentions whose text is not among
    them are also counted under the `rare_` keys. Returns {key: Counter(label -> count)} for keys
    COUNT_KEYS and, with `known_texts`, their `rare_` forms. None stands for no entities.
    """
    keys = COUNT_KEYS + tuple(f"rare_{k}" for k in COUNT_KEYS) if known_texts is not None else COUNT_KEYS
    counts: dict[str, Counter] = {k: Counter() for k in keys}
    for ref, gen in zip(references, generations, strict=True):
        ref, gen = ref or [], gen or []
        ref_keys, gen_keys = {_key(e) for e in ref}, {_key(e) for e in gen}
        for side, mentions, other in (("generated", gen, ref_keys), ("reference", ref, gen_keys)):
            for e in mentions:
                matched = _key(e) in other
                rare = known_texts is not None and e["text"] not in known_texts
                for prefix in ("", "rare_") if rare else ("",):
                    counts[f"{prefix}{side}"][e["label"]] += 1
                    counts[f"{prefix}{side}_matched"][e["label"]] += matched
    return counts


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def prf(generated: int, generated_matched: int, reference: int, reference_matched: int) -> dict[str, Any]:
    """Precision, recall and their harmonic mean (None where a denominator is 0), with the counts."""
    p, r = _ratio(generated_matched, generated), _ratio(reference_matched, reference)
    if p is None or r is None:
        f1 = None
    else:
        f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {
        "precision": p, "recall": r, "f1": f1,
        "generated_matched": generated_matched, "generated": generated,
        "reference_matched": reference_matched, "reference": reference,
    }


def _prf_of(counts: Mapping[str, Counter], prefix: str = "", label: str | None = None) -> dict[str, Any]:
    def get(key: str) -> int:
        c = counts[prefix + key]
        return int(c[label]) if label is not None else int(sum(c.values()))

    return prf(**{k: get(k) for k in COUNT_KEYS})


def entity_summary(counts: Mapping[str, Counter]) -> dict[str, Any]:
    """{"all": prf, "by_label": {label: prf}, "rare": prf or None} from `pooled_entity_counts`."""
    labels = sorted(set(counts["generated"]) | set(counts["reference"]))
    return {
        "all": _prf_of(counts),
        "by_label": {label: _prf_of(counts, label=label) for label in labels},
        "rare": _prf_of(counts, prefix="rare_") if "rare_generated" in counts else None,
    }


# ---------------------------------------------------------------- entity extraction (spaCy, Ray)


def entity_array(entities: Sequence[Sequence[Mapping[str, Any]] | None]) -> pa.Array:
    return pa.array(entities, type=pa.list_(schema.ENTITY))


class EntityTagger:
    """Ray Data actor: loads the spaCy pipeline once and adds the entities of each text column."""

    def __init__(self, columns: Sequence[str], spacy_model: str = DEFAULT_SPACY_MODEL, batch_size: int = 64):
        self.columns = list(columns)
        self.batch_size = batch_size
        self.nlp = load_nlp(spacy_model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = {"__row": batch.column("__row")}
        for name in self.columns:
            texts = [t or "" for t in batch.column(name).to_pylist()]
            out[name] = entity_array(extract_entities(self.nlp, texts, self.batch_size))
        return pa.table(out)


def _ensure_ray() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray


def _tag_with_ray(
    table: pa.Table, columns: Sequence[str], spacy_model: str, batch_size: int, pool_size: int, num_cpus: float
) -> pa.Table:
    ray = _ensure_ray()
    from ray.data import ActorPoolStrategy

    block_rows = max(batch_size * 4, 1)
    blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]
    ds = ray.data.from_arrow(blocks).map_batches(
        EntityTagger,
        fn_constructor_kwargs={"columns": list(columns), "spacy_model": spacy_model, "batch_size": 64},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=pool_size),
        num_cpus=num_cpus,
    )
    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(parts).sort_by("__row")


def tag_entities(
    texts: Mapping[str, Sequence[str | None]],
    spacy_model: str = DEFAULT_SPACY_MODEL,
    use_ray: bool = False,
    batch_size: int = 256,
    pool_size: int = 1,
    num_cpus: float = 0.5,
) -> dict[str, list[list[dict]]]:
    """spaCy entities of every text, per named column of equally long text lists, in input order.

    With `use_ray`, a Ray Data actor pool (`pool_size` actors of `num_cpus` each, spaCy loaded once
    per actor) does the work; otherwise it runs in this process."""
    names = list(texts)
    n = len(texts[names[0]]) if names else 0
    if n == 0:
        return {name: [] for name in names}
    if not use_ray:
        nlp = load_nlp(spacy_model)
        return {name: extract_entities(nlp, [t or "" for t in texts[name]]) for name in names}
    table = pa.table({"__row": pa.array(range(n), pa.int64()), **{k: pa.array(v, pa.string()) for k, v in texts.items()}})
    tagged = _tag_with_ray(table, names, spacy_model, batch_size, pool_size, num_cpus)
    if tagged.num_rows != n:
        raise RuntimeError(f"entity extraction returned {tagged.num_rows} rows for {n} texts")
    return {name: [list(v or []) for v in tagged.column(name).to_pylist()] for name in names}
