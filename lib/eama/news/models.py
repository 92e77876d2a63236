"""EAMA's models: the presets, tiny test models, and generation with EAMA's prompts.

Loading itself is the engine's (engine/hf.py: AutoProcessor + AutoModelForImageTextToText,
safetensors only, trust_remote_code off unless asked, bf16 on GPU and fp32 on CPU, s3:// folders
downloaded once); this module adds the preset names, the tiny models (real LLaVA / InstructBLIP
classes with random weights and a tokenizer trained locally, saved with save_pretrained and loaded
back through `load_model`), the Q-Former text and the image-prefix sharing of EAMA's prompts.
The names it re-exports from engine/hf.py (LoadedModel, fingerprint, format_prompt, ...) keep
working for its callers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Sequence

import torch

from eama.engine import hf, published_layout
from eama.engine.hf import (IMAGE_TOKEN, LoadedModel, cache_dir, default_dtype, fingerprint,  # noqa: F401 (re-exported)
                            format_prompt, refuse_pickle_only)

log = logging.getLogger(__name__)

PRESETS: dict[str, str] = {
    "instructblip-vicuna-7b": "Salesforce/instructblip-vicuna-7b",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
}
TINY = ("tiny-llava", "tiny-instructblip")


def resolve(name: str) -> str:
    """Map a preset or tiny-model name to a loadable location; other names go to hf.resolve
    (s3:// URIs are downloaded once, hub ids and local paths pass as they are)."""
    if name in PRESETS:
        return PRESETS[name]
    if name in TINY:
        path = os.path.join(cache_dir(), "models", f"{name}-{TINY_VERSION}")
        if not os.path.exists(os.path.join(path, "config.json")):
            build_tiny_model(name.removeprefix("tiny-"), path)
        return path
    return hf.resolve(name)


def load_model(
    name: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    for_training: bool = False,
) -> LoadedModel:
    """Load any image-text-to-text model and its processor by preset, hub id, local path or s3:// URI."""
    return hf.load_image_text_model(resolve(name), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                    revision=revision, for_training=for_training, name=name)


def encode(
    lm: LoadedModel,
    prompts: list[str],
    images: list[Any],
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise prompts (left-padded) and preprocess images into model inputs on the model's device;
    InstructBLIP's Q-Former reads templates.QFORMER_TEXT with every prompt."""
    from eama.news import prompts as templates

    kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
    if max_length:
        kwargs.update(truncation=True, max_length=max_length)
    batch = lm.processor(images=images, text=prompts, **kwargs)
    if lm.family == "instructblip":
        # one short text (its position table, 512, cannot hold an article), the same for every task
        qtok = lm.processor.qformer_tokenizer
        q = qtok(
            [templates.QFORMER_TEXT] * len(prompts),
            padding=True,
            truncation=True,
            max_length=lm.model.config.qformer_config.max_position_embeddings,
            return_tensors="pt",
        )
        batch["qformer_input_ids"] = q["input_ids"]
        batch["qformer_attention_mask"] = q["attention_mask"]
    return hf.to_model_inputs(lm, batch)


# ---------------------------------------------------------------- tiny models


def _corpus_for_tokenizer() -> Iterable[str]:
    from eama.news import demo, prompts

    for sample in demo.generate_samples(num_samples=200, seed=7):
        yield sample["article"]
        yield sample["caption"]
        yield sample["headline"]
    yield from prompts.all_template_text()


def train_tokenizer(vocab_size: int = 2048, padding_side: str = "left", image_token_attr: bool = True) -> Any:
    """A byte-level BPE tokenizer trained on demo text, with Llama-style special tokens.

    `image_token_attr` exposes `tokenizer.image_token` (LLaVA's processor reads it; InstructBLIP's
    processor registers the token itself)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_for_tokenizer(), trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN} if image_token_attr else {},
        padding_side=padding_side,
        model_max_length=4096,
    )


# Head size 32 in the language model: the smallest vLLM's CPU attention runs (16 is refused).
TINY_DIMS = {
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=4096),
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8),
    "qformer": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "num_query_tokens": 4,
}
TINY_VERSION = "v2"  # part of the cached tiny models' folder name: a change of dims or layout rebuilds them


def build_model(family: str, dims: dict, tokenizer: Any, qformer_tokenizer: Any | None = None,
                vocab_size: int | None = None) -> tuple[Any, Any]:
    """A randomly initialised LLaVA or InstructBLIP of the given dimensions, and its processor.

    Built under the current default device / dtype (so callers can build straight on a GPU)."""
    from transformers import LlamaConfig

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        **dims["text"],
    )
    vision, size, patch = dims["vision"], dims["vision"]["image_size"], dims["vision"]["patch_size"]
    if family == "llava":
        from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig,
                                  LlavaForConditionalGeneration, LlavaProcessor)

        config = LlavaConfig(
            vision_config=CLIPVisionConfig(projection_dim=vision["hidden_size"], **vision), text_config=text_config,
            image_token_index=image_token_id, vision_feature_select_strategy="default",
            vision_feature_layer=dims.get("vision_feature_layer", -1), pad_token_id=tokenizer.pad_token_id,
        )
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
            tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    elif family == "instructblip":
        from transformers import (BlipImageProcessorPil, InstructBlipConfig, InstructBlipForConditionalGeneration,
                                  InstructBlipProcessor, InstructBlipQFormerConfig, InstructBlipVisionConfig)

        qformer = InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer), encoder_hidden_size=vision["hidden_size"], max_position_embeddings=512,
            pad_token_id=qformer_tokenizer.pad_token_id, **dims["qformer"],
        )
        config = InstructBlipConfig(
            vision_config=InstructBlipVisionConfig(**vision), qformer_config=qformer, text_config=text_config,
            num_query_tokens=dims["num_query_tokens"], image_token_index=image_token_id,
        )
        model = InstructBlipForConditionalGeneration(config)
        processor = InstructBlipProcessor(
            image_processor=BlipImageProcessorPil(size={"height": size, "width": size}), tokenizer=tokenizer,
            qformer_tokenizer=qformer_tokenizer, num_query_tokens=dims["num_query_tokens"],
        )
    else:
        raise ValueError(f"unknown model family {family!r}; choose llava or instructblip")
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, processor


_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096)
# The published shapes of the two presets (for benchmarks with random weights; no download).
REAL_SHAPES: dict[str, tuple[str, dict, int]] = {
    "llava-1.5-7b": ("llava", {
        "text": _VICUNA_7B,
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14),
        "vision_feature_layer": -2,
    }, 32064),
    "instructblip-vicuna-7b": ("instructblip", {
        "text": _VICUNA_7B,
        "vision": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                       image_size=224, patch_size=14),
        "qformer": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "num_query_tokens": 32,
    }, 32001),
}


def build_real_shape(preset: str, device: str = "cuda", num_layers: int | None = None) -> LoadedModel:
    """A randomly initialised model of a preset's real shape, built directly on `device` (bf16 on
    GPU); `num_layers` trims the language model to fit smaller devices."""
    family, dims, vocab = REAL_SHAPES[preset]
    if num_layers:
        dims = {**dims, "text": {**dims["text"], "num_hidden_layers": num_layers}}
    tokenizer, qformer_tokenizer = tokenizers_for(family)
    dtype = default_dtype(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, processor = build_model(family, dims, tokenizer, qformer_tokenizer, vocab_size=vocab)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return LoadedModel(model, processor, family, f"random-{preset}", "random")


def tokenizers_for(family: str) -> tuple[Any, Any | None]:
    """The locally trained tokenizer (and the Q-Former's, for InstructBLIP)."""
    tokenizer = train_tokenizer(image_token_attr=family == "llava")
    qformer = train_tokenizer(padding_side="right", image_token_attr=False) if family == "instructblip" else None
    return tokenizer, qformer


def build_tiny_model(family: str, path: str, seed: int = 0) -> str:
    """Build a tiny `family` ('llava' | 'instructblip') model with random weights and save it to `path`."""
    torch.manual_seed(seed)
    tokenizer, qformer_tokenizer = tokenizers_for(family)
    model, processor = build_model(family, TINY_DIMS, tokenizer, qformer_tokenizer)
    tmp = f"{path}.tmp-{os.getpid()}"
    published_layout.save_image_text_model(model, processor, tmp)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


class StopWhenListEnds:
    """Stopping criterion for list answers ('2, 5' or 'A; B'), given each row's (kind, choices): a
    row is done once its answer is finished or runaway (prompts.ListAnswerGuard), e.g. an item
    repeats. Parsing, not this, judges the answer; this only saves steps."""

    def __init__(self, tokenizer: Any, lists: Sequence[tuple[str, Sequence[str]]]):
        from eama.news import prompts

        self.tokenizer = tokenizer
        self.guards = [prompts.ListAnswerGuard(choices, kind) for kind, choices in lists]
        self.start: int | None = None
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.start is None:  # first call: exactly one token has been generated
            self.start = input_ids.shape[1] - 1
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = (~self.done).nonzero().flatten().tolist()
        texts = self.tokenizer.batch_decode(input_ids[rows, self.start:], skip_special_tokens=True)
        for row, text in zip(rows, texts):
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                continue
            self.done[row] = not self.guards[row].can_grow(text)
        return self.done.clone()


@dataclasses.dataclass
class ImagePrefix:
    """The KV cache of each image's prompt head (chat prefix, image tokens and the sample's news
    context), computed once and continued by every prompt about that image: EAMA's three prompts
    pay for image and article once."""

    cache: Any  # DynamicCache, one row per image
    input_ids: torch.Tensor  # (images, head length), left-padded, image tokens expanded
    attention_mask: torch.Tensor
    head_ids: list[list[int]]  # each head as the tokenizer writes it (one image token), to match prompts


class PrefixMismatch(ValueError):
    """A prompt does not start with its image's cached head, token for token."""


def shares_image_prefix(lm: LoadedModel) -> bool:
    """Whether every prompt about an image starts with the same tokens, so the head's KV cache can be
    reused: LLaVA's image tokens, InstructBLIP's query tokens (one Q-Former text for every prompt,
    prompts.QFORMER_TEXT). Not an encoder-decoder language model (InstructBLIP-Flan-T5)."""
    return lm.family == "llava" or (lm.family == "instructblip" and lm.model.config.use_decoder_only_language_model)


def _continuing_model(lm: LoadedModel) -> Any:
    """What generate() continues a cached head with: LLaVA itself; InstructBLIP's language model
    (its own generate() would run the vision tower and Q-Former again)."""
    return lm.model.language_model if lm.family == "instructblip" else lm.model


def prompt_head(family: str, context: str) -> str:
    """The chat-formatted start of every prompt whose text starts with `context`."""
    wrapped = format_prompt(family, context)
    return wrapped[: wrapped.rindex(context) + len(context)]


def image_prefix(lm: LoadedModel, images: list[Any], contexts: Sequence[str]) -> ImagePrefix:
    """Run each image's prompt head once (vision tower and language model) and keep its cache:
    `contexts[i]` is the text every prompt about image i starts with (prompts.CONTEXT_END follows)."""
    heads = [prompt_head(lm.family, c) for c in contexts]
    inputs = encode(lm, heads, images)
    mask = inputs["attention_mask"]
    with torch.inference_mode():
        out = lm.model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    cache = out.language_model_outputs.past_key_values if lm.family == "instructblip" else out.past_key_values
    head_ids = lm.tokenizer(heads, add_special_tokens=True)["input_ids"]
    return ImagePrefix(cache, inputs["input_ids"], mask, head_ids)


def head_tokens(prefix: ImagePrefix, rows: Sequence[int]) -> list[int]:
    """The tokens of each row's cached head (image tokens expanded, padding left out)."""
    return prefix.attention_mask.sum(-1)[list(rows)].tolist()


def continue_prefix(lm: LoadedModel, prefix: ImagePrefix, rows: list[int], prompts: list[str]) -> dict[str, Any]:
    """generate() inputs for `prompts`, the i-th continuing image `rows[i]` of `prefix`: the head's
    tokens and cache, then the prompt's own tokens (those after its head), left-padded, so padding
    sits between head and tail; positions follow the attention mask and skip it. Only these rows'
    part of the cache is copied: their rows, without the padding columns none of their heads uses
    (the HF engine keeps a call's rows x width within hf_token_budget). Raises PrefixMismatch when
    a prompt's tokens do not start with its head's."""
    from transformers import DynamicCache

    tok, tails = lm.tokenizer, []
    for row, ids in zip(rows, tok(prompts, add_special_tokens=True)["input_ids"]):
        head = prefix.head_ids[row]
        if ids[: len(head)] != head or len(ids) == len(head):
            raise PrefixMismatch(f"prompt for image {row} does not continue its cached head token for token")
        tails.append(ids[len(head):])
    width = max(len(t) for t in tails)
    tail_ids = torch.tensor([[tok.pad_token_id] * (width - len(t)) + t for t in tails], device=lm.device)
    tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=lm.device,
                             dtype=prefix.attention_mask.dtype)
    idx = torch.tensor(rows, device=lm.device)
    start = prefix.attention_mask.shape[1] - max(head_tokens(prefix, rows))  # left padding: heads end together
    cache = DynamicCache(config=lm.model.config)
    for layer, past in enumerate(prefix.cache.layers):
        cache.update(past.keys[idx, :, start:], past.values[idx, :, start:], layer)
    return {"input_ids": torch.cat([prefix.input_ids[idx, start:], tail_ids], 1),
            "attention_mask": torch.cat([prefix.attention_mask[idx, start:], tail_mask], 1),
            "past_key_values": cache}


def generate_text(
    lm: LoadedModel,
    instructions: list[str],
    images: list[Any],
    max_new_tokens: int,
    lists: Sequence[tuple[str, Sequence[str]]] | None = None,
    prefix: tuple[ImagePrefix, list[int]] | None = None,
) -> list[str]:
    """Greedy batched generation: one answer per (instruction, image). Stops at EOS, after
    `max_new_tokens`, or, given each row's (kind, choices) as `lists`, once a list answer is
    finished or runaway. With `prefix` (an ImagePrefix and each instruction's image row in it) the
    cached heads are continued instead of running image and context again; should a tokenizer
    merge across the head's end, the prompts run whole instead (same answers, no saving)."""
    from transformers import StoppingCriteriaList

    prompts = [format_prompt(lm.family, text) for text in instructions]
    inputs, model = None, lm.model
    if prefix is not None:
        try:
            inputs, model = continue_prefix(lm, prefix[0], prefix[1], prompts), _continuing_model(lm)
        except PrefixMismatch as exc:
            log.warning("%s; running these prompts without the cached head", exc)
    if inputs is None:
        inputs = encode(lm, prompts, images)
    stopping = StoppingCriteriaList([StopWhenListEnds(lm.tokenizer, lists)]) if lists else None
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
            stopping_criteria=stopping,
        )
    return hf.decode_new(lm, out, inputs["input_ids"].shape[1])
