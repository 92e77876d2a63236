"""The Captioner's generation engines, one per actor replica, behind one interface.

    heads(images, contexts) -> a cached head per image, or None   (what later prompts continue)
    generate(instructions, images, max_new_tokens, lists=None, prefix=None) -> generation.Generated
    prompt_tokens(instructions) -> tokens each prompt takes, image included;  token_limit

`lists` gives, per request, a list answer's (kind, choices): vLLM constrains the answer to them by
structured output (prompts.answer_regex), transformers stops decoding once it is finished or
runaway (models.StopWhenListEnds); the same parsers (prompts.parse_*) judge both. The head of image
and news context is shared explicitly on transformers (models.image_prefix, continued by each
prompt) and by vLLM's automatic prefix cache, which reports the tokens it served
(Generated.cached_tokens).
"""

from __future__ import annotations

from typing import Any, Sequence

from eama.engine import generation
from eama.news import models, prompts

Lists = Sequence[tuple[str, Sequence[str]]]


class HfEngine:
    """transformers' generate over a loaded model (models.generate_text)."""

    name = "hf"

    def __init__(self, lm: models.LoadedModel, share_heads: bool = True, max_model_len: int = 0) -> None:
        self.lm, self.tokenizer = lm, lm.tokenizer
        self.shares_heads = share_heads and models.shares_image_prefix(lm)
        self.counter = generation.PromptCounter(lm.processor, lm.family)
        self.token_limit = max_model_len or generation.text_limit(lm.model.config)

    def heads(self, images: list[Any], contexts: Sequence[str]) -> models.ImagePrefix | None:
        return models.image_prefix(self.lm, images, contexts) if self.shares_heads else None

    def prompt_tokens(self, instructions: Sequence[str]) -> list[int]:
        return self.counter.count(instructions)

    def generate(self, instructions: list[str], images: list[Any], max_new_tokens: int, lists: Lists | None = None,
                 prefix: tuple[Any, list[int]] | None = None) -> generation.Generated:
        texts = models.generate_text(self.lm, instructions, images, max_new_tokens, lists, prefix=prefix)
        return generation.Generated(texts, self.prompt_tokens(instructions), [0] * len(texts))


class VllmEngine:
    """vLLM (engine/vllm_engine.py) with list answers under structured output."""

    name = "vllm"
    shares_heads = False  # the prefix cache does it

    def __init__(self, generator: Any) -> None:
        self.generator, self.tokenizer, self.token_limit = generator, generator.tokenizer, generator.token_limit

    def heads(self, images: list[Any], contexts: Sequence[str]) -> None:
        return None

    def prompt_tokens(self, instructions: Sequence[str]) -> list[int]:
        return self.generator.prompt_tokens(instructions)

    def generate(self, instructions: list[str], images: list[Any], max_new_tokens: int, lists: Lists | None = None,
                 prefix: Any = None) -> generation.Generated:
        regexes = [prompts.answer_regex(kind, choices) for kind, choices in lists] if lists else None
        return self.generator.generate(instructions, images, max_new_tokens, regexes)


def load_engine(engine: str, model: str, device: str = "cpu", share_heads: bool = True, max_model_len: int = 0,
                kv_cache_gib: float = 0.0, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The engine `engine` ('hf' or 'vllm', as generation.choose_engine decided) over `model`."""
    if engine == "vllm":
        from eama.engine import vllm_engine

        location = models.resolve(model)
        family = generation.model_family(location, trust_remote_code, revision)
        return VllmEngine(vllm_engine.VllmGenerator(location, family, device, max_model_len, kv_cache_gib,
                                                    trust_remote_code, revision))
    lm = models.load_model(model, device=device, trust_remote_code=trust_remote_code, revision=revision)
    return HfEngine(lm, share_heads, max_model_len)
