"""``accord demo``: every selected plugin's quick benchmark, gathered into one summary page."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

__all__ = ["run_demo"]


def run_demo(plugins: list[str], out: Path, without_pipeline: list[str] | None = None) -> Path:
    """Run ``accord benchmark PLUGIN --quick`` for each plugin and write ``out/summary.md``.

    Args:
        plugins: plugin names, each with a ``benchmark`` task.
        out: output directory; each plugin writes to ``out/<plugin>/``.
        without_pipeline: installed plugins that have no ``benchmark`` task yet; the summary
            lists them so a reader knows they were not skipped silently.

    Returns:
        The path of the summary page (tables and links to each plugin's plots).
    """
    from accord.cli import run_benchmark

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# accord demo", "", f"Plugins: {', '.join(plugins)}", ""]
    for plugin in plugins:
        console.rule(f"[bold]{plugin}: quick benchmark")
        start = time.perf_counter()
        result = run_benchmark(plugin, data=None, quick=True, out=out / plugin, options=[])
        minutes = (time.perf_counter() - start) / 60
        sections += [f"## {plugin}", "", f"Ran `accord benchmark {plugin} --quick` in {minutes:.1f} min.", ""]
        sections += [result.get("markdown", "(no table)"), ""]
        for plot in result.get("plots", []):
            rel = Path(plot).resolve().relative_to(out.resolve())
            sections += [f"![{plugin} {rel.stem}]({rel.as_posix()})", ""]
    for plugin in without_pipeline or []:
        sections += [f"## {plugin}", "", "No quick pipeline (`benchmark` task) registered yet.", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(sections))
    return summary
