"""``accord demo``: every selected plugin's quick pipeline benchmark, gathered into one summary page."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from accord.benchmarking import benchmark_config, benchmarks_of, run_benchmark
from accord.utils.files import write_text_atomically

__all__ = ["run_demo"]


def run_demo(plugins: list[str], out: Path, threads: int | None = None) -> Path:
    """Run the quick version of each plugin's pipeline benchmarks and write ``out/summary.md``.

    Args:
        plugins: plugin names, in page order; a plugin without a pipeline benchmark is listed as
            such, so a reader knows it was not skipped silently.
        out: output directory; each benchmark writes to ``out/<plugin>/<benchmark>/``.
        threads: torch threads of every benchmark (:attr:`~accord.config.BenchmarkConfig.threads`);
            None: torch's default.

    Returns:
        The path of the summary page: per benchmark its tables, notes, command line and wall time
        (:meth:`~accord.benchmarking.BenchmarkResult.markdown`) and its plots.

    Raises:
        PluginNotInstalledError: a plugin is not loaded.
        ValueError: a benchmark's data check failed.
    """
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# accord demo", "", f"Plugins: {', '.join(plugins)}", ""]
    for plugin in plugins:
        sections += [f"## {plugin}", ""]
        pipelines = benchmarks_of(plugin, "pipeline")
        if not pipelines:
            sections += ["No pipeline benchmark registered yet.", ""]
        for component in pipelines:
            console.rule(f"[bold]{component.qualname}: quick benchmark")
            options = [] if threads is None else [f"threads={threads}"]
            cfg = benchmark_config(component, quick=True, out=out / plugin / component.name, options=options)
            result = run_benchmark(component, cfg)
            sections += [result.markdown(level=3)]
            for plot in result.plots:
                rel = Path(plot).resolve().relative_to(out.resolve())
                sections += [f"![{component.qualname} {rel.stem}]({rel.as_posix()})", ""]
    return write_text_atomically(out / "summary.md", "\n".join(sections))
