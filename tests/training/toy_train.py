"""A tiny training run for the trainer tests, runnable as a script (also under torchrun).

Usage::

    python tests/training/toy_train.py RUN_DIR [trainer.key=value ...] [--stochastic] [--step-sleep S] [--hooks]

Overrides are TrainerConfig keys without the ``trainer.`` prefix (``max_steps=20``). The model has a
student, a frozen EMA teacher (``momentum_update``) and two loss terms; ``--stochastic`` adds
dropout and per-sample input noise drawn from the global torch RNG, which a bit-exact resume must
reproduce. ``--hooks`` adds validation (:func:`validate`), a :class:`~accord.training.BestCheckpoint`
on it, an :class:`~accord.training.OnlineProbe` (:func:`probe_data`) and an :class:`EventLog` that
writes every hook call of its rank to ``RUN_DIR/events_rank<R>.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from accord.config import TrainerConfig, apply_overrides
from accord.training import BestCheckpoint, Callback, DenseProbeData, OnlineProbe, Trainer, TrainingState

FEATURES = 6
#: Trainer defaults for the toy runs; tests override what they exercise.
TOY_DEFAULTS = {
    "max_steps": 12,
    "batch_size": 8,
    "lr": 0.05,
    "warmup_steps": 2,
    "ema_momentum": 0.9,
    "grad_clip_norm": 1.0,
    "checkpoint_every": 4,
    "log_every": 1,
    "device": "cpu",
}


class ToyDataset(Dataset):
    """A fixed linear regression problem; ``noise`` adds fresh input noise on every read."""

    def __init__(self, size: int = 40, noise: float = 0.0) -> None:
        generator = torch.Generator().manual_seed(7)
        self.inputs = torch.randn(size, FEATURES, generator=generator)
        self.targets = self.inputs @ torch.randn(FEATURES, FEATURES, generator=generator)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inputs = self.inputs[index]
        if self.noise:
            inputs = inputs + self.noise * torch.randn(FEATURES)
        return {"x": inputs, "y": self.targets[index]}


class ToyModel(nn.Module):
    """A student regressor plus an EMA teacher it is pulled towards.

    Args:
        dropout: dropout probability in the student.
        step_sleep: seconds to sleep in each forward (lets a test kill the run mid-training).
        nan_from_call: forward calls from this one on (1-based) return a NaN ``fit`` term.
    """

    def __init__(self, dropout: float = 0.0, step_sleep: float = 0.0, nan_from_call: int | None = None) -> None:
        super().__init__()
        self.student = nn.Sequential(
            nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, FEATURES)
        )
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.step_sleep = step_sleep
        self.nan_from_call = nan_from_call
        self.forward_calls = 0
        self.momenta: list[float] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.forward_calls += 1
        if self.step_sleep:
            time.sleep(self.step_sleep)
        prediction = self.student(batch["x"])
        fit = F.mse_loss(prediction, batch["y"])
        if self.nan_from_call is not None and self.forward_calls >= self.nan_from_call:
            fit = fit * float("nan")
        consistency = F.mse_loss(prediction, self.teacher(batch["x"]))
        return {"loss": fit + 0.1 * consistency, "fit": fit, "consistency": consistency}

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        self.momenta.append(momentum)
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.mul_(momentum).add_(student, alpha=1.0 - momentum)


def validate(model: ToyModel, step: int) -> dict[str, float]:
    """Validation of the toy: the student's mean squared error on the whole dataset."""
    data = ToyDataset()
    with torch.no_grad():
        return {"mse": F.mse_loss(model.student(data.inputs), data.targets).item()}


def probe_data(model: ToyModel) -> DenseProbeData:
    """Probe of the toy: the hidden features of the student classify the sign of the first target."""
    data = ToyDataset()
    features = model.student[:2](data.inputs)
    labels = (data.targets[:, 0] > 0).long()
    return DenseProbeData(features[:30], labels[:30], features[30:], labels[30:])


class EventLog(Callback):
    """Appends every hook call (hook, step and arguments) to ``path``, one JSON line each.

    Args:
        path: the log file.
        every: ``on_step`` cadence.
    """

    def __init__(self, path: Path, every: int = 1) -> None:
        self.path = Path(path)
        self.every = every

    def _write(self, hook: str, state: TrainingState, **details: object) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"hook": hook, "step": state.step, "resumed": state.resumed, **details}) + "\n")

    def on_train_start(self, state: TrainingState) -> None:
        self._write("train_start", state)

    def on_step(self, state: TrainingState) -> None:
        self._write("step", state)

    def on_validation(self, state: TrainingState, metrics: Mapping[str, float]) -> None:
        self._write("validation", state, metrics=dict(metrics))

    def on_checkpoint(self, state: TrainingState, path: Path) -> None:
        self._write("checkpoint", state, path=Path(path).name)

    def on_train_end(self, state: TrainingState) -> None:
        self._write("train_end", state)


def toy_config(**overrides: object) -> TrainerConfig:
    """The toy trainer config with ``overrides`` applied."""
    return TrainerConfig(**{**TOY_DEFAULTS, **overrides})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="TrainerConfig key=value")
    parser.add_argument("--stochastic", action="store_true", help="dropout and input noise")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per forward call")
    parser.add_argument("--hooks", action="store_true", help="validation, best checkpoint, probe and an event log")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    config = TrainerConfig.model_validate(apply_overrides(dict(TOY_DEFAULTS), args.overrides))
    torch.manual_seed(1234)
    model = ToyModel(dropout=0.2 if args.stochastic else 0.0, step_sleep=args.step_sleep)
    dataset = ToyDataset(noise=0.1 if args.stochastic else 0.0)
    hooks = {}
    if args.hooks:
        events = EventLog(args.run_dir / f"events_rank{os.environ.get('RANK', '0')}.jsonl", every=5)
        best = BestCheckpoint("mse", args.run_dir / "best.pt", mode="min")
        hooks = {"validate": validate, "callbacks": [events, best, OnlineProbe(probe_data, 2, every=6)]}
    Trainer(config, args.run_dir, seed=0, **hooks).fit(model, dataset)


if __name__ == "__main__":
    main()
