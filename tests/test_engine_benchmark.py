"""``accord benchmark engine --speed tiled_infonce`` runs dense and tiled in child processes and reports a table."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from accord.benchmarks.engine import predicted_dense_bytes
from accord.cli import app


def test_quick_engine_benchmark_writes_table_and_plot(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["benchmark", "engine", "--speed", "tiled_infonce", "--out", str(tmp_path), "sizes=[300]"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "dense vs tiled" in result.output
    table = (tmp_path / "results.md").read_text()
    assert "| 300 | dense | ok |" in table and "| 300 | tiled | ok |" in table
    assert "accord benchmark engine --speed tiled_infonce" in table
    assert (tmp_path / "results.png").stat().st_size > 0


def test_dense_memory_prediction_matches_four_fp32_matrices() -> None:
    assert predicted_dense_bytes(1024) == 4 * 1024 * 1024 * 4
