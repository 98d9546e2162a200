"""Checkpoint files: atomic writes, safe loading, skipping broken files, RNG state, weight export."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from accord.training import CheckpointError, export_weights, load_checkpoint, load_weights, weights_metadata
from accord.training.checkpoint import (
    build_checkpoint,
    capture_rng_state,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_model_state,
    prune_checkpoints,
    remove_temp_files,
    restore_rng_state,
    save_checkpoint,
    write_atomically,
)


def _write_checkpoint(directory: Path, step: int, model: nn.Module | None = None) -> Path:
    model = model or nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = build_checkpoint(
        step=step,
        data_position={"epoch": 0, "batch": step},
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        rng=[capture_rng_state()],
        config={"lr": 0.1},
    )
    return save_checkpoint(state, checkpoint_path(directory, step))


def _draws() -> tuple[list[float], list[float], list[float]]:
    return (
        torch.rand(3).tolist(),
        np.random.randn(3).tolist(),  # legacy gauss pairs exercise numpy's cached-gaussian state
        [random.gauss(0, 1) for _ in range(3)],  # an odd count leaves Python's gauss_next set
    )


def test_rng_states_round_trip_through_weights_only_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    _draws()
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_write_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    write_atomically(target, lambda handle: handle.write(b"old"))

    def broken_writer(handle) -> None:
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, broken_writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_temp_files_never_count_as_checkpoints(tmp_path: Path) -> None:
    good = _write_checkpoint(tmp_path, 3)
    (tmp_path / ".step_00000006.pt.4242.tmp").write_bytes(b"truncated")
    (tmp_path / "step_00000009.pt.tmp").write_bytes(b"truncated")
    assert list_checkpoints(tmp_path) == [(3, good)]
    remove_temp_files(tmp_path)
    assert not (tmp_path / ".step_00000006.pt.4242.tmp").exists()


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    older = _write_checkpoint(tmp_path, 2)
    newest = _write_checkpoint(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        path, state = latest_valid_checkpoint(tmp_path)
    assert path == older and state["step"] == 2
    assert "step_00000004.pt" in caplog.text
    with pytest.raises(CheckpointError, match="step_00000004.pt: unreadable, truncated or not a checkpoint"):
        load_checkpoint(newest)


class _CodeRunningPayload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bomb = tmp_path / "step_00000001.pt"
    torch.save({"format": "accord-checkpoint", "payload": _CodeRunningPayload(marker)}, bomb)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(bomb)
    assert latest_valid_checkpoint(tmp_path) is None
    assert not marker.exists()


def test_other_torch_files_are_not_checkpoints(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an accord checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 10, 3):
        _write_checkpoint(tmp_path, step)
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_00000001.pt", "step_00000002.pt"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 10]


class _TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.decode = nn.Linear(4, 4)
        self.decode.weight = self.embed.weight


def test_safetensors_export_round_trips_with_metadata(tmp_path: Path) -> None:
    model = _TiedModel()
    checkpoint = _write_checkpoint(tmp_path, 7, model)
    out = export_weights(checkpoint, tmp_path / "model.safetensors")
    weights = load_weights(out)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    fresh = _TiedModel()
    fresh.load_state_dict(weights)
    assert torch.equal(fresh.decode.weight, model.embed.weight)
    metadata = weights_metadata(out)
    assert metadata["format"] == "pt" and metadata["step"] == "7" and '"lr": 0.1' in metadata["config"]


def test_load_model_state_names_a_few_differences_and_loads_nothing(tmp_path: Path) -> None:
    saved = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)]).state_dict()
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 4))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_model_state(model, saved, tmp_path / "step_00000001.pt", "this run's model")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'step_00000001.pt'}: its weights do not fit this run's model; ")
    assert "6 unexpected: 2.weight, 2.bias, 3.weight, ...;" in message
    assert "2 of another shape: 0.weight (4, 4) in the checkpoint, (3, 4) in the model, 0.bias (4,) in" in message
    assert "missing" not in message and "\n" not in message
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    fitting = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    load_model_state(fitting, saved, tmp_path / "step_00000001.pt", "this run's model")
    assert all(torch.equal(saved[key], value) for key, value in fitting.state_dict().items())
