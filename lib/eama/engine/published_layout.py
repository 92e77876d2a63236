"""Saving image-text models in the published checkpoint layout, which transformers and vLLM both load.

transformers 5.x `save_pretrained` of a LLaVA writes its CLIP tower as `vision_tower.embeddings.*`,
`vision_tower.encoder.*`, ...; the published checkpoints (llava-hf/*) and vLLM's loader use
`vision_tower.vision_model.*` ("There is no module or parameter named 'vision_tower.embeddings'").
`save_image_text_model` saves as transformers does and then renames those keys in the written
safetensors files (and their index), so an export loads in vLLM as it is; transformers reads the
renamed files back to the same weights. Every model eama writes goes through it: the tiny test
models, train_alignment's export, the benchmarks' saved models.
"""

from __future__ import annotations

import json
import os
from typing import Any

TOWER = "vision_tower."
PUBLISHED_TOWER = "vision_tower.vision_model."
INDEX = "model.safetensors.index.json"


def published_key(key: str) -> str:
    """A LLaVA weight name in the published layout: `vision_tower.X` -> `vision_tower.vision_model.X`."""
    if key.startswith(TOWER) and not key.startswith(PUBLISHED_TOWER):
        return PUBLISHED_TOWER + key[len(TOWER):]
    return key


def needs_published_layout(config: Any) -> bool:
    """LLaVA with a CLIP (or SigLIP) tower: the families whose published layout nests `vision_model`."""
    vision = getattr(config, "vision_config", None)
    return (getattr(config, "model_type", None) == "llava"
            and getattr(vision, "model_type", "") in ("clip_vision_model", "siglip_vision_model"))


def to_published_layout(directory: str) -> int:
    """Rename the vision-tower keys of every safetensors file in `directory` (and the index of a
    sharded save) to the published layout; return how many keys changed. Idempotent."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(directory, name)
        with safe_open(path, "pt") as fh:
            if all(published_key(k) == k for k in fh.keys()):
                continue
            metadata = fh.metadata() or {"format": "pt"}
            tensors = {published_key(k): fh.get_tensor(k) for k in fh.keys()}
        renamed += sum(1 for k in tensors if k.startswith(PUBLISHED_TOWER))
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        with open(index) as fh:
            data = json.load(fh)
        data["weight_map"] = {published_key(k): v for k, v in data.get("weight_map", {}).items()}
        with open(index, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
    return renamed


def save_image_text_model(model: Any, processor: Any, directory: str, state_dict: dict[str, Any] | None = None) -> str:
    """save_pretrained (safetensors) of `model` and `processor` into `directory`, in the published
    layout where the family has one (module docstring)."""
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(directory)
    if needs_published_layout(model.config):
        to_published_layout(directory)
    return directory
