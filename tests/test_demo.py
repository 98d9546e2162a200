"""``accord demo`` gathers each plugin's quick pipeline benchmark into runs/demo/summary.md."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from accord.benchmarking import BenchmarkResult, ResultTable
from accord.cli import app
from accord.config import BenchmarkConfig
from accord.hookspecs import hookimpl
from accord.plugins import get_host


class _QuickPlugin:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ran: list[bool] = []
        self.threads: list[int] = []

    @hookimpl
    def register_benchmarks(self, register):
        def pipeline(cfg: BenchmarkConfig) -> BenchmarkResult:
            self.ran.append(cfg.quick)
            self.threads.append(torch.get_num_threads())
            plot = cfg.run_dir / "plot.png"
            plot.write_bytes(b"png")
            return BenchmarkResult(f"{self.name} pipeline", [ResultTable("scores", ["quick"], [[cfg.quick]])],
                                   plots=[plot])

        register("pipe", pipeline, config=BenchmarkConfig)
        register("fast", lambda cfg: BenchmarkResult.measured("never in the demo", {}), config=BenchmarkConfig,
                 kind="speed")


class _NoPipeline:
    @hookimpl
    def plugin_info(self):
        return {"domain": "test"}


def test_demo_writes_summary_with_tables_plots_and_notes(tmp_path: Path) -> None:
    host = get_host()
    # Stand-ins for the core pipeline (tested in tests/toy) and a plugin's, to keep this test fast.
    host.pm.unregister(name="core")
    core, quick = _QuickPlugin("core"), _QuickPlugin("quickplug")
    host.pm.register(core, name="core")
    host.pm.register(quick, name="quickplug")
    host.pm.register(_NoPipeline(), name="bare")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--plugin", "quickplug", "--plugin", "bare"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert core.ran == [True] and quick.ran == [True]
    summary = (out / "summary.md").read_text()
    assert summary.index("## core") < summary.index("## quickplug") < summary.index("## bare")
    assert "### quickplug pipeline" in summary and "| True |" in summary and "never in the demo" not in summary
    assert f"`accord benchmark quickplug pipe --quick --out {out / 'quickplug' / 'pipe'}`" in summary
    assert "![quickplug.pipe plot](quickplug/pipe/plot.png)" in summary
    assert "No pipeline benchmark registered yet." in summary.split("## bare")[1]
    assert (out / "quickplug" / "pipe" / "results.md").is_file()


def test_demo_threads_option_runs_every_benchmark_with_that_many_torch_threads(tmp_path: Path) -> None:
    host = get_host()
    host.pm.unregister(name="core")
    core = _QuickPlugin("core")
    host.pm.register(core, name="core")
    before = torch.get_num_threads()
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--plugin", "core", "--threads", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert core.threads == [1] and torch.get_num_threads() == before
    summary = (out / "summary.md").read_text()
    # The command reproduces the thread count, and the page says what the run saw.
    assert f"`accord benchmark core pipe --quick --out {out / 'core' / 'pipe'} threads=1`" in summary
    assert "1 torch threads on" in summary and ", load " in summary
