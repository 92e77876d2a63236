"""The ITA tagger: a pretrained transformer encoder, first-subtoken pooling, a linear emission layer
and a CRF over the post's tokens (BIOES labels), with an image-text view appended as the second
segment of the encoder's input (after its separator token; view positions get no tag, no loss and no
prediction). Also how a trained tagger is exported and loaded back (a Hugging Face-style folder).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from eama.engine import encoders
from eama.mner import crf as crf_module
from eama.mner import spans

VIEWS = ("text", "caption", "ocr", "tags", "all")
# the sample columns each view reads (`view_text`)
VIEW_COLUMNS = {"text": (), "caption": ("caption",), "ocr": ("ocr",), "tags": ("object_tags",),
                "all": ("caption", "ocr", "object_tags")}
SPEC_FILE = "eama_mner.json"


@dataclasses.dataclass
class TaggerSpec:
    """What an export records besides its weights: labels, the view it was trained with, limits."""

    types: list[str]  # entity types, sorted
    view: str = "text"  # the image-text view appended at training: text | caption | ocr | tags | all
    max_length: int = 256  # subtokens per input (text + view)
    encoder: str = ""  # what the encoder was loaded from
    cva: bool = False
    temperature: float = 1.0
    method: str = "ita"  # ita | bga
    bga: dict[str, Any] | None = None  # BGA-MNER's settings (bga.BgaSpec) for method=bga

    @property
    def labels(self) -> list[str]:
        return spans.bioes_labels(self.types)


class Tagger(nn.Module):
    """Encoder -> first subtoken of every word -> dropout -> linear -> CRF emissions."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.emission = nn.Linear(encoder.config.hidden_size, num_labels)
        self.crf = crf_module.CRF(num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Emission scores [B, W, L] of each word's first subtoken."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.emission(self.dropout(first_subtokens(hidden, word_index)))


def evaluation_views(view: str) -> list[str]:
    """ITA's two evaluation views of a tagger trained with `view`: text-only input, and the
    text+view input where there is a view (ITA's Table 1)."""
    return ["text"] + ([view] if view != "text" else [])


def first_subtokens(hidden: torch.Tensor, word_index: torch.Tensor) -> torch.Tensor:
    """Each word's first-subtoken feature [B, W, h] from subtoken features [B, T, h]."""
    return hidden.gather(1, word_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def view_text(row: dict[str, Any], view: str, separator: str) -> str:
    """The image-text view of a row as one string ('' when the row has none): a caption, the OCR
    text, the object tags, or all of them joined by the encoder's separator token."""
    if view == "text":
        return ""
    parts = {
        "caption": (row.get("caption") or "").strip(),
        "ocr": (row.get("ocr") or "").strip(),
        "tags": " ".join(row.get("object_tags") or []).strip(),
    }
    if view == "all":
        return f" {separator} ".join(p for p in parts.values() if p)
    return parts[view]


class Encoding(dict):
    """Model inputs of a batch (tensors) plus the word mask [B, W]: words that got a position."""


def encode(tokenizer: Any, words: Sequence[Sequence[str]], views: Sequence[str] | None, max_length: int,
           device: Any = "cpu") -> Encoding:
    """Tokenise posts (as words), with `views` each post's view as the second segment (an empty view
    leaves the segment empty). A pair that is too long loses view words first, then the post's last
    words (which get no position, hence O). Words with no subtoken (a lone control or space
    character) are read as the unknown token."""
    words = [[w if _has_pieces(tokenizer, w) else tokenizer.unk_token for w in ws] for ws in words]
    kwargs: dict[str, Any] = dict(is_split_into_words=True, padding=True, max_length=max_length, return_tensors="pt")
    if views is not None:
        second = [v.split() for v in views]
        try:
            enc = tokenizer(list(words), second, truncation="only_second", **kwargs)
        except Exception:  # noqa: BLE001 - a post alone longer than max_length
            enc = tokenizer(list(words), second, truncation="longest_first", **kwargs)
    else:
        enc = tokenizer(list(words), truncation=True, **kwargs)
    longest = max(1, max(len(ws) for ws in words))
    word_index = torch.zeros(len(words), longest, dtype=torch.long)
    word_mask = torch.zeros(len(words), longest, dtype=torch.bool)
    for b in range(len(words)):
        seq = enc.sequence_ids(b)
        for pos, w in enumerate(enc.word_ids(b)):
            if w is not None and seq[pos] == 0 and not word_mask[b, w]:
                word_index[b, w], word_mask[b, w] = pos, True
    out = Encoding(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], word_index=word_index)
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    out = Encoding({k: v.to(device) for k, v in out.items()})
    out.word_mask = word_mask.to(device)  # type: ignore[attr-defined]
    return out


def _has_pieces(tokenizer: Any, word: str) -> bool:
    cache = tokenizer.__dict__.setdefault("_eama_pieces", {})
    if word not in cache:
        cache[word] = bool(tokenizer.tokenize(word))
    return cache[word]


def model_inputs(enc: Encoding) -> dict[str, torch.Tensor]:
    return {k: v for k, v in enc.items()}


def gold_labels(tags: Sequence[Sequence[str]], labels: Sequence[str], width: int) -> torch.Tensor:
    """BIO gold tags -> BIOES label ids [B, width] (pads: O)."""
    index = {l: i for i, l in enumerate(labels)}
    out = torch.zeros(len(tags), width, dtype=torch.long)
    for b, t in enumerate(tags):
        bioes = spans.to_bioes(spans.bio_spans(t), len(t))
        out[b, :len(t)] = torch.tensor([index[x] for x in bioes[:width]], dtype=torch.long)
    return out


def predict(model: Any, enc: Encoding, labels: Sequence[str], lengths: Sequence[int],
            extra: dict[str, Any] | None = None) -> list[list[str]]:
    """BIO tags per post: Viterbi over the words that got a position; the others are O. `extra`:
    further model inputs (BGA's visual ones)."""
    emissions = model(**model_inputs(enc), **(extra or {}))
    mask = enc.word_mask  # type: ignore[attr-defined]
    paths = model.crf.decode(emissions.float(), mask | ~mask.any(1, keepdim=True))
    out = []
    for b, n in enumerate(lengths):
        real = int(mask[b].sum())
        bioes = [labels[i] for i in paths[b][:real]] + ["O"] * (n - real)
        out.append(spans.to_bio(spans.bioes_spans(bioes), n))
    return out


def tag_rows(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], view: str, labels: Sequence[str],
             max_length: int, device: Any = "cpu") -> list[list[str]]:
    """BIO tags of MNER rows (tokens + their `view`, 'text' for none): encode, forward, Viterbi.
    `model` is a Tagger or anything called like one that has its `crf` (the DeepSpeed engine)."""
    words = [list(r["tokens"]) for r in rows]
    views = None if view == "text" else [view_text(r, view, tokenizer.sep_token or "|") for r in rows]
    enc = encode(tokenizer, words, views, max_length, device)
    return predict(model, enc, labels, [len(w) for w in words])


