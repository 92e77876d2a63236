"""Loading Hugging Face image-text-to-text models, the system-neutral part: where a model is
(hub id, local folder, s3:// folder downloaded once per node), how it is loaded (AutoProcessor +
AutoModelForImageTextToText, safetensors only, trust_remote_code off unless asked, bf16 on GPU and
fp32 on CPU), what identifies it (hub commit or a hash of its files), and how a family wraps a
prompt. Systems add their own presets and test models on top (news/models.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import TYPE_CHECKING, Any

from eama.engine import exports, storage

if TYPE_CHECKING:  # torch is imported where it is used: a config error must not wait for it
    import torch

IMAGE_TOKEN = "<image>"


@dataclasses.dataclass
class LoadedModel:
    """A loaded image-text-to-text model, its processor, and what it is."""

    model: Any
    processor: Any
    family: str  # "llava" | "instructblip" | other model_type
    name: str  # what the user asked for
    fingerprint: str  # hub revision or a hash of the weights files

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> str:
    """Where downloaded and built models live ($EAMA_CACHE, else ~/.cache/eama)."""
    return os.environ.get("EAMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "eama"))


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def download(uri: str) -> str:
    """Copy an s3:// folder into the cache once per node (keyed by the URI); return the local path."""
    local = os.path.join(cache_dir(), "s3", hashlib.sha256(uri.encode()).hexdigest()[:16])
    marker = os.path.join(local, ".complete")
    if not os.path.exists(marker):
        fs = storage.filesystem(uri)
        fs.get(storage.strip(uri).rstrip("/") + "/", local, recursive=True)
        open(marker, "w").close()
    return local


def resolve(location: str) -> str:
    """A loadable location: a run's export through its pointer (exports.resolve_export), s3:// URIs
    downloaded once; hub ids and local paths pass as they are."""
    location = exports.resolve_export(location)
    return download(location) if location.startswith("s3://") else location


def fingerprint(location: str, config: Any) -> str:
    """The hub commit when known, else a cheap hash of the local weights files (sizes + sampled bytes)."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return commit
    if not os.path.isdir(location):
        return "unknown"
    h = hashlib.sha256()
    for fname in sorted(os.listdir(location)):
        if not fname.endswith((".safetensors", ".json")):
            continue
        path = os.path.join(location, fname)
        size = os.path.getsize(path)
        h.update(f"{fname}:{size}".encode())
        with open(path, "rb") as fh:
            for offset in (0, size // 2, max(0, size - (1 << 20))):
                fh.seek(offset)
                h.update(fh.read(1 << 20))
    return "sha256:" + h.hexdigest()[:16]


def model_label(name: str, location: str, revision: str | None = None) -> str:
    """'name@revision', else 'name@hash-of-files' for a local folder, else the name (hub id, no revision)."""
    if revision:
        return f"{name}@{revision}"
    if os.path.isdir(location):
        from transformers import AutoConfig

        return f"{name}@{fingerprint(location, AutoConfig.from_pretrained(location))}"
    return name


def refuse_pickle_only(location: str) -> None:
    """Refuse a local checkpoint whose weights exist only as pickle files."""
    if not os.path.isdir(location):
        return
    files = os.listdir(location)
    has_safe = any(f.endswith(".safetensors") for f in files)
    pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickled and not has_safe:
        raise ValueError(
            f"{location}: only pickle weights ({', '.join(sorted(pickled))}); eama loads safetensors only. "
            "Convert them once in a trusted environment (save_pretrained(..., safe_serialization=True))."
        )


def load_image_text_model(
    location: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    for_training: bool = False,
    name: str | None = None,
) -> LoadedModel:
    """Load an image-text-to-text model and its processor from a hub id, local folder or s3:// URI
    (safetensors only; `name` is the label recorded, default the location)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = resolve(location)
    refuse_pickle_only(local)
    dtype = dtype or default_dtype(device)
    processor = AutoProcessor.from_pretrained(local, trust_remote_code=trust_remote_code, revision=revision)
    processor.tokenizer.padding_side = "left"  # the one place: batched generate (and training's batches) pad left
    model = AutoModelForImageTextToText.from_pretrained(
        local, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, revision=revision,
    )
    model.to(device)
    model.train(for_training)
    return LoadedModel(model, processor, model.config.model_type, name or location, fingerprint(local, model.config))


def format_prompt(family: str, instruction: str) -> str:
    """Wrap an instruction in the chat format of the model family (the image slot included)."""
    if family == "llava":
        return f"USER: {IMAGE_TOKEN}\n{instruction} ASSISTANT:"
    # InstructBLIP's processor prepends the query tokens itself.
    return f"{instruction}\nAnswer:"


def to_model_inputs(lm: LoadedModel, batch: Any) -> dict[str, torch.Tensor]:
    """A processor's output as model inputs: tensors on the model's device, floats in its dtype."""
    import torch

    dtype = next(lm.model.parameters()).dtype
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(lm.device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def generate(lm: LoadedModel, instructions: list[str], images: list[Any], max_new_tokens: int) -> list[str]:
    """Greedy batched generation, one answer per (instruction, image), each instruction wrapped in
    the family's chat format (format_prompt) and left-padded."""
    import torch

    prompts = [format_prompt(lm.family, text) for text in instructions]
    inputs = to_model_inputs(lm, lm.processor(images=images, text=prompts, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        out = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    return decode_new(lm, out, inputs["input_ids"].shape[1])


def decode_new(lm: LoadedModel, out: torch.Tensor, prompt_width: int) -> list[str]:
    """The generated text of each row of generate()'s output (the prompt's tokens dropped, when
    the model returns them)."""
    new_tokens = out[:, prompt_width:] if out.shape[1] > prompt_width else out
    return [t.strip() for t in lm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
