"""``accord benchmark medssl --method gemini``: GEMINI-Semi vs supervised only, GEMINI-MIP vs random init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from accord.benchmarking import benchmark_config, find_benchmark
from accord.cli import app
from accord.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_method_gemini_runs_both_comparisons_through_the_cli(only_medssl, tmp_path: Path) -> None:
    """The quick sizes with one iteration / two steps per run and one seed: the chain and its outputs, not the numbers."""
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "benchmark", "medssl", "--method", "gemini", "--quick", "--out", str(out), "gemini.semisup_iterations=1",
        "gemini.pretrain_iterations=1", "gemini.finetune_steps=2", "seeds=[0]", "label_fractions=[1.0]"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    runs = {(row["comparison"], row["init"]) for row in saved["rows"]}
    assert runs == {("semi-supervised, 1 labelled", "supervised only"), ("semi-supervised, 1 labelled", "GEMINI-Semi"),
                    ("fine-tune, 100% labels", "random init"), ("fine-tune, 100% labels", "GEMINI-MIP")}
    assert all(0.0 <= row["dice"] <= 1.0 and "liver" in row["dice_per_class"] for row in saved["rows"])
    downstream = out / "downstream"
    semi, supervised = (yaml.safe_load((downstream / "semi-supervised_1_labelled" / f"{init}_seed0" / "config.yaml")
                                       .read_text()) for init in ("gemini", "random"))
    # Same labelled cases and CE + Dice steps; the baseline has no correspondence gradient and one Adam step each.
    assert semi["labelled_cases"] == supervised["labelled_cases"] == 1
    assert (semi["trainer"]["max_steps"], supervised["trainer"]["max_steps"]) == (2, 1)
    assert semi["gemini"]["loss"]["optimizer_steps"] == "two" and semi["gemini"]["loss"]["ncc_weight"] == 1.0
    assert supervised["gemini"]["loss"]["optimizer_steps"] == "combined"
    assert [supervised["gemini"]["loss"][f"{term}_weight"] for term in ("smooth", "gss", "ncc")] == [0.0, 0.0, 0.0]
    tuned = yaml.safe_load((downstream / "fine-tune_100_labels" / "gemini_seed0" / "config.yaml").read_text())
    assert tuned["network"] == "gemini_unet"
    assert Path(tuned["checkpoint"]).parent.parent == out / "pretrain" / "seed0"
    scratch = yaml.safe_load((downstream / "fine-tune_100_labels" / "random_seed0" / "config.yaml").read_text())
    assert scratch["checkpoint"] is None and scratch["gemini_unet"] == tuned["gemini_unet"]
    markdown = (out / "results.md").read_text()
    assert "| semi-supervised, 1 labelled | GEMINI-Semi |" in markdown and "| fine-tune, 100% labels | random init |" in markdown
    assert "| comparison | init | liver |" in markdown and (out / "results.png").is_file()


def test_gemini_segmentation_is_its_own_benchmark_and_the_default_stays_alice(only_medssl, tmp_path: Path) -> None:
    named = find_benchmark("medssl", "gemini_segmentation")
    assert benchmark_config(named, quick=True, out=tmp_path).method == "gemini"
    default = find_benchmark("medssl")
    assert default.name == "segmentation" and benchmark_config(default, quick=True, out=tmp_path).method == "alice"
    with pytest.raises(ConfigError, match="alice_steps: settings of method alice; method gemini's are under gemini"):
        benchmark_config(default, out=tmp_path, options=["method=gemini", "alice_steps=3"])
    with pytest.raises(ConfigError, match="gemini: settings of method gemini, but method is alice"):
        benchmark_config(default, out=tmp_path, options=["gemini.finetune_steps=3"])
