"""``accord benchmark`` options: ``key=value`` overrides and ``--key value`` flags are the same thing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from accord.cli import app, flags_as_overrides


def test_flags_become_dotted_overrides() -> None:
    assert flags_as_overrides(["--method", "alice", "--alice-steps=300", "seeds=[0,1]", "--trainer.lr", "0.1"]) == [
        "method=alice", "alice_steps=300", "seeds=[0,1]", "trainer.lr=0.1"]
    with pytest.raises(ValueError, match="option --finetune-steps needs a value"):
        flags_as_overrides(["--finetune-steps"])


def test_an_unknown_flag_is_a_one_line_config_error_naming_the_closest_key(tmp_path) -> None:
    result = CliRunner().invoke(app, ["benchmark", "core", "--quick", "--out", str(tmp_path), "--pretrain-step", "5"])
    assert result.exit_code != 0
    assert "unknown key 'pretrain_step' (did you mean 'pretrain_steps'?)" in result.output
    assert not (tmp_path / "results.md").exists()


def test_data_synth_passes_key_value_options_to_the_generator(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "")
    result = CliRunner().invoke(app, ["data", "synth", "core", str(tmp_path / "shapes"), "per_class=2"])
    assert result.exit_code == 0, result.output
    assert {len(list(folder.iterdir())) for folder in (tmp_path / "shapes").iterdir()} == {2}
    wrong = CliRunner().invoke(app, ["data", "synth", "core", str(tmp_path / "other"), "per_klass=2"])
    assert wrong.exit_code == 2 and "accord data synth core:" in wrong.output and "per_klass" in wrong.output


def test_data_convert_says_when_a_format_needs_no_conversion(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "")
    result = CliRunner().invoke(app, ["data", "convert", "core", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "core.shapes has no converter: its training reads the data as distributed" in result.output
