"""The MM-MKP keyphrase model: a pretrained text encoder over `post [SEP] OCR [SEP] visual entities`
(with a learned segment embedding per part), multi-granularity image noise filtering, a keyphrase
classifier and a GRU decoder with an extended copy mechanism; beam search; export and loading.

* Encoder: token states of the three parts; the pooled state is their masked mean (image-derived
  tokens, OCR and visual entities, weighted by the coarse gate below).
* Coarse filtering: a gate g in [0, 1], the given image-text matching probability where the row has
  one, else a matching head on (pooled text, mean region). It scales the image's region context and,
  in the decoder's attention, adds log g to the image-derived tokens' scores. `gate=fixed` sets
  g = 1 (the ablation without the coarse filter).
* Fine filtering (rows with an image, `regions`): a text -> region attention over the projected
  7x7 grid; in training it is pulled toward the keyphrase -> region attention (summed squared
  error, as MM-MKP's released code), whose query is the gold keyphrases' mean word embedding through
  its own fixed projection, not the student's: a target that shared the student's query could
  collapse to uniform with it and take the loss to zero. The gated region context is one more
  memory slot and is added to the pooled state.
* Classifier over the training keyphrase vocabulary (soft-target cross-entropy over a post's gold
  keyphrases that are in it).
* Decoder: one keyphrase per sequence ([CLS] as start, [SEP] as end), a GRU fed the encoder's word
  embeddings, Luong attention over the input, a second attention over the tokens of the classifier's
  top-k keyphrases (scored with the classifier's log-probability), output tied to the word
  embeddings; a switch mixes generating, copying from the input and copying from the classifier's
  predictions (mode=generate: the first two only).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn

from eama.engine import encoders

SPEC_FILE = "eama_keyphrase.json"
MODES = ("joint", "classify", "generate")
JOINT_RANKS = ("sum", "beams_first")
INPUTS = ("text", "all", "ocr", "entities")  # the post alone | + OCR + visual entities | + OCR only | + visual entities only
GATES = ("match", "fixed")  # the coarse gate: the matching probability (given, else the matching head) | g = 1
TARGET_SEED = 2309_04734  # seeds the keyphrase -> region attention's fixed query projection (the same in every run)
POST, OCR, ENTITIES = 0, 1, 2
NEG = -1e9


@dataclasses.dataclass
class KeyphraseSpec:
    """What an export records besides its weights."""

    classes: list[str]  # the keyphrase vocabulary of the classifier (training keyphrases, most frequent first)
    mode: str = "joint"  # joint | classify | generate
    inputs: str = "all"  # text (the post alone) | all (post + OCR + visual entities) | ocr (post + OCR) | entities (post + visual entities)
    images: bool = True  # use region features where a row has an image
    max_length: int = 128  # subtokens of the whole input
    max_phrase_tokens: int = 8  # subtokens of one keyphrase (generation stops there)
    copy_top_k: int = 5  # classifier predictions the decoder may copy from
    beam_size: int = 10
    top_n: int = 10  # keyphrases per post in the output
    encoder: str = ""  # what the encoder was loaded from
    region_dim: int = 1280  # width of a region feature (EfficientNet-Lite0's grid)
    joint_rank: str = "sum"  # mode=joint: sum (generation + classifier probability per phrase) | beams_first
    gate: str = "match"  # coarse filter: match (the matching probability) | fixed (g = 1)

    def uses(self, part: str) -> bool:
        """Whether the input holds `part` ("ocr" or "entities") besides the post."""
        return self.inputs == "all" or self.inputs == part


@dataclasses.dataclass
class Inputs:
    """One batch of posts as tensors (see `encode_inputs`)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    segments: torch.Tensor  # [B, T] POST | OCR | ENTITIES
    match: torch.Tensor  # [B] given matching probability, NaN where none
    regions: torch.Tensor | None = None  # [B, R, region_dim]
    has_image: torch.Tensor | None = None  # [B] bool

    def to(self, device: Any) -> "Inputs":
        return Inputs(*(None if v is None else v.to(device) for v in dataclasses.astuple(self)))


@dataclasses.dataclass
class Memory:
    states: torch.Tensor  # [B, T(+1), h] what the decoder attends to
    bias: torch.Tensor  # [B, T(+1)] added to attention scores (-inf-ish pads, log gate on image-derived tokens)
    source_ids: torch.Tensor  # [B, T(+1)] vocabulary ids copied from (the region slot copies the pad id)
    pooled: torch.Tensor  # [B, h]
    class_logits: torch.Tensor  # [B, C]
    region_attention: torch.Tensor | None  # [B, R] text -> region attention (rows with an image)
    region_states: torch.Tensor | None  # [B, R, h] projected regions


