"""Result tables and plots for benchmarks: mean +- std over seeds, as markdown and a bar chart.

Every plugin's ``benchmark`` task returns :func:`seed_table`'s dict so ``accord demo`` can gather
the tables and plots into one summary page.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

__all__ = ["seed_table", "markdown_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def seed_table(
    rows: list[dict[str, Any]],
    out_dir: Path,
    *,
    metric: str,
    series: str,
    group: str,
    title: str,
    scale: float = 100.0,
) -> dict[str, Any]:
    """Aggregate per-seed results into mean +- std per (group, series) and plot them.

    Args:
        rows: one dict per run with keys ``metric``, ``series`` (e.g. ``"init"``) and ``group``
            (e.g. ``"label_fraction"``).
        out_dir: where ``results.json``, ``results.md`` and ``results.png`` are written.
        metric: the value to aggregate (e.g. ``"accuracy"``, ``"dice"``).
        series: bars within a group (e.g. pretrained vs random).
        group: x-axis groups.
        title: table/plot title.
        scale: multiplier for display (100 for percentages).

    Returns:
        ``{"markdown": str, "plots": [png path], "rows": rows, "summary": [...]}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    values: dict[tuple[Any, Any], list[float]] = defaultdict(list)
    for row in rows:
        values[(row[group], row[series])].append(float(row[metric]) * scale)
    groups = list(dict.fromkeys(row[group] for row in rows))
    names = list(dict.fromkeys(row[series] for row in rows))
    summary = []
    for g in groups:
        for s in names:
            vals = values[(g, s)]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary.append({group: g, series: s, "mean": statistics.fmean(vals), "std": std, "n": len(vals)})
    table = markdown_table(
        [group, series, f"{metric} (mean ± std)", "seeds"],
        [[r[group], r[series], f"{r['mean']:.2f} ± {r['std']:.2f}", r["n"]] for r in summary],
    )
    markdown = f"**{title}**\n\n{table}"

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(names), 1)
    for i, s in enumerate(names):
        stats = [next(r for r in summary if r[group] == g and r[series] == s) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], [r["mean"] for r in stats], width,
               yerr=[r["std"] for r in stats], capsize=3, label=str(s))
    # Long group names (e.g. "fine-tuning 25% + temporal voting") wrap instead of overlapping.
    labels = [textwrap.fill(str(g), width=16) for g in groups]
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(groups))], labels)
    ax.set_xlabel(group)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    plot = out_dir / "results.png"
    fig.savefig(plot, dpi=120)
    plt.close(fig)

    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    (out_dir / "results.md").write_text(markdown + "\n")
    return {"markdown": markdown, "plots": [str(plot)], "rows": rows, "summary": summary}
