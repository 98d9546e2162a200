"""The minimal plugin from docs/plugins.md, installed through a real entry point and driven by the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write the docs' plugin as an installed distribution (package + dist-info with entry points)."""
    site = tmp_path_factory.mktemp("site")
    project = tomllib.loads(_blocks("toml")[0])["project"]
    package = site / "accord_hello"
    package.mkdir()
    (package / "__init__.py").write_text(_blocks("python")[0])
    dist_info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    entry_points = "".join(f"{k} = {v}\n" for k, v in project["entry-points"]["accord"].items())
    (dist_info / "entry_points.txt").write_text(f"[accord]\n{entry_points}")
    return site


def _accord(site: Path, *args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Load only the example plugin: other installed plugins must not change what this test sees.
    env = {**os.environ, "PYTHONPATH": str(site), "ACCORD_LOAD_PLUGINS": "hello", **(env_extra or {})}
    env.pop("ACCORD_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "accord.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_example_plugin_end_to_end(example_plugin: Path, tmp_path: Path) -> None:
    listing = _accord(example_plugin, "plugins", "--json", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    hello = rows["hello"]
    assert hello["version"] == "0.0.1" and hello["domain"] == "example" and not hello["builtin"]
    assert hello["tasks"] == ["count"]
    assert hello["components"] == {"dataset": ["corpus"]}
    assert set(hello["hooks"]) == {"plugin_info", "register_tasks", "register_datasets", "register_commands"}
    assert {"engine", "core"} <= rows.keys()

    synth = _accord(example_plugin, "data", "synth", "hello", "corpus_dir", cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr
    check = _accord(example_plugin, "data", "check", "hello", "corpus_dir", cwd=tmp_path)
    assert check.returncode == 0 and "OK" in check.stdout
    bad = _accord(example_plugin, "data", "check", "hello", "nowhere", cwd=tmp_path)
    assert bad.returncode == 1 and "nowhere/corpus.txt: missing" in bad.stdout

    (tmp_path / "hello.yaml").write_text(_blocks("yaml")[0])
    run = _accord(example_plugin, "run", "hello.yaml", "min_count=2", "run_dir=out", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"word": "hello", "count": 2, "enough": True}
    assert "min_count: 2" in (tmp_path / "out" / "config.yaml").read_text()

    command = _accord(example_plugin, "hello", "you", cwd=tmp_path)
    assert command.stdout.strip() == "hello you"


def test_load_filter_hides_plugin_and_errors_name_installed_ones(example_plugin: Path, tmp_path: Path) -> None:
    env = {"ACCORD_LOAD_PLUGINS": ""}
    listing = _accord(example_plugin, "plugins", "--json", cwd=tmp_path, env_extra=env)
    assert [r["name"] for r in json.loads(listing.stdout)] == ["engine", "core"]
    (tmp_path / "hello.yaml").write_text(_blocks("yaml")[0])
    run = _accord(example_plugin, "run", "hello.yaml", cwd=tmp_path, env_extra=env)
    assert run.returncode == 2
    message = " ".join(run.stderr.split())
    assert "plugin 'hello' is not installed" in message
    assert "Installed plugins: engine, core" in message
    assert "pip install accord-hello" in message
