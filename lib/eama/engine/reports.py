"""Writing a job's report: report.json (raw numbers), report.md (the table a person reads) and
report.png (a bar chart), the same layout for every system's evaluation."""

from __future__ import annotations

import io
from typing import Any, Sequence

from eama.engine import storage


def bar_chart_png(items: Sequence[tuple[str, float | None]], title: str, ylabel: str = "score x100") -> bytes:
    """Bars of `items` (values in 0..1, drawn x100; None is marked n/a)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(items)), 4))
    values = [0.0 if v is None else 100 * v for _, v in items]
    bars = ax.bar(range(len(items)), values, color="#4477aa")
    for bar, (_, v) in zip(bars, items):
        ax.annotate("n/a" if v is None else f"{100 * v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(items)), [n for n, _ in items], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict[str, Any], markdown: str, png: bytes, output: str) -> str:
    """report.json / report.md / report.png under `output` (local or s3://); returns the markdown."""
    storage.write_json_atomic(storage.join(output, "report.json"), report)
    storage.write_bytes_atomic(storage.join(output, "report.md"), markdown.encode())
    storage.write_bytes_atomic(storage.join(output, "report.png"), png)
    return markdown
