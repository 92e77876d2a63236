"""Loading Hugging Face image-text-to-text models, the system-neutral part: where a model is
(hub id, local folder, s3:// folder downloaded once per node), how it is loaded (AutoProcessor +
AutoModelForImageTextToText, safetensors only, trust_remote_code off unless asked, bf16 on GPU and
fp32 on CPU), what identifies it (hub commit, a hash of its files, or for an s3:// folder a hash of
its object listing), and how a family wraps a prompt. Systems add their own presets and test models
on top (news/models.py).

An s3:// model on a node: the processes that load it at once (actors, training ranks) take one
file lock; the first downloads into a temp folder renamed into place when complete, the others find
it there. The folder is named by the URI and the listing, so a model rewritten in place is a new
download, and the driver labels a run's rows from the listing alone (model_label), never
downloading the weights.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
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


LISTING_FILE = ".eama-s3-listing"  # in a downloaded folder: the listing fingerprint it was downloaded at


def s3_listing(uri: str) -> list[tuple[str, int, str]]:
    """(key under the folder, size, ETag) of every object of an s3:// folder, sorted."""
    fs, root = storage.filesystem(uri), storage.strip(uri).rstrip("/")
    found = storage.with_retries(f"list {uri}", lambda: fs.find(root, detail=True))
    return sorted((path[len(root) + 1:], int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or ""))
                  for path, info in found.items() if info.get("type") != "directory")


def listing_fingerprint(uri: str) -> str:
    """What identifies an s3:// model folder, from one listing (no object is read): a hash of its
    keys, sizes and ETags. The same files copied to another prefix keep it; a rewritten file changes it."""
    listing = s3_listing(uri)
    if not listing:
        raise FileNotFoundError(f"no model files under {uri}")
    return "s3:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def download(uri: str) -> str:
    """Copy an s3:// folder into this node's cache once; return the local path. Named by the URI and
    its listing fingerprint; concurrent callers on a node take one file lock, the first downloads
    into a temp folder and renames it into place when complete (a download cut short leaves only a
    temp folder, removed by the next one)."""
    import filelock

    tag = listing_fingerprint(uri)
    local = os.path.join(cache_dir(), "s3", hashlib.sha256(f"{uri}\0{tag}".encode()).hexdigest()[:16])
    if os.path.isdir(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with filelock.FileLock(local + ".lock"):
        if os.path.isdir(local):  # another process finished it while this one waited
            return local
        for stale in glob.glob(local + ".tmp-*"):  # only a dead process leaves one while the lock is free
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(local) + ".tmp-", dir=os.path.dirname(local))
        try:
            fs = storage.filesystem(uri)
            storage.with_retries(f"download {uri}", lambda: fs.get(storage.strip(uri).rstrip("/") + "/", tmp + "/",
                                                                   recursive=True))
            with open(os.path.join(tmp, LISTING_FILE), "w") as fh:
                fh.write(tag)
            os.rename(tmp, local)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return local


def config_folder(location: str) -> str:
    """A folder holding the model's config.json: an s3:// model's fetched alone (one GET, cached by
    URI and listing), any other location as it is."""
    location = exports.resolve_export(location)
    if not location.startswith("s3://"):
        return location
    key = hashlib.sha256(f"{location}\0{listing_fingerprint(location)}".encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir(), "s3-config", key)
    if not os.path.exists(os.path.join(folder, "config.json")):
        storage.write_bytes_atomic(os.path.join(folder, "config.json"),
                                   storage.read_bytes(storage.join(location, "config.json")))
    return folder


def resolve(location: str) -> str:
    """A loadable location: a run's export through its pointer (exports.resolve_export), s3:// URIs
    downloaded once; hub ids and local paths pass as they are."""
    location = exports.resolve_export(location)
    return download(location) if location.startswith("s3://") else location


def fingerprint(location: str, config: Any) -> str:
    """The hub commit when known; for a folder downloaded from S3 its listing fingerprint (what the
    driver labelled the run with); else a cheap hash of the local weights files (sizes + sampled bytes)."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return commit
    if not os.path.isdir(location):
        return "unknown"
    if os.path.exists(os.path.join(location, LISTING_FILE)):
        with open(os.path.join(location, LISTING_FILE)) as fh:
            return fh.read().strip()
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
    """'name@revision', else 'name@s3:hash-of-listing' for an s3:// model (nothing downloaded),
    'name@hash-of-files' for a local folder, else the name (hub id, no revision)."""
    if revision:
        return f"{name}@{revision}"
    if location.startswith("s3://"):
        return f"{name}@{listing_fingerprint(exports.resolve_export(location))}"
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
