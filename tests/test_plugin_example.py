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


def _result(run: subprocess.CompletedProcess) -> dict:
    """The task result that ``accord run`` prints last (progress lines come before it)."""
    return json.loads(run.stdout[run.stdout.rindex("\n{\n") + 1:] if "\n{\n" in run.stdout else run.stdout)


def test_example_plugin_end_to_end(example_plugin: Path, tmp_path: Path) -> None:
    listing = _accord(example_plugin, "plugins", "--json", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    hello = rows["hello"]
    assert hello["version"] == "0.0.1" and hello["domain"] == "example" and not hello["builtin"]
    assert hello["tasks"] == ["pretrain", "evaluate"]
    assert hello["components"] == {"model": ["contrastive"], "dataset": ["points"], "benchmark": ["linear_probe"]}
    assert set(hello["hooks"]) == {"plugin_info", "register_tasks", "register_datasets", "register_models",
                                   "register_benchmarks", "register_commands"}
    assert {"engine", "core"} <= rows.keys()

    synth = _accord(example_plugin, "data", "synth", "hello", "points_dir", cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr
    check = _accord(example_plugin, "data", "check", "hello", "points_dir", cwd=tmp_path)
    assert check.returncode == 0 and "OK" in check.stdout
    bad = _accord(example_plugin, "data", "check", "hello", "nowhere", cwd=tmp_path)
    assert bad.returncode == 1 and "nowhere/points.csv: missing" in bad.stdout

    (tmp_path / "hello.yaml").write_text(_blocks("yaml")[0])
    run = _accord(example_plugin, "run", "hello.yaml", "trainer.max_steps=20", "run_dir=out", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert _result(run)["step"] == 20
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "probe/miou" in r]
    assert [r["step"] for r in probes] == [0, 20]  # a baseline before training, then every 20 steps

    command = _accord(example_plugin, "hello", "you", cwd=tmp_path)
    assert command.stdout.strip() == "hello you"


def test_example_checkpoint_rebuilds_through_its_model_factory(example_plugin: Path, tmp_path: Path) -> None:
    _accord(example_plugin, "data", "synth", "hello", "points_dir", cwd=tmp_path)
    (tmp_path / "hello.yaml").write_text(_blocks("yaml")[0])
    run = _accord(example_plugin, "run", "hello.yaml", "trainer.max_steps=4", "run_dir=out", cwd=tmp_path)
    checkpoint = Path(_result(run)["checkpoint"])
    script = (
        "import sys; from accord.runs import load_run; run = load_run(sys.argv[1]); "
        "print(type(run.model).__name__, run.record['model_factory'], run.step)"
    )
    env = {**os.environ, "PYTHONPATH": str(example_plugin), "ACCORD_LOAD_PLUGINS": "hello"}
    loaded = subprocess.run([sys.executable, "-c", script, str(tmp_path / checkpoint)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert loaded.stdout.split() == ["Contrastive", "hello.contrastive", "4"], loaded.stderr


def test_example_benchmark_compares_pretrained_and_random(example_plugin: Path, tmp_path: Path) -> None:
    result = _accord(example_plugin, "benchmark", "hello", "--quick", "steps=10", "--out", "bench", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    runs = saved["rows"]
    assert {(r["init"], r["seed"]) for r in runs} == {("random", 0), ("random", 1), ("pretrained", 0), ("pretrained", 1)}
    assert all(0 <= r["miou"] <= 1 for r in runs)
    assert (tmp_path / "bench" / "results.png").is_file()


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
