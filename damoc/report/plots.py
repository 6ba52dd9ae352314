"""PNG plots for the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def layer_scores_png(path: Path, rows: list[tuple[str, str, list[float], list[int], list[int]]]) -> Path:
    """Every candidate's per-layer scores in one compact figure, a strip each (rows: name, score name,
    scores, removed, protected): removed layers in red, protected ones hatched."""
    width = max(5.0, 0.22 * max(len(r[2]) for r in rows) + 2.2)
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 1.05 * len(rows) + 0.6), dpi=110, squeeze=False)
    for ax, (name, score, scores, removed, protected) in zip(axes[:, 0], rows):
        gone, kept_safe = set(removed), set(protected)
        bars = ax.bar(range(len(scores)), scores, color=["#d62728" if i in gone else "#1f77b4"
                                                         for i in range(len(scores))], width=0.8)
        for i in kept_safe:
            if i < len(bars):
                bars[i].set_hatch("//")
                bars[i].set_edgecolor("#444")
        positive = [v for v in scores if v > 0]
        if positive and len(positive) == len(scores) and max(positive) > 30 * min(positive):
            ax.set_yscale("log")  # one layer (often the first) dwarfs the rest: the rest would be invisible
        for i in gone:  # a mark under each removed layer, however small its bar
            ax.annotate("", xy=(i, 0), xycoords=("data", "axes fraction"), xytext=(i, -0.28),
                        textcoords=("data", "axes fraction"), arrowprops={"arrowstyle": "-|>", "color": "#d62728"})
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_yticks([])
        ax.minorticks_off()
        ax.set_xlim(-0.6, len(scores) - 0.4)
        ax.set_xticks(range(0, len(scores), max(1, len(scores) // 16)))
        ax.tick_params(axis="x", labelsize=7, length=2)
        ax.text(1.0, 1.0, score + (", log scale" if ax.get_yscale() == "log" else ""), transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="#555")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    axes[-1, 0].set_xlabel("layer (red: removed; hatched: protected)", fontsize=8)
    fig.tight_layout(h_pad=0.3)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def learning_curves_png(path: Path, curves: dict[str, list[tuple[int, float]]], stopped: set[str],
                        metric: str) -> Path:
    """One line per candidate (metric vs step); an early stop is marked with an x at its last point."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points)
        (line,) = ax.plot(steps, values, marker="o", markersize=3, label=name + (" (stopped)" if name in stopped else ""))
        if name in stopped:
            ax.plot(steps[-1], values[-1], marker="x", markersize=11, mew=2.5, color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel(metric + (" (bits per answer byte)" if metric == "eval_loss" else ""))
    ax.set_title("Learning curves (x: stopped early by ASHA)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def bars_png(path: Path, labels: list[str], values: list[float], title: str, ylabel: str,
             colors: list[str] | None = None) -> Path:
    """Plain labelled bars (data funnel, cost per stage)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.2), dpi=110)
    ax.bar(range(len(values)), values, color=colors or "#1f77b4")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.4g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def stacked_bars_png(path: Path, parts: dict[str, dict[str, float]], title: str, xlabel: str) -> Path:
    """One horizontal bar per row (dict key), split into its named parts (same names in every row)."""
    names = list(parts)
    groups = list(next(iter(parts.values()))) if parts else []
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(names) + 1.9), dpi=110)
    left = [0.0] * len(names)
    for g in groups:
        widths = [parts[n][g] for n in names]
        ax.barh(names, widths, left=left, label=g)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(5, len(groups)), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def histogram_png(path: Path, values, title: str, xlabel: str, bins: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.0), dpi=110)
    ax.hist(values, bins=bins, color="#1f77b4")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
