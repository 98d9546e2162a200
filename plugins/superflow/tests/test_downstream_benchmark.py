"""``accord benchmark superflow --quick``: the whole chain on a shrunken quick scale, and its demo hookup."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from accord.config import TrainerConfig
from accord_superflow import downstream_benchmark
from accord_superflow.downstream_benchmark import QUICK, smallest_label_fraction

#: The quick scale with a handful of steps: the chain and its outputs, not the numbers.
_STEPS = TrainerConfig(max_steps=2, batch_size=2, lr=5e-3, warmup_steps=1, checkpoint_every=1, keep_last=1)
TINY_QUICK = replace(QUICK, synth={**QUICK.synth, "keyframes_per_scene": 2, "lidar_azimuth_steps": 90},
                     pretrain_trainer=_STEPS, probe_trainer=_STEPS, finetune_trainer=_STEPS)


def test_smallest_label_fraction_keeps_a_scene():
    assert smallest_label_fraction([f"s{i}" for i in range(700)]) == 1
    assert smallest_label_fraction([f"s{i}" for i in range(8)]) == 25
    assert smallest_label_fraction(["only"]) == 100
    with pytest.raises(ValueError, match="no scene"):
        smallest_label_fraction([])


def test_quick_benchmark_from_the_cli_writes_table_plot_and_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from accord.cli import app
    from accord.plugins import get_host

    # `accord demo` runs every plugin's pipeline benchmarks.
    assert get_host().benchmarks.get("superflow.lidarseg").extra.get("kind", "pipeline") == "pipeline"
    monkeypatch.setattr(downstream_benchmark, "QUICK", TINY_QUICK)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", "superflow", "--quick", "--out", str(out), "seeds=[0, 1]"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert {row["label_fraction"] for row in report["rows"] if row["protocol"] != "linear probing"} == {25}
    protocols = {(row["protocol"], row["init"], row["seed"]) for row in report["rows"]}
    assert protocols == {(protocol, init, seed)
                         for protocol in ("linear probing", "fine-tuning 25%", "fine-tuning 25% + temporal voting")
                         for init in ("superflow", "random") for seed in (0, 1)}
    assert all(0 <= row["miou"] <= 1 for row in report["rows"])
    markdown = (out / "results.md").read_text()
    assert "| linear probing | superflow |" in markdown and "47.66" in markdown and "Per-class IoU" in markdown
    # One pretraining per seed; each seed's SuperFlow runs start from its own.
    assert sorted(path.name for path in (out / "pretrain").iterdir()) == ["seed0", "seed1"]
    assert (out / "results.png").stat().st_size > 0
    # The online probe ran during pretraining: before the first step and after the last.
    pretraining = [json.loads(line) for line in (out / "pretrain" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in pretraining if "probe/miou" in record] == [0, 2]
    # Linear probing trains on every train scene, fine-tuning on the label fraction.
    downstream = out / "downstream"
    probe = json.loads((downstream / "linear_probing" / "superflow_seed0" / "evaluate" / "results.json").read_text())
    assert probe["trained"]["linear_probe"] is True and probe["trained"]["label_fraction"] == 100
    assert probe["trained"]["initialisation"]["step"] == 2
    assert (downstream / "linear_probing" / "superflow_seed1" / "config.yaml").read_text().count("pretrain/seed1/") == 1
    tuned = json.loads((downstream / "fine-tuning_25" / "random_seed1" / "evaluate_voting" / "results.json").read_text())
    assert tuned["trained"]["initialisation"] is None and tuned["temporal_voting"]["neighbours"] == 1
