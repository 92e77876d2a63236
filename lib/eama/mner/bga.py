"""BGA-MNER (arXiv 2308.02570), reimplemented from the paper (no public code): bidirectional
generative alignment between a post's tokens and its image's regions, on the ITA tagger's encoder
and CRF.

One BGA layer:
* two stage-refined context samplers (`ContextSampler`, SCS), one per modality: a keep-mask over
  tokens / regions refined stage by stage; each stage scores every element from its own feature and
  the mean of what the previous stage kept, and drops it by a hard Gumbel-sigmoid decision with a
  straight-through gradient (at inference: score > 0). At least one element is always kept.
* a multi-level cross-modal generator (`Generator`, MCG), one per direction: learnable modality
  queries (one per generated element) run through a stack of transformer decoder layers over the
  kept content of the other modality; every layer's output is a level, and every level is trained.
* a feature extractor (`FeatureExtractor`): the post's tokens attend over visual features (the
  sampled real regions where they are used, and the generated ones) and add the result through a
  per-channel gate that starts small, so an untrained layer barely moves the text encoder's features.

Losses (per post, `Losses`): reconstruction of the other modality's kept features (detached) by
every generator level, and cycle consistency (text -> generated image -> regenerated text returns to
the text, and image -> text -> image), as a cosine distance at aligned positions; and each post's
keep rate (the share of its tokens / regions the samplers keep, averaged over stages and modalities,
differentiable through the straight-through decisions), which a keep budget may penalise.

Inference as the paper does it uses the text alone: the text -> image generator's features stand in
for the image. With a real visual source (an image, or the caption proxy) its sampled features are
attended too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from eama.mner import crf as crf_module
from eama.mner import tagger

Generate = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclasses.dataclass
class BgaSpec:
    """The BGA part of a tagger's spec (what rebuilding the layers needs)."""

    layers: int = 1  # BGA layers, each refining the token features of the one before
    scs: bool = True  # stage-refined context samplers (false: every token and region is kept)
    scs_stages: int = 2  # refinement stages per sampler
    gumbel_tau: float = 1.0  # temperature of the Gumbel-sigmoid keep decisions (training)
    generator_layers: int = 2  # decoder layers per generator (the MCG's levels)
    region_slots: int = 49  # image pseudo-features the text -> image generator writes
    vision: str = "none"  # frozen image encoder: efficientnet | none | a CLIPVisionModel id or folder
    image_width: int = 0  # width of its features (0: no image encoder)
    caption_proxy: bool = True  # rows without an image use their caption, embedded by a frozen copy of the text encoder
    proxy_tokens: int = 32  # caption subtokens kept as proxy regions
    cycle: bool = True  # compute the cycle-consistency loss (off when its weight is 0)


