"""The built-in ``core`` plugin end to end through the CLI: data, pretrain, evaluate, finetune, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from accord.cli import app
from accord.toy.data import CLASSES, synth_shapes
from accord.toy.model import ConvEncoder

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_shapes(tmp_path_factory.mktemp("data") / "shapes", per_class=12)


def test_data_synth_and_check(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    assert _invoke("data", "synth", "core", str(out)).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASSES)
    result = _invoke("data", "check", "core", str(out))
    assert result.exit_code == 0 and "OK" in result.output


def _error_line(result) -> str:
    """The one ``error:`` line of a refused command, unwrapped (rich wraps long paths)."""
    assert result.exit_code == 2, result.output
    return result.output.replace("\n", "")


def test_data_synth_refuses_to_write_over_existing_data(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "dataset.json").write_text("{}")
    assert _error_line(_invoke("data", "synth", "core", str(out))) == (
        f"error: {out}: directory is not empty; choose a new or empty one, or pass --overwrite to write into it")
    assert (out / "dataset.json").read_text() == "{}" and len(list(out.iterdir())) == 1
    assert _invoke("data", "synth", "core", str(out), "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*CLASSES, "dataset.json"])  # other files stay


def test_data_synth_onto_a_file_or_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert _error_line(_invoke("data", "synth", "core", str(tmp_path / "file"), "--overwrite")) == (
        f"error: {tmp_path / 'file'}: exists and is not a directory; the sample dataset needs a new or empty directory")
    line = _error_line(_invoke("data", "synth", "core", str(tmp_path / "file" / "data")))
    assert line.startswith(f"error: {tmp_path / 'file' / 'data'}")  # the path that failed, below OUT_DIR
    assert line.endswith(": cannot write the sample dataset (Not a directory)")
    assert (tmp_path / "file").read_text() == "x"


def test_data_check_reports_each_problem_with_its_file(tmp_path: Path) -> None:
    root = synth_shapes(tmp_path / "bad", per_class=2)
    (root / "circle" / "0000.png").write_bytes(b"not a png")
    (root / "square" / "notes.txt").write_text("x")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(root / "cross" / "0001.png")
    Image.new("L", (16, 16)).save(root / "triangle" / "0001.png")
    (root / "empty").mkdir()
    result = _invoke("data", "check", "core", str(root))
    assert result.exit_code == 1
    out = result.output
    assert f"{root / 'circle' / '0000.png'}: unreadable image" in out
    assert f"{root / 'square' / 'notes.txt'}: unexpected file" in out
    assert f"{root / 'cross' / '0001.png'}: expected 8-bit grayscale (mode L), got mode RGB" in out
    assert f"{root / 'empty'}: class directory has no .png images" in out
    assert "images differ in size: 32x32" in out and "16x16" in out


def test_pretrain_evaluate_finetune_export(shapes: Path, tmp_path: Path) -> None:
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump({
        "plugin": "core", "task": "pretrain", "run_dir": str(tmp_path / "pre"), "data": str(shapes),
        "trainer": {"max_steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 3, "warmup_steps": 1},
    }))
    result = _invoke("run", str(config), "trainer.lr=0.001")
    assert result.exit_code == 0, result.output
    checkpoint = Path(json.loads(result.output[result.output.index("{"):])["checkpoint"])
    assert checkpoint.name == "step_00000006.pt"
    assert yaml.safe_load((tmp_path / "pre" / "config.yaml").read_text())["trainer"]["lr"] == 0.001
    assert (tmp_path / "pre" / "loss_curves.png").is_file()

    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(yaml.safe_dump({
        "plugin": "core", "task": "evaluate", "run_dir": str(tmp_path / "eval"), "data": str(shapes),
        "checkpoint": str(checkpoint), "probe": {"steps": 20},
    }))
    result = _invoke("run", str(evaluate))
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads((tmp_path / "eval" / "results.json").read_text())["linear_probe_accuracy"] <= 1.0

    result = _invoke("run", str(evaluate), "task=finetune", f"run_dir={tmp_path / 'ft'}", "trainer.max_steps=3",
                     "trainer.batch_size=4")
    assert result.exit_code == 0, result.output
    assert "test_accuracy" in result.output

    out = tmp_path / "weights.safetensors"
    result = _invoke("export", str(checkpoint), "--format", "safetensors", "--out", str(out))
    assert result.exit_code == 0, result.output
    weights = load_file(out)
    encoder = ConvEncoder()
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert torch.equal(weights["encoder.body.0.0.weight"], saved["encoder.body.0.0.weight"])


def test_run_reports_config_errors_as_single_lines(shapes: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"plugin": "core", "task": "pretrain", "data": str(shapes), "trainer": {"lr": -1}}))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert f"{config}: trainer.lr: Input should be greater than 0 (got -1)" in " ".join(result.output.split())


def test_run_on_a_broken_dataset_refuses_with_the_check_messages(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    (root / "circle").mkdir(parents=True)
    config = tmp_path / "pre.yaml"
    config.write_text(yaml.safe_dump({"plugin": "core", "task": "pretrain", "data": str(root), "run_dir": str(tmp_path / "r")}))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert f"{root / 'circle'}: class directory has no .png images" in result.output


def test_export_unknown_format_and_missing_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")
    result = runner.invoke(app, ["export", str(ckpt), "--format", "onnxx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no exporter named 'onnxx'" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "none.pt"), "--format", "safetensors", "--out", "o"])
    assert result.exit_code == 2 and "checkpoint file not found" in result.output


def test_schema_lists_task_configs() -> None:
    result = _invoke("schema", "core.pretrain")
    schema = json.loads(result.output)["task core.pretrain"]
    assert schema["additionalProperties"] is False
    assert "trainer" in schema["properties"]


def test_quick_benchmark_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = _invoke("benchmark", "core", "--quick", "--out", str(out), "--pretrain-steps", "20",
                     "seeds=[0, 1]", "label_fractions=[1.0]")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert {(row["init"], row["seed"]) for row in saved["rows"]} == {(i, s) for i in ("random", "pretrained") for s in (0, 1)}
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in saved["rows"])
    # One SimCLR run per seed, each evaluated through the evaluate task in its own directory.
    for seed in (0, 1):
        assert yaml.safe_load((out / "pretrain" / f"seed{seed}" / "config.yaml").read_text())["seed"] == seed
        evaluate = yaml.safe_load((out / "downstream" / "1.0" / f"pretrained_seed{seed}" / "config.yaml").read_text())
        assert evaluate["task"] == "evaluate" and evaluate["seed"] == seed
        assert Path(evaluate["checkpoint"]).parent.parent == out / "pretrain" / f"seed{seed}"
    markdown = (out / "results.md").read_text()
    assert "| 1.0 | pretrained |" in markdown and markdown in result.output
    assert saved["command"] == f"accord benchmark core linear_probe --quick --out {out} 'label_fractions=[1.0]' " \
                               "pretrain_steps=20 'seeds=[0,1]'"
    assert (out / "results.png").stat().st_size > 0
