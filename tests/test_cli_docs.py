"""docs/cli.md documents every command with its current help text."""

from __future__ import annotations

from pathlib import Path

import typer

from accord.cli import app

DOC = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()


def _commands(application: typer.Typer, prefix: str = "") -> list[tuple[str, str]]:
    found = [(prefix + (c.name or c.callback.__name__), c.callback.__doc__ or "") for c in application.registered_commands]
    for group in application.registered_groups:
        found += _commands(group.typer_instance, prefix + group.name + " ")
    return found


def test_every_command_has_a_section_with_its_summary_and_examples() -> None:
    commands = _commands(app)
    assert {name for name, _ in commands} >= {"plugins", "run", "data synth", "data check", "benchmark", "export", "schema", "demo"}
    for name, doc in commands:
        assert f"## accord {name}\n" in DOC, f"docs/cli.md lacks a section for 'accord {name}'"
        summary = doc.strip().splitlines()[0]
        assert " ".join(summary.split()) in " ".join(DOC.split()), f"docs/cli.md has a stale summary for {name}"
        assert "Examples:" in doc, f"'accord {name} --help' has no examples"
