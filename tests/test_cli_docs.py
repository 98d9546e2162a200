"""docs/cli.md documents every command, the installed plugins' included, with its current help text."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from accord.cli import app
from accord.plugins import get_host

DOC = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()


def _commands(application: typer.Typer, prefix: str = "") -> list[tuple[str, str]]:
    found = [(prefix + (c.name or c.callback.__name__), c.callback.__doc__ or "") for c in application.registered_commands]
    for group in application.registered_groups:
        found += _commands(group.typer_instance, prefix + group.name + " ")
    return found


@pytest.fixture
def app_with_plugin_commands() -> typer.Typer:
    """accord's app with the installed plugins' commands, as its main() builds it (restored afterwards)."""
    groups = {group.name: list(group.typer_instance.registered_commands) for group in app.registered_groups}
    commands = list(app.registered_commands)
    get_host().add_commands(app)
    yield app
    app.registered_commands[:] = commands
    for group in app.registered_groups:
        group.typer_instance.registered_commands[:] = groups[group.name]


def test_every_command_has_a_section_with_its_summary_and_examples(app_with_plugin_commands: typer.Typer) -> None:
    commands = _commands(app_with_plugin_commands)
    assert {name for name, _ in commands} >= {"plugins", "run", "data synth", "data check", "data convert", "benchmark",
                                              "export", "schema", "demo"}
    for name, doc in commands:
        assert f"## accord {name}\n" in DOC, f"docs/cli.md lacks a section for 'accord {name}'"
        summary = doc.strip().splitlines()[0]
        assert " ".join(summary.split()) in " ".join(DOC.split()), f"docs/cli.md has a stale summary for {name}"
        assert "Examples:" in doc, f"'accord {name} --help' has no examples"