def heads_for(width: int) -> int:
    return max(1, width // 64) if width % 64 == 0 else max(h for h in (1, 2, 4, 8) if width % h == 0)


def straight_through(logits: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Hard keep decisions {0, 1}: Gumbel-sigmoid in training (gradient of the soft sample),
    logits > 0 at inference."""
    if not training:
        return (logits > 0).to(logits.dtype)
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def masked_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, N, h] under weights [B, N] (zeros where no weight)."""
    return (x * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-6)


class ContextSampler(nn.Module):
    """SCS: a keep-mask [B, N] over elements, refined stage by stage from local features and the
    content the previous stage kept."""

    def __init__(self, width: int, stages: int, tau: float):
        super().__init__()
        self.tau = tau
        self.scorers = nn.ModuleList(nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))
                                     for _ in range(stages))
        for scorer in self.scorers:  # start by keeping everything (positive scores)
            nn.init.constant_(scorer[-1].bias, 2.0)

    def stages(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The keep-mask [B, N] after every stage (the last is the sampler's output)."""
        keep = mask.to(x.dtype)
        has = mask.any(1)
        out = []
        for scorer in self.scorers:
            context = masked_mean(x, keep).unsqueeze(1).expand_as(x)
            logits = scorer(torch.cat([x, context], -1)).squeeze(-1)
            keep = keep * straight_through(logits, self.tau, self.training)
            # never an empty selection: a row that lost everything keeps its best-scored element
            empty = has & (keep.detach().sum(1) == 0)
            best = F.one_hot(logits.detach().masked_fill(~mask, -torch.inf).argmax(1), x.shape[1]).to(x.dtype)
            keep = keep + best * empty.unsqueeze(1).to(x.dtype)
            out.append(keep)
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.stages(x, mask)[-1]


class Generator(nn.Module):
    """One MCG direction: modality queries decode pseudo-features of the other modality from the
    kept content; returns every level's output [levels][B, count, h]."""

    def __init__(self, width: int, slots: int, layers: int, dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(slots, width) * 0.02)
        self.levels = nn.ModuleList(
            nn.TransformerDecoderLayer(width, heads_for(width), 2 * width, dropout, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, memory: torch.Tensor, keep: torch.Tensor, count: int) -> list[torch.Tensor]:
        pad = keep.detach() < 0.5
        pad = pad & ~pad.all(1, keepdim=True)  # a row with nothing kept attends to its zeroed content
        memory = memory * keep.unsqueeze(-1)
        q = self.queries[:count].unsqueeze(0).expand(memory.shape[0], -1, -1).to(memory.dtype)
        out = []
        for level in self.levels:
            q = level(q, memory, memory_key_padding_mask=pad)
            out.append(self.norm(q))
        return out


class FeatureExtractor(nn.Module):
    """Tokens attend over visual features; the result is added through a gate that starts small
    (tanh(0.1) per channel), so an untrained layer barely moves the text encoder's features."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads_for(width), dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.gate = nn.Parameter(torch.full((width,), 0.1))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(self.norm(tokens), memory, memory, key_padding_mask=pad, need_weights=False)
        return tokens + torch.tanh(self.gate) * attended


def feature_distance(generated: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-row mean cosine distance [B] at aligned positions (the shorter length), under weights."""
    n = min(generated.shape[1], target.shape[1])
    d = 1 - F.cosine_similarity(generated[:, :n].float(), target[:, :n].float(), dim=-1)
    w = weights[:, :n].float()
    return (d * w).sum(1) / w.sum(1).clamp(min=1.0)


def cycle_loss(t2v: Generate, v2t: Generate, text: torch.Tensor, text_keep: torch.Tensor, regions: torch.Tensor,
               region_keep: torch.Tensor, slots: int, to_image: torch.Tensor | None = None,
               to_text: torch.Tensor | None = None) -> torch.Tensor:
    """Cycle consistency [B]: text -> image -> text returns to the (detached) kept text features,
    image -> text -> image to the kept region features. `to_image` / `to_text`: the first halves
    when the caller has generated them already."""
    to_image = t2v(text, text_keep, slots) if to_image is None else to_image
    to_text = v2t(regions, region_keep, text.shape[1]) if to_text is None else to_text
    back_t = v2t(to_image, torch.ones(to_image.shape[:2], dtype=text.dtype, device=text.device), text.shape[1])
    back_v = t2v(to_text, torch.ones(to_text.shape[:2], dtype=text.dtype, device=text.device), regions.shape[1])
    return (feature_distance(back_t, text.detach(), text_keep.detach())
            + feature_distance(back_v, regions.detach(), region_keep.detach()))


KeepCounts = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "text/stage1" -> (elements kept, elements there), batch sums


@dataclasses.dataclass
class Losses:
    reconstruction: torch.Tensor  # [B]
    cycle: torch.Tensor  # [B]
    keep_rate: torch.Tensor | None = None  # [B] share of its elements a post's samplers keep (mean over stages and modalities; differentiable)
    keep_counts: KeepCounts = dataclasses.field(default_factory=dict)  # detached, for the metrics


def keep_stats(keeps: list[torch.Tensor], mask: torch.Tensor, modality: str,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, KeepCounts]:
    """Per-row keep rate [B] (mean over the stages of kept / there) of one modality's samplers, and
    the kept / there counts per stage summed over `rows` (all rows when None)."""
    there = mask.to(keeps[0].dtype)
    if rows is not None:
        there = there * rows.to(there.dtype).unsqueeze(1)
    size = there.sum(1).clamp(min=1.0)
    rate = sum((k * there).sum(1) / size for k in keeps) / len(keeps)
    counts = {f"{modality}/stage{s + 1}": ((k.detach() * there).sum(), there.sum()) for s, k in enumerate(keeps)}
    return rate, counts


class BgaLayer(nn.Module):
    """SCS per modality -> MCG both ways -> the tokens' feature extractor."""

    def __init__(self, width: int, spec: BgaSpec, max_tokens: int, dropout: float):
        super().__init__()
        self.spec = spec
        self.text_sampler = ContextSampler(width, spec.scs_stages, spec.gumbel_tau)
        self.region_sampler = ContextSampler(width, spec.scs_stages, spec.gumbel_tau)
        self.text_to_image = Generator(width, spec.region_slots, spec.generator_layers, dropout)
        self.image_to_text = Generator(width, max_tokens, spec.generator_layers, dropout)
        self.extractor = FeatureExtractor(width, dropout)

    def t2v(self, x: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
        return self.text_to_image(x, keep, count)[-1]

    def v2t(self, x: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
        return self.image_to_text(x, keep, count)[-1]

    def sample(self, sampler: ContextSampler, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's keep-mask (without SCS: the mask itself at every stage)."""
        return sampler.stages(x, mask) if self.spec.scs else [mask.to(x.dtype)] * self.spec.scs_stages

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor, regions: torch.Tensor | None,
                region_mask: torch.Tensor | None, use_real: torch.Tensor | None,
                with_losses: bool) -> tuple[torch.Tensor, Losses | None]:
        slots = self.spec.region_slots
        text_keeps = self.sample(self.text_sampler, tokens, token_mask)
        text_keep = text_keeps[-1]
        generated = self.text_to_image(tokens, text_keep, slots)
        memory, pad = generated[-1], torch.zeros(tokens.shape[0], slots, dtype=torch.bool, device=tokens.device)
        losses = None
        if with_losses:
            zero = tokens.new_zeros(tokens.shape[0])
            rate, counts = keep_stats(text_keeps, token_mask, "text")
            losses = Losses(zero, zero, rate, counts)
        if regions is not None:
            region_keeps = self.sample(self.region_sampler, regions, region_mask)
            region_keep = region_keeps[-1]
            real = region_keep * use_real.unsqueeze(1).to(region_keep.dtype)
            memory = torch.cat([regions * real.unsqueeze(-1), memory], 1)
            pad = torch.cat([real.detach() < 0.5, pad], 1)
            if losses is not None:
                has = region_mask.any(1).to(tokens.dtype)
                to_text = self.image_to_text(regions, region_keep, tokens.shape[1])
                rec = sum(feature_distance(g, regions.detach(), region_keep.detach()) for g in generated) / len(generated)
                rec = rec + sum(feature_distance(g, tokens.detach(), text_keep.detach()) for g in to_text) / len(to_text)
                cyc = torch.zeros_like(rec)
                if self.spec.cycle:
                    cyc = cycle_loss(self.t2v, self.v2t, tokens, text_keep, regions, region_keep, slots,
                                     generated[-1], to_text[-1])
                visual_rate, visual_counts = keep_stats(region_keeps, region_mask, "visual", has > 0)
                losses = Losses(rec * has, cyc * has, (losses.keep_rate + has * visual_rate) / (1 + has),
                                {**losses.keep_counts, **visual_counts})
        return self.extractor(tokens, memory, pad), losses


class BgaTagger(nn.Module):
    """Encoder -> BGA layers over the subtokens -> first subtoken of every word -> linear -> CRF.

    Visual inputs (all optional): `image_features` [B, R, image_width] with `image_mask` [B, R] from
    the frozen image encoder, `proxy_ids` / `proxy_mask` (a caption's subtokens, embedded by the
    frozen `proxy_encoder`), and `use_real` [B]: which rows attend to their real visual features."""

    def __init__(self, encoder: nn.Module, proxy_encoder: nn.Module | None, num_labels: int, spec: BgaSpec,
                 max_tokens: int, dropout: float = 0.1):
        super().__init__()
        width = encoder.config.hidden_size
        self.spec = spec
        self.encoder = encoder
        self.proxy_encoder = proxy_encoder
        if proxy_encoder is not None:
            proxy_encoder.requires_grad_(False)
            self.proxy_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
        if spec.image_width:
            self.image_proj = nn.Sequential(nn.LayerNorm(spec.image_width), nn.Linear(spec.image_width, width))
        self.layers = nn.ModuleList(BgaLayer(width, spec, max_tokens, dropout) for _ in range(spec.layers))
        self.dropout = nn.Dropout(dropout)
        self.emission = nn.Linear(width, num_labels)
        self.crf = crf_module.CRF(num_labels)

    def regions(self, image_features: torch.Tensor | None, image_mask: torch.Tensor | None,
                proxy_ids: torch.Tensor | None, proxy_mask: torch.Tensor | None,
                dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Projected real visual features [B, R, h] and their mask, one source per row: the image's
        where a row has one, else its caption proxy's (None when no visual input is given)."""
        sources = []
        if image_features is not None and self.spec.image_width:
            sources.append((self.image_proj(image_features.to(dtype)), image_mask.bool()))
        if proxy_ids is not None and self.proxy_encoder is not None:
            with torch.no_grad():
                hidden = self.proxy_encoder(input_ids=proxy_ids, attention_mask=proxy_mask.long()).last_hidden_state
            sources.append((self.proxy_proj(hidden.to(dtype)), proxy_mask.bool()))
        if not sources:
            return None, None
        if len(sources) == 1:
            return sources[0]
        (image, image_mask), (proxy, proxy_mask) = sources
        length = max(image.shape[1], proxy.shape[1])
        image, proxy = (F.pad(x, (0, 0, 0, length - x.shape[1])) for x in (image, proxy))
        image_mask, proxy_mask = (F.pad(m, (0, length - m.shape[1])) for m in (image_mask, proxy_mask))
        has_image = image_mask.any(1)
        return (torch.where(has_image[:, None, None], image, proxy),
                torch.where(has_image[:, None], image_mask, proxy_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, proxy_ids: torch.Tensor | None = None,
                proxy_mask: torch.Tensor | None = None, use_real: torch.Tensor | None = None,
                with_losses: bool = False) -> torch.Tensor | tuple[torch.Tensor, Losses]:
        """Emission scores [B, W, L]; with `with_losses` also the generation losses and keep rates per post."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        regions, region_mask = self.regions(image_features, image_mask, proxy_ids, proxy_mask, hidden.dtype)
        if regions is not None and use_real is None:
            use_real = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        token_mask = attention_mask.bool()
        every: list[Losses] = []
        for layer in self.layers:
            hidden, losses = layer(hidden, token_mask, regions, region_mask, use_real, with_losses)
            if losses is not None:
                every.append(losses)
        emissions = self.emission(self.dropout(tagger.first_subtokens(hidden, word_index)))
        if not with_losses:
            return emissions
        return emissions, mean_losses(every)


def mean_losses(layers: list[Losses]) -> Losses:
    """The layers' losses and keep rates averaged over the layers; their keep counts summed."""
    n = len(layers)
    counts: KeepCounts = {}
    for losses in layers:
        for key, (kept, there) in losses.keep_counts.items():
            before = counts.get(key)
            counts[key] = (kept, there) if before is None else (before[0] + kept, before[1] + there)
    return Losses(sum(x.reconstruction for x in layers) / n, sum(x.cycle for x in layers) / n,
                  sum(x.keep_rate for x in layers) / n, counts)
