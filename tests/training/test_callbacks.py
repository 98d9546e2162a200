"""Trainer callbacks: hook order and cadence, validation logging, RNG isolation, BestCheckpoint."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.training import BestCheckpoint, Trainer, TrainingState
from accord.training.callbacks import score_path
from accord.training.progress import read_metrics

_spec = importlib.util.spec_from_file_location("toy_train", Path(__file__).with_name("toy_train.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _fit(run_dir: Path, model: torch.nn.Module | None = None, *, stochastic: bool = False, validate=None,
         callbacks=(), **overrides: object) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(1234)
    model = model or toy.ToyModel(dropout=0.2 if stochastic else 0.0)
    trainer = Trainer(toy.toy_config(**overrides), run_dir, seed=0, validate=validate, callbacks=callbacks)
    return model, trainer.fit(model, toy.ToyDataset(noise=0.1 if stochastic else 0.0))


def _events(path: Path) -> list[tuple[str, int]]:
    return [(event["hook"], event["step"]) for event in map(json.loads, path.read_text().splitlines())]


def test_hooks_run_in_order_at_their_own_cadence(tmp_path: Path) -> None:
    events = toy.EventLog(tmp_path / "events.jsonl", every=5)
    _, result = _fit(tmp_path, validate=toy.validate, callbacks=[events], max_steps=10, validate_every=3,
                     checkpoint_every=4)
    # Validation every 3 steps and checkpoints every 4, each also after the last step; on_step
    # every 5; within a step: validation, on_step, checkpoint.
    assert _events(events.path) == [
        ("train_start", 0), ("validation", 3), ("checkpoint", 4), ("step", 5), ("validation", 6), ("checkpoint", 8),
        ("validation", 9), ("validation", 10), ("step", 10), ("checkpoint", 10), ("train_end", 10),
    ]
    records = read_metrics(tmp_path / "metrics.jsonl")
    validations = [record for record in records if "val/mse" in record]
    assert [record["step"] for record in validations] == [3, 6, 9, 10]
    logged = json.loads(events.path.read_text().splitlines()[-4])["metrics"]
    assert validations[-1]["val/mse"] == pytest.approx(logged["mse"])
    # The result is the last training record, not the validation written after it.
    assert result["step"] == 10 and "loss" in result and "val/mse" not in result


def test_validation_follows_the_checkpoints_when_validate_every_is_unset(tmp_path: Path) -> None:
    _fit(tmp_path, validate=toy.validate, max_steps=10, checkpoint_every=4)
    steps = [record["step"] for record in read_metrics(tmp_path / "metrics.jsonl") if "val/mse" in record]
    assert steps == [4, 8, 10]


def test_a_resumed_run_reports_its_resume_step_and_skips_the_steps_it_has(tmp_path: Path) -> None:
    _fit(tmp_path, max_steps=8, checkpoint_every=4, schedule="constant")
    events = toy.EventLog(tmp_path / "events.jsonl", every=3)
    _fit(tmp_path, callbacks=[events], max_steps=12, checkpoint_every=4, schedule="constant")
    lines = [json.loads(line) for line in events.path.read_text().splitlines()]
    assert (lines[0]["hook"], lines[0]["step"], lines[0]["resumed"]) == ("train_start", 8, 8)
    assert _events(events.path)[1:] == [("step", 9), ("step", 12), ("checkpoint", 12), ("train_end", 12)]


class _RandomDraws(toy.EventLog):
    """Draws from every global generator in each hook, as a careless callback would."""

    def _write(self, hook: str, state: TrainingState, **details: object) -> None:
        torch.rand(3), np.random.rand(3), random.random()


def _drawing_validate(model: torch.nn.Module, step: int) -> dict[str, float]:
    torch.randn(5), np.random.randn(2), random.random()
    return toy.validate(model, step)


def test_validation_and_callbacks_do_not_change_the_training_trajectory(tmp_path: Path) -> None:
    plain, plain_result = _fit(tmp_path / "plain", stochastic=True)
    hooked, hooked_result = _fit(tmp_path / "hooked", stochastic=True, validate=_drawing_validate,
                                 callbacks=[_RandomDraws(tmp_path / "unused", every=1)], validate_every=1)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), hooked.state_dict().values()))
    assert plain_result["loss"] == hooked_result["loss"]


def test_validate_must_return_numbers(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"validate\(model, step\)\['scores'\] must be a number"):
        _fit(tmp_path, validate=lambda model, step: {"scores": [1.0]}, max_steps=3)


def test_logged_metrics_need_a_namespace(tmp_path: Path) -> None:
    class LogsBareNames(toy.EventLog):
        def on_step(self, state: TrainingState) -> None:
            state.log({"miou": 0.5})

    with pytest.raises(ValueError, match=r"\['miou'\] need a namespace, e.g. 'probe/miou'"):
        _fit(tmp_path, callbacks=[LogsBareNames(tmp_path / "events.jsonl")], max_steps=3)


# --- BestCheckpoint ------------------------------------------------------------------------------


def _state(run_dir: Path, model: torch.nn.Module, step: int = 0, resumed: int | None = None) -> TrainingState:
    return TrainingState(step=step, max_steps=100, model=model, run_dir=run_dir, is_main=True, resumed=resumed,
                         reporter=None)


def _validate_sequence(best: BestCheckpoint, state: TrainingState, scores: list[float]) -> None:
    """Validate once per step with these scores; the weights at step s are all equal to s."""
    for score in scores:
        state.step += 1
        torch.nn.init.constant_(state.model.weight, state.step)
        best.on_validation(state, {"dice": score, "loss": -score})


def _kept_weight(path: Path) -> float:
    return float(torch.load(path, weights_only=True)["state_dict"]["weight"].unique())


def test_best_checkpoint_keeps_the_best_score_and_nan_never_wins(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    best = BestCheckpoint("dice", path)
    state = _state(tmp_path, torch.nn.Linear(2, 1))
    best.on_train_start(state)
    _validate_sequence(best, state, [math.nan, 0.2, 0.5, math.nan, 0.4, 0.5])
    assert best.record == {"metric": "dice", "mode": "max", "score": 0.5, "step": 3}
    assert json.loads(score_path(path).read_text()) == best.record
    saved = torch.load(path, weights_only=True)["record"]
    assert saved["step"] == 3 and saved["metrics"] == {"dice": 0.5, "loss": -0.5}
    assert _kept_weight(path) == 3


def test_best_checkpoint_in_min_mode_keeps_the_lowest(tmp_path: Path) -> None:
    best = BestCheckpoint("loss", tmp_path / "best.pt", mode="min")
    state = _state(tmp_path, torch.nn.Linear(2, 1))
    best.on_train_start(state)
    _validate_sequence(best, state, [0.2, 0.7, math.nan, 0.5])  # loss = -dice: -0.7 is the lowest
    assert (best.record["step"], best.record["score"]) == (2, -0.7) and _kept_weight(best.path) == 2
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        BestCheckpoint("loss", tmp_path / "x.pt", mode="lowest")


def test_a_resumed_run_competes_with_the_stored_score(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    first = BestCheckpoint("dice", path)
    state = _state(tmp_path, torch.nn.Linear(2, 1))
    first.on_train_start(state)
    _validate_sequence(first, state, [0.3, 0.6])
    resumed = BestCheckpoint("dice", path)
    state = _state(tmp_path, torch.nn.Linear(2, 1), step=2, resumed=2)
    resumed.on_train_start(state)
    assert resumed.record["score"] == 0.6
    _validate_sequence(resumed, state, [0.55])
    assert _kept_weight(path) == 2 and resumed.record["step"] == 2
    _validate_sequence(resumed, state, [0.65])
    assert _kept_weight(path) == 4 and resumed.record["step"] == 4


def test_a_fresh_run_removes_what_an_earlier_run_kept(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    earlier = BestCheckpoint("dice", path)
    state = _state(tmp_path, torch.nn.Linear(2, 1))
    earlier.on_train_start(state)
    _validate_sequence(earlier, state, [0.9])
    fresh = BestCheckpoint("dice", path)
    fresh.on_train_start(_state(tmp_path, torch.nn.Linear(2, 1)))
    assert not path.exists() and not score_path(path).exists() and fresh.record is None


def test_best_checkpoint_names_a_missing_metric(tmp_path: Path) -> None:
    best = BestCheckpoint("miou", tmp_path / "best.pt")
    with pytest.raises(ValueError, match=r"metric 'miou' is not among the validation metrics \['dice'\]"):
        best.on_validation(_state(tmp_path, torch.nn.Linear(2, 1)), {"dice": 0.5})


def test_best_checkpoint_keeps_the_weights_of_the_best_validation_of_a_run(tmp_path: Path) -> None:
    best = BestCheckpoint("mse", tmp_path / "best.pt", mode="min")
    model, _ = _fit(tmp_path, validate=toy.validate, callbacks=[best], max_steps=12, validate_every=2, lr=0.2)
    validations = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val/mse" in r]
    lowest = min(validations, key=lambda record: record["val/mse"])
    assert best.record["step"] == lowest["step"] and best.record["score"] == pytest.approx(lowest["val/mse"])
    kept = toy.ToyModel()
    kept.load_state_dict(torch.load(best.path, weights_only=True)["state_dict"])
    assert toy.validate(kept, 0)["mse"] == pytest.approx(lowest["val/mse"])
