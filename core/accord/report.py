"""Presentation of benchmark results: markdown tables, mean ± std over seeds, bar charts.

:mod:`accord.benchmarking` builds every benchmark's tables and plots with these helpers; plugins
use :func:`markdown_table` for their own run reports.
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path
from typing import Any, Sequence

from accord.utils.files import write_figure_atomically

__all__ = ["markdown_table", "mean_std", "format_mean_std", "bar_chart"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of ``values`` (std 0 for a single value).

    Raises:
        statistics.StatisticsError: ``values`` is empty.
    """
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """``"mean ± std"`` of ``values * scale`` with two decimals; ``"n/a"`` for no values."""
    if not values:
        return "n/a"
    mean, std = mean_std([value * scale for value in values])
    return f"{mean:.2f} ± {std:.2f}"


def bar_chart(
    summary: Sequence[dict[str, Any]], path: Path, *, group: str, series: str, ylabel: str, title: str
) -> Path:
    """Grouped bar chart with error bars: one group of bars per ``row[group]``, one bar per ``row[series]``.

    Args:
        summary: rows with the keys ``group``, ``series``, ``"mean"`` and ``"std"``, one per bar.
        path: the PNG to write.
        group: key of the x-axis groups (e.g. ``"label_fraction"``).
        series: key of the bars within a group (e.g. ``"init"``).
        ylabel: y-axis label.
        title: plot title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(row[group] for row in summary))
    names = list(dict.fromkeys(row[series] for row in summary))
    bars = {(row[group], row[series]): row for row in summary}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        present = [(x, bars[(g, name)]) for x, g in enumerate(groups) if (g, name) in bars]
        ax.bar([x + i * width for x, _ in present], [row["mean"] for _, row in present], width,
               yerr=[row["std"] for _, row in present], capsize=3, label=str(name))
    # Long group names (e.g. "fine-tuning 25% + temporal voting") wrap instead of overlapping.
    labels = [textwrap.fill(str(g), width=16) for g in groups]
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(groups))], labels)
    ax.set_xlabel(group)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, width=60), fontsize=10)
    ax.legend()
    fig.tight_layout()
    written = write_figure_atomically(fig, path, dpi=120)
    plt.close(fig)
    return written
