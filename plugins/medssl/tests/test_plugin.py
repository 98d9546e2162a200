"""The plugin through accord's host and CLI: registration, ``accord data synth/check medssl``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from accord.plugins import PluginHost



def test_plugin_registers_the_msd_dataset(only_medssl, msd_root: Path) -> None:
    host = PluginHost()
    row = next(row for row in host.describe() if row["name"] == "medssl")
    assert row["domain"] == "3D medical imaging" and row["version"] == "0.1.0"
    assert row["components"]["dataset"] == ["msd"]
    dataset = host.datasets.get("medssl.msd")
    assert dataset.extra["check"](msd_root) == []


def test_cli_synth_then_check(only_medssl, tmp_path: Path, msd_root: Path) -> None:
    from typer.testing import CliRunner

    from accord.cli import app

    runner = CliRunner()
    out = tmp_path / "phantoms"
    result = runner.invoke(app, ["data", "synth", "medssl", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "dataset.json").is_file() and len(list((out / "imagesTr").glob("*.nii.gz"))) == 6
    result = runner.invoke(app, ["data", "check", "medssl", str(out)])
    assert result.exit_code == 0 and "OK" in result.output, result.output

    broken = shutil.copytree(msd_root, tmp_path / "broken")
    (broken / "labelsTr" / "phantom_001.nii.gz").unlink()
    result = runner.invoke(app, ["data", "check", "medssl", str(broken)])
    assert result.exit_code == 1
    assert f"{broken / 'labelsTr' / 'phantom_001.nii.gz'}: missing" in result.output
