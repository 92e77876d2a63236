"""What every resumable benchmark shares: its result files (one JSON per finished run, in a folder
kept in git so later sessions and machines skip those runs) and mean ± std cells."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from eama.engine import storage


def split_list(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [p.strip() for p in text.split(",") if p.strip()]


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
