"""medssl's benchmarks: the segmentation pipeline through the CLI, and the speed benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from accord.cli import app
from accord_medssl.benchmarks import loader_throughput


def test_loader_throughput_reports_cold_and_cached_rates(msd_root: Path, phantom_spec) -> None:
    result = loader_throughput(msd_root)
    assert result["volumes"] == phantom_spec.num_train
    rates = ("uncached_volumes_per_s", "cold_volumes_per_s", "cached_volumes_per_s")
    assert all(result[key] > 0 for key in rates)
    assert result["cache_speedup"] == pytest.approx(result["cached_volumes_per_s"] / result["uncached_volumes_per_s"])
    # Image float32 + label uint8 per case, plus pickled metadata.
    voxels = phantom_spec.shape[0] * phantom_spec.shape[1] * phantom_spec.shape[2]
    assert result["cache_mb"] * 2**20 > phantom_spec.num_train * voxels * 5


def test_loader_throughput_synthesises_when_no_root_is_given() -> None:
    assert loader_throughput(num_cases=2, shape=(24, 24, 16))["volumes"] == 2


def test_segmentation_benchmark_through_the_cli(only_medssl, tmp_path: Path) -> None:
    """The pipeline on the quick sizes with two steps per stage: the chain and its outputs, not the numbers."""
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", "medssl", "segmentation", "--quick", "--out", str(out), "--anatomy-steps", "2",
                                      "alice_steps=2", "finetune_steps=2", "seeds=[0, 1]", "label_fractions=[1.0]"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    runs = {(row["protocol"], row["init"], row["seed"]) for row in saved["rows"]}
    assert runs == {(p, i, s) for p in ("finetune", "frozen_probe") for i in ("random", "alice") for s in (0, 1)}
    assert all(0.0 <= row["dice"] <= 1.0 and "liver" in row["dice_per_class"] for row in saved["rows"])
    assert all(row["label_fraction"] == 1.0 and row["labelled_cases"] == 5 for row in saved["rows"])
    # The quick run pretrains per seed (anatomy embedding, then Alice mining with it); each seed's
    # Alice fine-tuning and frozen probe start from its own.
    for seed in (0, 1):
        pretrain = out / "pretrain" / f"seed{seed}"
        alice = yaml.safe_load((pretrain / "alice" / "config.yaml").read_text())
        assert alice["seed"] == seed
        assert Path(alice["mining"]["anatomy_checkpoint"]).parent.parent == pretrain / "anatomy_embedding"
        tuned = yaml.safe_load((out / "downstream" / "fine-tune_100_labels" / f"alice_seed{seed}" / "config.yaml").read_text())
        assert tuned["seed"] == seed and Path(tuned["checkpoint"]).parent.parent == pretrain / "alice"
        assert tuned["class_weights"] == "inverse_sqrt_frequency"  # the quick preset
        probed = json.loads((out / "downstream" / "frozen_probe_100_labels" / f"alice_seed{seed}" / "results.json").read_text())
        assert Path(probed["initialisation"]["checkpoint"]).parent.parent == pretrain / "alice"
    markdown = (out / "results.md").read_text()
    assert "| fine-tune, 100% labels | alice |" in markdown and "| frozen probe, 100% labels | random |" in markdown
    assert "| protocol, labels | init | liver |" in markdown and "frozen probe: the same network frozen" in markdown
    assert "| FLARE 2022 | +2.11 |" in markdown and "Pretrained once" not in markdown


def test_speed_benchmarks_list_and_run(only_medssl, tmp_path: Path) -> None:
    listing = CliRunner().invoke(app, ["benchmark", "medssl", "--speed"])
    assert all(name in listing.output for name in ("pretraining_speed", "loader_throughput", "anatomy_matching"))
    result = CliRunner().invoke(app, ["benchmark", "medssl", "--speed", "loader_throughput", "--quick",
                                      "--out", str(tmp_path), "num_cases=2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["volumes"] == 2
    assert "| cache_speedup |" in (tmp_path / "results.md").read_text()
