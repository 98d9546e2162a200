"""The README's "Using it" commands work in order, as a new user types them (benchmarks aside)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from accord.cli import app

REPO = Path(__file__).resolve().parents[1]


def _using_it_commands() -> list[list[str]]:
    section = (REPO / "README.md").read_text().split("## Using it", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("accord ")]


def test_readme_commands_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    commands = [args for args in _using_it_commands() if args[0] != "benchmark"]  # the benchmarks have their own tests
    assert [args[0] for args in commands] == ["data", "data", "run", "run", "export"]
    for args in commands:
        # The README's step count, shrunk consistently: the checkpoint it names must be the one written.
        args = [arg.replace("max_steps=200", "max_steps=12").replace("step_00000200", "step_00000012") for arg in args]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"accord {shlex.join(args)}\n{result.output}"
    assert (tmp_path / "encoder.safetensors").is_file()
