"""User errors at the CLI boundary: one ``error:`` line naming the thing, exit 2; bugs keep their traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from accord.cli import _call_task, app
from accord.training.checkpoint import build_checkpoint, capture_rng_state, save_checkpoint
from accord.training.trainer import NonFiniteLossError


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = build_checkpoint(step=1, data_position={"epoch": 0, "batch": 1}, model=model, optimizer=optimizer,
                             scheduler=scheduler, rng=[capture_rng_state()], config={})
    return save_checkpoint(state, tmp_path / "step_00000001.pt")


def _one_error_line(result, *names: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in lines[0]
    return lines[0]


def test_export_to_an_existing_directory(checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--format", "safetensors", "--out", str(tmp_path)])
    line = _one_error_line(result, str(tmp_path))
    assert "is a directory" in line


def test_export_to_an_unwritable_path(checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "model.safetensors"  # a file where the folder should be: no user can write there
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--format", "safetensors", "--out", str(out)])
    _one_error_line(result, "cannot write the export", str(blocker))


@pytest.mark.parametrize("junk", [b"hello world\n", b"e", b"101\n", b""], ids=["KeyError", "IndexError", "pickle", "empty"])
def test_export_of_a_junk_checkpoint(tmp_path: Path, junk: bytes) -> None:
    path = tmp_path / "t.pt"
    path.write_bytes(junk)
    result = CliRunner().invoke(app, ["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "o")])
    line = _one_error_line(result, str(path))
    assert "not a checkpoint" in line
    assert line.count(str(path)) == 1


def test_debug_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    from accord.training.checkpoint import CheckpointError

    path = tmp_path / "t.pt"
    path.write_bytes(b"e")
    result = CliRunner().invoke(app, ["--debug", "export", str(path), "--format", "safetensors", "--out",
                                      str(tmp_path / "o")])
    assert isinstance(result.exception, CheckpointError)


def test_a_non_finite_loss_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def diverge(cfg: object) -> None:
        raise NonFiniteLossError(7, {"loss": float("nan")}, Path("runs/x/checkpoints/step_00000005.pt"))

    with pytest.raises(typer.Exit) as exited:
        _call_task(diverge, None)
    assert exited.value.exit_code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == ("error: non-finite loss at step 7: loss=nan (step not applied; last good checkpoint: "
                    "runs/x/checkpoints/step_00000005.pt)")


def test_a_bug_keeps_its_traceback() -> None:
    def bug(cfg: object) -> None:
        raise RuntimeError("a bug in a task")

    with pytest.raises(RuntimeError, match="a bug in a task"):
        _call_task(bug, None)
