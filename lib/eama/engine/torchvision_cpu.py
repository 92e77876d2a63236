"""Make PyPI's torchvision 0.28.0 (a CUDA build) importable beside the CPU torch, for vLLM on CPU.

Its compiled ops (_C.so) link libtorch_cuda and fail to load, and two of its fake-op registrations
(torchvision::nms, ::qnms) then raise at import. This deletes _C.so and makes those two
registrations conditional on the ops being loaded, as its other ones already are. transforms.v2
and the image processors work afterwards (torchvision.ops does not; vLLM does not use it).
Run by `make vllm` (`python -m eama.engine.torchvision_cpu`); running it twice changes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys

FAKE = '@torch.library.register_fake("torchvision::{op}")'
GUARDED = '@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))'


def main() -> int:
    spec = importlib.util.find_spec("torchvision")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed", file=sys.stderr)
        return 1
    root = spec.submodule_search_locations[0]
    for name in os.listdir(root):
        if name.startswith("_C") and name.endswith(".so"):
            os.remove(os.path.join(root, name))
    path = os.path.join(root, "_meta_registrations.py")
    with open(path) as fh:
        text = fh.read()
    for op in ("nms", "qnms"):
        text = text.replace(FAKE.format(op=op), GUARDED.format(op=op))
    with open(path, "w") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
