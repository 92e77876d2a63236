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

import functools
from typing import Any, Sequence

from eama.engine import generation, isolation
from eama.news import models, prompts

Lists = Sequence[tuple[str, Sequence[str]]]


class HfEngine:
    """transformers' generate over a loaded model (models.generate_text). The requests of one call
    are cut into generate batches of at most `token_budget` KV-cache tokens (rows x padded width
    with the answer; generation.budget_batches), and a batch that runs out of memory is halved
    (isolation.halve_on_oom, the rule every stage runs under; a request that does not fit alone
    raises, for the caller's rows to be halved or failed)."""

    name = "hf"

    def __init__(self, lm: models.LoadedModel, share_heads: bool = True, max_model_len: int = 0,
                 token_budget: int = 0) -> None:
        self.lm, self.tokenizer, self.token_budget = lm, lm.tokenizer, token_budget
        self.shares_heads = share_heads and models.shares_image_prefix(lm)
        self.counter = generation.PromptCounter(lm.processor, lm.family)
        self.token_limit = max_model_len or generation.text_limit(lm.model.config)

    def heads(self, images: list[Any], contexts: Sequence[str]) -> models.ImagePrefix | None:
        return models.image_prefix(self.lm, images, contexts) if self.shares_heads else None

    def prompt_tokens(self, instructions: Sequence[str]) -> list[int]:
        return self.counter.count(instructions)

    def generate(self, instructions: list[str], images: list[Any], max_new_tokens: int, lists: Lists | None = None,
                 prefix: tuple[Any, list[int]] | None = None) -> generation.Generated:
        tokens = self.prompt_tokens(instructions)
        heads = models.head_tokens(*prefix) if prefix is not None else [0] * len(tokens)
        call = functools.partial(self._generate, instructions=instructions, images=images,
                                 max_new_tokens=max_new_tokens, lists=lists, prefix=prefix)
        texts: list[str] = []
        for batch in generation.budget_batches(heads, [t - h for t, h in zip(tokens, heads)], max_new_tokens,
                                               self.token_budget):
            texts += isolation.halve_on_oom(batch, call, _reraise, lambda parts: [t for part in parts for t in part])
        return generation.Generated(texts, tokens, [0] * len(texts))

    def _generate(self, batch: list[int], instructions: list[str], images: list[Any], max_new_tokens: int,
                  lists: Lists | None, prefix: tuple[Any, list[int]] | None) -> list[str]:
        """The answers to the requests numbered `batch`, in one generate call."""
        return models.generate_text(self.lm, [instructions[i] for i in batch], [images[i] for i in batch],
                                    max_new_tokens, [lists[i] for i in batch] if lists else None,
                                    prefix=(prefix[0], [prefix[1][i] for i in batch]) if prefix is not None else None)


def _reraise(batch: list[int], exc: BaseException) -> list[str]:
    """A request out of memory alone: its rows are the caller's to halve (runner.isolate) or fail."""
    raise exc


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
                kv_cache_gib: float = 0.0, trust_remote_code: bool = False, revision: str | None = None,
                token_budget: int = 0, threads: int = 0) -> Any:
    """The engine `engine` ('hf' or 'vllm', as generation.choose_engine decided) over `model`
    (`token_budget`: the HF engine's most KV-cache tokens a generate call holds, 0 = no limit;
    `threads`: a CPU vLLM engine's threads, 0 = vLLM's own choice; the HF engine runs the caller's)."""
    if engine == "vllm":
        from eama.engine import vllm_engine

        location = models.resolve(model)
        family = generation.model_family(location, trust_remote_code, revision)
        return VllmEngine(vllm_engine.VllmGenerator(location, family, device, max_model_len, kv_cache_gib,
                                                    trust_remote_code, revision, threads))
    lm = models.load_model(model, device=device, trust_remote_code=trust_remote_code, revision=revision)
    return HfEngine(lm, share_heads, max_model_len, token_budget)