@dataclasses.dataclass
class Targets:
    """Training targets of a batch: one decoder sequence per (post, gold keyphrase) pair."""

    pair_post: torch.Tensor  # [P] the pair's post
    decoder_in: torch.Tensor  # [P, L] [CLS] + keyphrase tokens
    decoder_out: torch.Tensor  # [P, L] keyphrase tokens + [SEP]
    decoder_mask: torch.Tensor  # [P, L]
    class_target: torch.Tensor  # [B, C] each post's gold classes, rows summing to 1 (or 0: none in the vocabulary)

    def to(self, device: Any) -> "Targets":
        return Targets(*(v.to(device) for v in dataclasses.astuple(self)))


@dataclasses.dataclass
class LossWeights:
    generation: float = 1.0
    classification: float = 1.0
    region_attention: float = 1.0


class KeyphraseModel(nn.Module):
    def __init__(self, encoder: nn.Module, class_ids: torch.Tensor, class_mask: torch.Tensor, mode: str = "joint",
                 region_dim: int = 1280, dropout: float = 0.1, gate: str = "match"):
        super().__init__()
        h = encoder.config.hidden_size
        self.encoder = encoder
        self.mode = mode
        self.gate_mode = gate
        self.copy_top_k = 5
        self.weights = LossWeights()
        self.register_buffer("class_ids", class_ids)
        self.register_buffer("class_mask", class_mask)
        self.segment = nn.Embedding(3, h)
        nn.init.zeros_(self.segment.weight)
        self.region_proj = nn.Linear(region_dim, h)
        self.match_head = nn.Linear(2 * h, 1)
        self.region_query = nn.Linear(h, h, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.eos_id = 0
        self.classifier = nn.Linear(h, max(1, class_ids.shape[0]))
        self.bridge = nn.Linear(h, h)
        self.decoder = nn.GRU(h, h, batch_first=True)
        self.attend = nn.Linear(h, h, bias=False)
        self.class_attend = nn.Linear(h, h, bias=False)
        self.combine = nn.Linear(3 * h, h)
        self.switch = nn.Linear(3 * h, 3)
        # the keyphrase -> region attention's own query projection: fixed (the target is detached, so
        # nothing would train it), seeded apart from torch's stream, and not saved (rebuilt identically)
        generator = torch.Generator().manual_seed(TARGET_SEED)
        self.register_buffer("keyphrase_query", torch.randn(h, h, generator=generator) / math.sqrt(h), persistent=False)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.encoder.get_input_embeddings()

    def forward(self, inputs: Inputs, targets: Targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-post training loss [B] and its parts: the mean over the post's keyphrases of their
        summed token NLL (generation), soft-target cross-entropy (classification), summed squared
        error of the text -> region attention against the keyphrase -> region one (rows with an
        image), weighted by `self.weights`; mode=classify trains the classifier alone."""
        memory = self.encode(inputs)
        B = memory.pooled.shape[0]
        parts: dict[str, torch.Tensor] = {}
        logp = torch.log_softmax(memory.class_logits.float(), -1)
        parts["classification"] = -(targets.class_target * logp).sum(-1)
        total = self.weights.classification * parts["classification"]
        if self.mode != "classify" and targets.pair_post.numel():
            classes = self.class_memory(memory, self.copy_top_k) if self.mode == "joint" else None
            hidden = self.start_state(memory, targets.pair_post)
            step_logp, _ = self.step_log_probs(memory, targets.pair_post, targets.decoder_in, hidden, classes)
            nll = -step_logp.float().gather(2, targets.decoder_out.unsqueeze(-1)).squeeze(-1)
            per_pair = (nll * targets.decoder_mask).sum(1)
            pairs = torch.zeros(B, device=nll.device).index_add(0, targets.pair_post, torch.ones_like(per_pair))
            parts["generation"] = torch.zeros(B, device=nll.device).index_add(0, targets.pair_post, per_pair) \
                / pairs.clamp_min(1)
            total = total + self.weights.generation * parts["generation"]
        if memory.region_attention is not None and targets.pair_post.numel():
            want = self.region_target(memory, targets.decoder_out, targets.decoder_mask.bool()
                                      & (targets.decoder_out != self.eos_id), targets.pair_post)
            has = inputs.has_image if inputs.has_image is not None else torch.ones(B, dtype=torch.bool)
            parts["region_attention"] = ((memory.region_attention - want) ** 2).sum(-1) * has.to(want.dtype)
            total = total + self.weights.region_attention * parts["region_attention"]
        return total, parts

    # ---------------------------------------------------------------- encoder side

    def gate(self, inputs: Inputs, pooled: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
        """Coarse image-text gate [B]: the given probability, else the matching head (needs regions),
        else 1; always 1 with gate=fixed."""
        if self.gate_mode == "fixed":
            return torch.ones_like(inputs.match, dtype=pooled.dtype)
        given = torch.nan_to_num(inputs.match, nan=-1.0)
        if regions is not None:
            head = torch.sigmoid(self.match_head(torch.cat([pooled, regions.mean(1)], -1))).squeeze(-1)
        else:
            head = torch.ones_like(given)
        return torch.where(given >= 0, given.clamp(1e-4, 1.0), head)

    def encode(self, inputs: Inputs) -> Memory:
        emb = self.embeddings(inputs.input_ids) + self.segment(inputs.segments)
        states = self.encoder(inputs_embeds=emb, attention_mask=inputs.attention_mask).last_hidden_state
        mask = inputs.attention_mask.bool()
        derived = mask & (inputs.segments != POST)
        text_pooled = _masked_mean(states, mask & ~derived)
        regions = None
        if inputs.regions is not None:
            regions = self.region_proj(inputs.regions.to(states.dtype))
        g = self.gate(inputs, text_pooled, regions)
        weight = torch.where(derived, g[:, None], mask.to(states.dtype))
        pooled = (states * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1e-6)
        bias = torch.where(mask, torch.where(derived, torch.log(g)[:, None], 0.0), NEG).to(states.dtype)
        source_ids = inputs.input_ids
        attention = None
        if regions is not None:
            has = inputs.has_image if inputs.has_image is not None else torch.ones_like(g, dtype=torch.bool)
            q = self.region_query(text_pooled)
            attention = torch.softmax((regions @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1]), -1)
            context = (attention.unsqueeze(-1) * regions).sum(1) * (g * has)[:, None]
            pooled = pooled + context
            states = torch.cat([states, context.unsqueeze(1)], 1)
            bias = torch.cat([bias, torch.where(has, 0.0, NEG).to(states.dtype)[:, None]], 1)
            pad = torch.zeros_like(source_ids[:, :1])
            source_ids = torch.cat([source_ids, pad], 1)
        logits = self.classifier(self.dropout(pooled))
        return Memory(states, bias, source_ids, pooled, logits, attention, regions)

    def region_target(self, memory: Memory, phrase_ids: torch.Tensor, phrase_mask: torch.Tensor,
                      pair_post: torch.Tensor) -> torch.Tensor:
        """Keyphrase -> region attention [B, R] (detached target): each post's gold keyphrases' mean
        word embedding, through the target's own fixed projection (independent of the student's
        `region_query`), as the query over the projected regions."""
        assert memory.region_states is not None
        emb = _masked_mean(self.embeddings(phrase_ids), phrase_mask)  # [P, h]
        per_post = torch.zeros_like(memory.pooled).index_add(0, pair_post, emb)
        count = torch.zeros(memory.pooled.shape[0], device=emb.device).index_add(
            0, pair_post, torch.ones_like(pair_post, dtype=emb.dtype))
        q = (per_post / count.clamp_min(1)[:, None]) @ self.keyphrase_query.to(emb.dtype).t()
        # unscaled dot products: divided by sqrt(h) as the student's are, the target starts within a
        # few percent of uniform and leaves the loss near zero from the first step
        scores = (memory.region_states @ q.unsqueeze(-1)).squeeze(-1)
        return torch.softmax(scores, -1).detach()

    # ---------------------------------------------------------------- decoder side

    def class_memory(self, memory: Memory, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tokens of each post's top-k classes: (states [B, K*L, h], bias [B, K*L], ids [B, K*L]).
        The bias is the class's (detached) log-probability; pads get -inf-ish."""
        k = min(k, memory.class_logits.shape[1])
        logp = torch.log_softmax(memory.class_logits.detach().float(), -1)
        top = logp.topk(k, -1)
        ids = self.class_ids[top.indices]  # [B, K, L]
        mask = self.class_mask[top.indices]
        bias = torch.where(mask, top.values.unsqueeze(-1), NEG).flatten(1).to(memory.states.dtype)
        ids = ids.flatten(1)
        return self.embeddings(ids), bias, ids

    def step_log_probs(self, memory: Memory, post: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor,
                       classes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """log P(next token) [P, L, V] for decoder inputs `tokens` [P, L] of pairs whose post is
        `post` [P], from `hidden` [1, P, h]; returns it and the last hidden state."""
        x = self.embeddings(tokens)
        out, last = self.decoder(x, hidden)
        states, bias = memory.states[post], memory.bias[post]
        a = torch.softmax(out @ self.attend(states).transpose(1, 2) + bias[:, None, :], -1)
        ctx = a @ states
        switch_in = torch.cat([out, ctx, x], -1)
        switch = self.switch(switch_in)
        vocab = self.embeddings.weight.shape[0]
        mixed_copy = torch.zeros(*out.shape[:2], vocab, dtype=out.dtype, device=out.device)
        if classes is not None:
            c_states, c_bias, c_ids = (t[post] for t in classes)
            b = torch.softmax(out @ self.class_attend(c_states).transpose(1, 2) + c_bias[:, None, :], -1)
            cctx = b @ c_states
        else:
            cctx = torch.zeros_like(ctx)
            switch = switch.masked_fill(torch.arange(3, device=out.device) == 2, NEG)
        w = torch.softmax(switch, -1)  # generate | copy from the input | copy from the classes
        o = torch.tanh(self.combine(torch.cat([out, ctx, cctx], -1)))
        p = w[..., :1] * torch.softmax(o @ self.embeddings.weight.t(), -1)
        src = memory.source_ids[post].unsqueeze(1).expand(-1, out.shape[1], -1)
        mixed_copy = mixed_copy.scatter_add(2, src, w[..., 1:2] * a)
        if classes is not None:
            cids = c_ids.unsqueeze(1).expand(-1, out.shape[1], -1)
            mixed_copy = mixed_copy.scatter_add(2, cids, w[..., 2:3] * b)
        return torch.log(p + mixed_copy + 1e-12), last

    def start_state(self, memory: Memory, post: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bridge(memory.pooled[post])).unsqueeze(0).contiguous()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1e-6)


# ---------------------------------------------------------------- text -> tensors


def phrase_ids(tokenizer: Any, phrases: Sequence[str], max_tokens: int) -> list[list[int]]:
    return [ids[:max_tokens] for ids in tokenizer(list(phrases), add_special_tokens=False)["input_ids"]]


def pad(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r[:width]), dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def class_tensors(tokenizer: Any, classes: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [C, L] and mask of every class keyphrase (for copying from the classifier)."""
    return pad(phrase_ids(tokenizer, classes, max_tokens) if classes else [[]], tokenizer.pad_token_id or 0)


def encode_inputs(tokenizer: Any, rows: Sequence[dict[str, Any]], spec: KeyphraseSpec,
                  regions: torch.Tensor | None = None, has_image: torch.Tensor | None = None) -> Inputs:
    """`[CLS] post [SEP] OCR [SEP] entities [SEP]` per row (inputs=text: the post alone; ocr /
    entities: the other part left empty), cut to max_length keeping the post first, then the
    entities, then the OCR."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    posts = [r["post"] for r in rows]
    ocrs = [(r.get("ocr") or "") if spec.uses("ocr") else "" for r in rows]
    ents = [" ; ".join(r.get("visual_entities") or []) if spec.uses("entities") else "" for r in rows]
    enc = [tokenizer(x, add_special_tokens=False)["input_ids"] if any(x) else [[] for _ in x]
           for x in (posts, ocrs, ents)]
    seqs, segs = [], []
    for p, o, e in zip(*enc):
        room = spec.max_length - (2 if spec.inputs == "text" else 4)
        p = p[:room]
        e = e[:room - len(p)]
        o = o[:room - len(p) - len(e)]
        ids, seg = [cls] + p + [sep], [POST] * (len(p) + 2)
        if spec.inputs != "text":
            ids += o + [sep] + e + [sep]
            seg += [OCR] * (len(o) + 1) + [ENTITIES] * (len(e) + 1)
        seqs.append(ids)
        segs.append(seg)
    input_ids, mask = pad(seqs, tokenizer.pad_token_id or 0)
    segments, _ = pad(segs, POST)
    match = torch.tensor([float("nan") if r.get("image_text_match") is None or spec.inputs == "text"
                          else float(r["image_text_match"]) for r in rows])
    return Inputs(input_ids, mask.long(), segments, match, regions, has_image)


def make_targets(tokenizer: Any, rows: Sequence[dict[str, Any]], spec: KeyphraseSpec,
                 class_index: dict[str, int]) -> Targets:
    """Decoder sequences of every (post, gold keyphrase) pair and each post's class target."""
    posts, phrases = [], []
    target = torch.zeros(len(rows), max(1, len(spec.classes)))
    for b, r in enumerate(rows):
        gold = list(dict.fromkeys(r.get("keyphrases") or []))
        posts += [b] * len(gold)
        phrases += gold
        known = [class_index[k] for k in gold if k in class_index]
        if known:
            target[b, known] = 1.0 / len(known)
    ids = phrase_ids(tokenizer, phrases, spec.max_phrase_tokens) if phrases else []
    pad_id = tokenizer.pad_token_id or 0
    dec_in, _ = pad([[tokenizer.cls_token_id] + i for i in ids] or [[]], pad_id)
    dec_out, mask = pad([i + [tokenizer.sep_token_id] for i in ids] or [[]], pad_id)
    if not ids:
        dec_in, dec_out, mask = dec_in[:0], dec_out[:0], mask[:0]
    return Targets(torch.tensor(posts, dtype=torch.long), dec_in, dec_out, mask.float(), target)


# ---------------------------------------------------------------- inference


def ranked_classes(memory: Memory, classes: Sequence[str], n: int) -> list[list[tuple[str, float]]]:
    logp = torch.log_softmax(memory.class_logits.float(), -1)
    top = logp.topk(min(n, logp.shape[1]), -1)
    return [[(classes[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
            for vals, idx in zip(top.values, top.indices)]


@torch.no_grad()
def beam_search(model: KeyphraseModel, memory: Memory, tokenizer: Any, spec: KeyphraseSpec,
                classes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> list[list[tuple[str, float]]]:
    """Finished beams per post as (keyphrase, summed log-probability), best first, deduplicated."""
    B, W, V = memory.pooled.shape[0], spec.beam_size, model.embeddings.weight.shape[0]
    device = memory.pooled.device
    post = torch.arange(B, device=device).repeat_interleave(W)
    hidden = model.start_state(memory, post)
    tokens = torch.full((B * W, 1), tokenizer.cls_token_id, dtype=torch.long, device=device)
    scores = torch.full((B, W), NEG, device=device)
    scores[:, 0] = 0.0
    history = torch.zeros(B * W, 0, dtype=torch.long, device=device)
    finished: list[dict[str, float]] = [{} for _ in range(B)]
    eos = tokenizer.sep_token_id
    banned = [t for t in (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) if t is not None]
    for step in range(spec.max_phrase_tokens + 1):
        logp, hidden = model.step_log_probs(memory, post, tokens, hidden, classes)
        logp = logp[:, -1].float()
        logp[:, banned] = NEG
        if step == 0:
            logp[:, eos] = NEG  # no empty keyphrase
            logp[:, _continuations(tokenizer, V)] = NEG  # nor one that starts inside a word
        total = scores.reshape(-1, 1) + logp  # [B*W, V]
        # a beam that ends here is finished; the rest continue
        ended = total[:, eos].reshape(B, W)
        for b in range(B):
            for w in range(W):
                s = float(ended[b, w])
                if s > NEG / 2 and history.shape[1]:
                    text = _phrase(tokenizer, history[b * W + w])
                    if _valid(text) and s > finished[b].get(text, NEG):
                        finished[b][text] = s
        if step == spec.max_phrase_tokens:
            break
        total[:, eos] = NEG
        best = total.reshape(B, W * V).topk(W, -1)
        origin = best.indices // V
        choice = best.indices % V
        rows = (torch.arange(B, device=device)[:, None] * W + origin).reshape(-1)
        scores = best.values
        history = torch.cat([history[rows], choice.reshape(-1, 1)], 1)
        hidden = hidden[:, rows]
        tokens = choice.reshape(-1, 1)
    return [sorted(f.items(), key=lambda kv: -kv[1]) for f in finished]


def _continuations(tokenizer: Any, vocab: int) -> torch.Tensor:
    """Ids of the word-piece continuations ('##x'), cached on the tokenizer."""
    cached = tokenizer.__dict__.get("_eama_continuations")
    if cached is None:
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
        cached = torch.tensor([i for i, p in enumerate(pieces) if p and p.startswith("##")], dtype=torch.long)
        tokenizer.__dict__["_eama_continuations"] = cached
    return cached


def _valid(text: str) -> bool:
    """A keyphrase holds a letter or a digit (punctuation alone is not one)."""
    return any(ch.isalnum() for ch in text)


def _phrase(tokenizer: Any, ids: torch.Tensor) -> str:
    return " ".join(tokenizer.decode(ids.tolist(), skip_special_tokens=True).split())


def predict(model: KeyphraseModel, tokenizer: Any, rows: Sequence[dict[str, Any]], spec: KeyphraseSpec,
            regions: torch.Tensor | None = None,
            has_image: torch.Tensor | None = None, device: Any = "cpu") -> list[list[tuple[str, float]]]:
    """Ranked (keyphrase, score) lists, `spec.top_n` per post. classify: the classifier's classes;
    generate: the beams; joint: see `joint_ranking`."""
    inputs = encode_inputs(tokenizer, rows, spec, regions, has_image).to(device)
    memory = model.encode(inputs)
    by_class = ranked_classes(memory, spec.classes, spec.top_n)
    if spec.mode == "classify":
        return by_class
    classes = model.class_memory(memory, spec.copy_top_k) if spec.mode == "joint" else None
    beams = beam_search(model, memory, tokenizer, spec, classes)
    if spec.mode == "generate":
        return [list(gen[:spec.top_n]) for gen in beams]
    return [joint_ranking(gen, cls, spec.top_n, spec.joint_rank) for gen, cls in zip(beams, by_class)]


def joint_ranking(beams: Sequence[tuple[str, float]], classes: Sequence[tuple[str, float]], n: int,
                  how: str = "sum") -> list[tuple[str, float]]:
    """The joint model's list from its two heads' (phrase, log-probability) lists. sum: each phrase
    scored by its probability under the decoder (the finished beam) plus under the classifier, so
    a phrase both heads back rises and a confident class outranks a weak beam; beams_first: the
    beams, then the classes not among them. Scores returned are log of the summed probability."""
    if how == "beams_first":
        ranked = list(beams[:n])
        have = {p for p, _ in ranked}
        return ranked + [(p, s) for p, s in classes if p not in have][:n - len(ranked)]
    total: dict[str, float] = {}
    for phrase, logp in list(beams) + list(classes):
        total[phrase] = total.get(phrase, 0.0) + math.exp(logp)
    ranked = sorted(total.items(), key=lambda kv: -kv[1])[:n]
    return [(p, math.log(v) if v > 0 else NEG) for p, v in ranked]


# ---------------------------------------------------------------- building, export and loading


def _assemble(encoder: nn.Module, tokenizer: Any, spec: KeyphraseSpec, dropout: float = 0.1) -> KeyphraseModel:
    ids, mask = class_tensors(tokenizer, spec.classes, spec.max_phrase_tokens)
    model = KeyphraseModel(encoder, ids, mask, spec.mode, spec.region_dim, dropout, spec.gate)
    model.copy_top_k, model.eos_id = spec.copy_top_k, tokenizer.sep_token_id
    return model


def build(spec: KeyphraseSpec, dropout: float = 0.1, dtype: Any = None) -> tuple[KeyphraseModel, Any]:
    """A keyphrase model on a pretrained encoder (preset, hub id, local or s3:// folder)."""
    encoder, tokenizer = encoders.load_pretrained(spec.encoder, dtype)
    return _assemble(encoder, tokenizer, spec, dropout), tokenizer


def save_export(module: KeyphraseModel, state_dict: dict[str, Any], tokenizer: Any, spec: KeyphraseSpec,
                directory: str) -> None:
    encoders.save_model_folder(module.encoder.config, tokenizer, state_dict, dataclasses.asdict(spec), SPEC_FILE,
                               directory)


def read_spec(location: str) -> KeyphraseSpec:
    return KeyphraseSpec(**encoders.read_model_spec(location, SPEC_FILE, "jobs/train_keyphrase.py"))


def load(location: str, device: str = "cpu") -> tuple[KeyphraseModel, Any, KeyphraseSpec]:
    spec = read_spec(location)
    encoder, tokenizer, load_weights = encoders.load_model_folder(location)
    model = _assemble(encoder, tokenizer, spec)
    load_weights(model)
    model.to(device).eval()
    return model, tokenizer, spec
