"""mutdet benchmarks through the CLI: the detection pipeline (the chain, not the numbers) and the speed run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from accord.cli import app


def test_detection_benchmark_through_the_cli(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", "mutdet", "detection", "--quick", "--data", str(synth_root),
                                      "--out", str(out), "pretrain_steps=2", "finetune_steps=2", "seeds=[0]",
                                      "label_fractions=[0.5]", "image_size=96"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert [row["init"] for row in saved["rows"]] == ["none", "detreg", "mutdet"]
    assert all(0.0 <= row["AP50"] <= 1.0 and 0.0 <= row["AP75"] <= 1.0 for row in saved["rows"])
    # each initialisation fine-tunes from its own pretraining run (none: from scratch)
    for init, source in (("none", None), ("detreg", "detreg"), ("mutdet", "mutdet")):
        tuned = yaml.safe_load((out / "downstream" / "0.5" / f"{init}_seed0" / "finetune" / "config.yaml").read_text())
        assert tuned["label_fraction"] == 0.5
        if source is None:
            assert tuned["checkpoint"] is None
        else:
            assert Path(tuned["checkpoint"]).parent.parent == out / "pretrain" / "seed0" / source
    pretrain = yaml.safe_load((out / "pretrain" / "seed0" / "detreg" / "config.yaml").read_text())
    assert pretrain["mutdet"]["enhancement"] is False
    markdown = (out / "results.md").read_text()
    assert "| 0.5 | mutdet |" in markdown and "AP75" in markdown and "| MutDet | 75.1 |" in markdown


def test_pretrain_speed_benchmark(tmp_path: Path) -> None:
    listing = CliRunner().invoke(app, ["benchmark", "mutdet", "--speed"])
    assert "pretrain_speed" in listing.output
    result = CliRunner().invoke(app, ["benchmark", "mutdet", "--speed", "pretrain_speed", "--out", str(tmp_path),
                                      "image_size=160", "layers=[[1, 1]]", "repeats=1", "objects=3"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]["1+1 layers"]
    assert row["s_per_step_min"] <= row["s_per_step_median"] <= row["s_per_step_max"] and row["repeats"] == 1
    assert row["peak_process_rss_mib"] > 0