# ---------------------------------------------------------------- building, export and loading


def build(encoder_name: str, types: Sequence[str], dropout: float = 0.1, dtype: Any = None) -> tuple[Tagger, Any]:
    """A tagger on a pretrained encoder (preset, hub id, local or s3:// folder) and its tokenizer."""
    encoder, tokenizer = encoders.load_pretrained(encoder_name, dtype)
    return Tagger(encoder, len(spans.bioes_labels(types)), dropout), tokenizer


def save_export(module: Tagger, state_dict: dict[str, Any], tokenizer: Any, spec: TaggerSpec, directory: str) -> None:
    """The encoder's config and tokenizer, the whole tagger's weights (safetensors) and the spec."""
    encoders.save_model_folder(module.encoder.config, tokenizer, state_dict, dataclasses.asdict(spec), SPEC_FILE,
                               directory)


def read_spec(location: str) -> TaggerSpec:
    """The spec of a tagger export (local folder or s3://, fetched once into the cache)."""
    return TaggerSpec(**encoders.read_model_spec(location, SPEC_FILE, "jobs/train_mner.py"))


def load(location: str, device: str = "cpu") -> tuple[Tagger, Any, TaggerSpec]:
    """An ITA tagger export (local folder or s3://) ready for inference."""
    spec = read_spec(location)
    encoder, tokenizer, load_weights = encoders.load_model_folder(location)
    model = Tagger(encoder, len(spec.labels))
    load_weights(model)
    model.to(device).eval()
    return model, tokenizer, spec
