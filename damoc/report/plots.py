"""PNG plots for the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def layer_scores_png(path: Path, scores: list[float], removed: list[int], title: str, ylabel: str) -> Path:
    """Bars of per-layer scores, removed layers in red."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(scores) + 2), 3.2), dpi=110)
    gone = set(removed)
    colors = ["#d62728" if i in gone else "#1f77b4" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("layer (red: removed)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(len(scores)))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
