"""Hooks into the training loop: :class:`Callback`, the :class:`TrainingState` it sees, :class:`BestCheckpoint`.

:class:`~accord.training.Trainer` calls every callback's hooks on every rank, in the order the
callbacks were given, with the random number generators saved before and restored after each call
(a callback never changes the training trajectory):

* ``on_train_start(state)`` once, after a resume was restored (``state.resumed``) and before the
  first step;
* after each optimizer step, in this order: validation when due, then ``on_validation(state,
  metrics)``; ``on_step(state)`` when ``state.step`` is a multiple of the callback's ``every`` or
  the last step; the checkpoint when due, then ``on_checkpoint(state, path)``;
* ``on_train_end(state)`` once after the last step (not after an error).

Rank 0 does the writing: :meth:`TrainingState.log` is a no-op elsewhere, and callbacks that
compute or write something (a probe, a best-weights file) check ``state.is_main``. A callback that
runs collectives must do so on every rank.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from accord.training.checkpoint import write_atomically
from accord.training.progress import ProgressReporter

__all__ = ["Callback", "TrainingState", "BestCheckpoint", "save_model_state", "score_path"]

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """What a callback sees of the run.

    Attributes:
        step: optimizer steps completed (0 before the first; ``max_steps`` at the end).
        max_steps: the run's last step.
        model: the model being trained, unwrapped from DDP, on the training device.
        run_dir: the run directory (``metrics.jsonl``, ``checkpoints/``, ...).
        is_main: whether this process is rank 0, the one that writes files.
        resumed: the step the run resumed from, or ``None`` for a fresh run.
        reporter: the run's progress output, which :meth:`log` writes through.
    """

    step: int
    max_steps: int
    model: nn.Module
    run_dir: Path
    is_main: bool
    resumed: int | None
    reporter: ProgressReporter = field(repr=False)

    def log(self, metrics: Mapping[str, float]) -> None:
        """Log metrics of the current step: ``metrics.jsonl``, TensorBoard, the loss-curve plot.

        Args:
            metrics: ``{"<namespace>/<name>": value}``, e.g. ``{"probe/miou": 0.41,
                "probe/iou/car": 0.62}``; the namespace keeps them apart from the loss terms.
                Keys with one ``/`` are the namespace's summary (printed, and plotted in one
                panel per namespace); deeper keys (per class) go to the file and TensorBoard only.
                Non-finite values are left out.

        Raises:
            ValueError: a key without a namespace.
        """
        self.reporter.log_metrics(self.step, metrics)


class Callback:
    """Base class of training callbacks: every hook does nothing; override the ones you need.

    Attributes:
        every: ``on_step`` runs when the step is a multiple of it, and after the last step.
    """

    every: int = 1

    def on_train_start(self, state: TrainingState) -> None:
        """Once, before the first step of this process (after a resume was restored)."""

    def on_step(self, state: TrainingState) -> None:
        """After optimizer step ``state.step`` when it is a multiple of ``every`` or the last one."""

    def on_validation(self, state: TrainingState, metrics: Mapping[str, float]) -> None:
        """After a validation; ``metrics`` is what the trainer's ``validate`` returned (rank 0's, on every rank)."""

    def on_checkpoint(self, state: TrainingState, path: Path) -> None:
        """After the checkpoint of ``state.step`` was written to ``path`` (by rank 0)."""

    def on_train_end(self, state: TrainingState) -> None:
        """Once, after the last step."""


def score_path(path: Path | str) -> Path:
    """``FILE.score.json``: the JSON sidecar in which :class:`BestCheckpoint` keeps ``FILE``'s score."""
    path = Path(path)
    return path.with_name(path.name + ".score.json")


def save_model_state(model: nn.Module, path: Path, record: Mapping[str, Any]) -> None:
    """Default ``save`` of :class:`BestCheckpoint`: ``torch.save({"state_dict", "record"})``, atomically.

    The file loads with ``torch.load(path, weights_only=True)``.
    """
    payload = {"state_dict": model.state_dict(), "record": json.loads(json.dumps(record))}
    write_atomically(Path(path), lambda handle: torch.save(payload, handle))


class BestCheckpoint(Callback):
    """Keeps the weights with the best validation score so far in one file.

    On every validation whose ``metric`` beats the best so far (NaN never does), rank 0 calls
    ``save(model, path, record)`` and then writes ``record`` without ``metrics`` to
    :func:`score_path` (atomically), where a resumed run finds the score to beat. A fresh run
    (``state.resumed is None``) first removes ``path`` and its score file, so that what an earlier
    run left in the run directory never counts as this run's best.

    Args:
        metric: the key of the validation metrics to compare (as ``validate`` returns it, without
            the ``val/`` prefix of ``metrics.jsonl``).
        path: the weights file.
        save: ``save(model, path, record)`` writes the file, atomically (e.g. through
            :func:`accord.training.checkpoint.write_atomically`); ``model`` is the trained model
            unwrapped from DDP and ``record`` is ``{"metric", "mode", "score", "step", "metrics"}``.
            Default: :func:`save_model_state`.
        mode: ``"max"``: higher is better; ``"min"``: lower is better.

    Attributes:
        record: the kept record (``metric``, ``mode``, ``score``, ``step``), or ``None`` while no
            weights were kept; on rank 0 only.

    Raises:
        ValueError: another ``mode``; at a validation, metrics without ``metric``.
    """

    def __init__(
        self,
        metric: str,
        path: Path | str,
        *,
        save: Callable[[nn.Module, Path, dict[str, Any]], None] = save_model_state,
        mode: Literal["max", "min"] = "max",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"BestCheckpoint mode must be 'max' or 'min', got {mode!r}")
        self.metric = metric
        self.path = Path(path)
        self.save = save
        self.mode = mode
        self.record: dict[str, Any] | None = None

    def on_train_start(self, state: TrainingState) -> None:
        if not state.is_main:
            return
        scores = score_path(self.path)
        if state.resumed is None:
            self.path.unlink(missing_ok=True)
            scores.unlink(missing_ok=True)
            return
        if not scores.is_file():
            return
        stored = json.loads(scores.read_text())
        if (stored.get("metric"), stored.get("mode")) != (self.metric, self.mode):
            # Scores of another metric or direction do not compare; the first validation replaces them.
            log.warning("%s holds the best %s (%s) of the resumed run, this run selects on %s (%s): starting over",
                        scores, stored.get("metric"), stored.get("mode"), self.metric, self.mode)
            return
        self.record = stored

    def on_validation(self, state: TrainingState, metrics: Mapping[str, float]) -> None:
        if self.metric not in metrics:
            raise ValueError(f"BestCheckpoint metric {self.metric!r} is not among the validation metrics "
                             f"{sorted(metrics)}")
        score = float(metrics[self.metric])
        if not state.is_main or not self._beats_best(score):
            return
        record = {"metric": self.metric, "mode": self.mode, "score": score, "step": state.step}
        self.save(state.model, self.path, {**record, "metrics": dict(metrics)})
        text = json.dumps(record, indent=2) + "\n"
        write_atomically(score_path(self.path), lambda handle: handle.write(text.encode()))
        self.record = record

    def _beats_best(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.record is None:
            return True
        return score > self.record["score"] if self.mode == "max" else score < self.record["score"]
