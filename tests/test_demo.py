"""``accord demo`` gathers each plugin's quick benchmark into runs/demo/summary.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from accord.cli import app
from accord.config import BenchmarkConfig
from accord.hookspecs import hookimpl
from accord.plugins import get_host


class _QuickPlugin:
    @hookimpl
    def register_tasks(self, register):
        def benchmark(cfg: BenchmarkConfig) -> dict:
            plot = cfg.run_dir / "plot.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot.write_bytes(b"png")
            return {"markdown": f"| quick | {cfg.quick} |", "plots": [str(plot)]}

        register("benchmark", benchmark, config=BenchmarkConfig)


class _NoPipeline:
    @hookimpl
    def plugin_info(self):
        return {"domain": "test"}


def test_demo_writes_summary_with_tables_plots_and_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = get_host()
    host.pm.register(_QuickPlugin(), name="quickplug")
    host.pm.register(_NoPipeline(), name="bare")
    import accord.cli

    ran = []
    real = accord.cli.run_benchmark

    def only_test_plugins(plugin, **kwargs):
        ran.append(plugin)
        if plugin == "core":  # the real core pipeline is tested in tests/toy; keep this test fast
            return {"markdown": "core table", "plots": []}
        return real(plugin, **kwargs)

    monkeypatch.setattr(accord.cli, "run_benchmark", only_test_plugins)
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--plugin", "quickplug", "--plugin", "bare"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert ran == ["core", "quickplug"]
    summary = (out / "summary.md").read_text()
    assert "| quick | True |" in summary and "core table" in summary
    assert "![quickplug plot](quickplug/plot.png)" in summary
    assert "## bare" in summary and "No quick pipeline" in summary
