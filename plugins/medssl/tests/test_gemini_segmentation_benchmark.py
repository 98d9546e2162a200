"""``accord benchmark medssl --method gemini``: GEMINI-Semi vs supervised only, GEMINI-MIP vs random init."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from accord.benchmarking import benchmark_config, find_benchmark
from accord.cli import app
from accord.config import ConfigError
from accord_medssl.gemini import segmentation_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_method_gemini_runs_both_comparisons_through_the_cli(only_medssl, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick sizes with one iteration / two steps per run and one seed, on every set (chest X-rays and
    MNI152 smaller still): the chain and its outputs, not the numbers."""
    sets = segmentation_benchmark.QUICK.sets
    monkeypatch.setattr(segmentation_benchmark, "QUICK", dataclasses.replace(segmentation_benchmark.QUICK, sets={
        **sets, "cxr": dataclasses.replace(sets["cxr"], synth={**sets["cxr"].synth, "num_images": 6, "size": 32},
                                           size=(32, 32)),
        "mni152": dataclasses.replace(sets["mni152"], synth={**sets["mni152"].synth, "num_cases": 6,
                                                             "shape": (16, 16, 16)}, size=(16, 16, 16))}))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "benchmark", "medssl", "--method", "gemini", "--quick", "--out", str(out), "gemini.semisup_iterations=1",
        "gemini.pretrain_iterations=1", "gemini.finetune_steps=2", "seeds=[0]", "label_fractions=[1.0]",
        "gemini.datasets=[phantoms,cxr,mni152]"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    runs = {(row["comparison"], row["init"]) for row in saved["rows"]}
    semisup = {"supervised only", "GEMINI-Semi"}
    finetune = {"random init", "GEMINI-MIP"}
    expected = {(f"semi-supervised, 1 labelled, {name}", init)
                for name in ("phantoms", "cxr", "mni152") for init in semisup}
    # Fine-tuning reads volumes: not on the 2D chest X-rays.
    expected |= {(f"fine-tune, 100% labels, {name}", init) for name in ("phantoms", "mni152") for init in finetune}
    assert runs == expected
    classes = {"phantoms": "liver", "cxr": "left_lung", "mni152": "grey matter"}
    assert all(0.0 <= row["dice"] <= 1.0 and classes[row["dataset"]] in row["dice_per_class"] for row in saved["rows"])
    assert any("not run on 2D chest X-rays" in note for note in saved["notes"])
    cxr_run = out / "cxr" / "downstream" / "semi-supervised_1_labelled_cxr" / "gemini_seed0"
    cxr = yaml.safe_load((cxr_run / "config.yaml")
                         .read_text())
    assert cxr["size"] == [32, 32] and cxr["gemini"]["network"]["spatial_dims"] == 2
    assert not (out / "cxr" / "pretrain" / "seed0").exists()  # nothing fine-tunes from it
    brain = yaml.safe_load((out / "mni152" / "downstream" / "fine-tune_100_labels_mni152" / "gemini_seed0"
                            / "config.yaml").read_text())
    assert brain["intensity"] == "minmax" and brain["crop_size"] == [16, 16, 16]
    downstream = out / "phantoms" / "downstream"
    semi, supervised = (yaml.safe_load((downstream / "semi-supervised_1_labelled_phantoms" / f"{init}_seed0"
                                        / "config.yaml").read_text()) for init in ("gemini", "random"))
    # Same labelled cases and CE + Dice steps; the baseline has no correspondence gradient and one Adam step each.
    assert semi["labelled_cases"] == supervised["labelled_cases"] == 1
    assert (semi["trainer"]["max_steps"], supervised["trainer"]["max_steps"]) == (2, 1)
    assert semi["gemini"]["loss"]["optimizer_steps"] == "two" and semi["gemini"]["loss"]["ncc_weight"] == 1.0
    assert supervised["gemini"]["loss"]["optimizer_steps"] == "combined"
    assert [supervised["gemini"]["loss"][f"{term}_weight"] for term in ("smooth", "gss", "ncc")] == [0.0, 0.0, 0.0]
    tuned = yaml.safe_load((downstream / "fine-tune_100_labels_phantoms" / "gemini_seed0" / "config.yaml").read_text())
    assert tuned["network"] == "gemini_unet" and tuned["intensity"] == "ct_clip"
    assert Path(tuned["checkpoint"]).parent.parent == out / "phantoms" / "pretrain" / "seed0"
    scratch_run = downstream / "fine-tune_100_labels_phantoms" / "random_seed0"
    scratch = yaml.safe_load((scratch_run / "config.yaml").read_text())
    assert scratch["checkpoint"] is None and scratch["gemini_unet"] == tuned["gemini_unet"]
    markdown = (out / "results.md").read_text()
    assert "| semi-supervised, 1 labelled, cxr | GEMINI-Semi |" in markdown
    assert "| fine-tune, 100% labels, mni152 | random init |" in markdown
    # One per-class table per set: their structures differ.
    assert "| comparison | init | liver |" in markdown
    assert "| comparison | init | grey matter | white matter |" in markdown
    assert "| comparison | init | heart | left_clavicle |" in markdown
    assert all((out / name / "results.png").is_file() for name in ("phantoms", "cxr", "mni152"))


def test_datasets_are_checked(only_medssl, tmp_path: Path) -> None:
    named = find_benchmark("medssl", "gemini_segmentation")
    with pytest.raises(ConfigError, match=r"gemini\.datasets\.0.*'phantoms', 'cxr' or 'mni152'"):
        benchmark_config(named, out=tmp_path, options=["gemini.datasets=[ct]"])
    with pytest.raises(ConfigError, match="gemini.datasets: the generated sets; with --data"):
        benchmark_config(named, out=tmp_path, data=tmp_path, options=["gemini.datasets=[cxr]"])
    assert benchmark_config(named, out=tmp_path, options=["gemini.datasets=[mni152]"]).gemini.datasets == ["mni152"]


def test_gemini_segmentation_is_its_own_benchmark_and_the_default_stays_alice(only_medssl, tmp_path: Path) -> None:
    named = find_benchmark("medssl", "gemini_segmentation")
    assert benchmark_config(named, quick=True, out=tmp_path).method == "gemini"
    default = find_benchmark("medssl")
    assert default.name == "segmentation" and benchmark_config(default, quick=True, out=tmp_path).method == "alice"
    with pytest.raises(ConfigError, match="alice_steps: settings of method alice; method gemini's are under gemini"):
        benchmark_config(default, out=tmp_path, options=["method=gemini", "alice_steps=3"])
    with pytest.raises(ConfigError, match="gemini: settings of method gemini, but method is alice"):
        benchmark_config(default, out=tmp_path, options=["gemini.finetune_steps=3"])
