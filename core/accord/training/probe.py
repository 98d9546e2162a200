"""Online dense probe: how useful the frozen features are for the task, measured while pretraining.

Every ``every`` steps (after the last step, and at step 0 of a fresh run, the baseline)
:class:`OnlineProbe` asks the plugin for dense features of a small labelled set
(``extract(model) -> DenseProbeData``, run with the model in eval mode and without gradients),
fits a linear classifier on the frozen training features (:func:`fit_linear_probe`) and scores its
predictions on the test features: per-class IoU and Dice (:func:`segmentation_scores`) and their
means over the classes that occur, logged as ``probe/miou``, ``probe/dice``,
``probe/iou/<class>`` and ``probe/dice/<class>`` to ``metrics.jsonl``, TensorBoard and the
loss-curve plot. The probe runs on rank 0; the model's train/eval modes are restored afterwards.

A plugin supplies its probe through its pretraining config (a ``probe:`` section, a subclass of
:class:`OnlineProbeOptions`; ``None`` turns it off) and an extract function; its pretraining task passes
``OnlineProbe(extract, ...)`` to the trainer's ``callbacks``. See docs/plugins.md ("The probe").
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from accord.config import StrictModel
from accord.training.callbacks import Callback, TrainingState
from accord.utils.checks import check_tensor

__all__ = [
    "OnlineProbeOptions",
    "DenseProbeData",
    "LinearProbe",
    "fit_linear_probe",
    "segmentation_scores",
    "OnlineProbe",
]

log = logging.getLogger(__name__)


class OnlineProbeOptions(StrictModel):
    """The ``probe`` section of a pretraining config; plugins subclass it with what their extract needs."""

    every: int = Field(ge=1, description="steps between probes (also after the last step and before the first)")
    fit_steps: int = Field(100, ge=1, description="L-BFGS iterations of the linear classifier")


@dataclass(frozen=True)
class DenseProbeData:
    """Frozen features and labels of the probe's labelled set (what ``extract`` returns).

    Attributes:
        train_features: ``(N, C)`` float features the classifier is fitted on.
        train_labels: ``(N,)`` integer class ids.
        test_features: ``(M, C)`` float features it is scored on.
        test_labels: ``(M,)`` integer class ids.
    """

    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor(self.train_features, "train_features", ndim=2, floating=True)
        check_tensor(self.train_labels, "train_labels", shape=(len(self.train_features),), floating=False)
        check_tensor(self.test_features, "test_features", shape=(None, self.train_features.shape[1]), floating=True)
        check_tensor(self.test_labels, "test_labels", shape=(len(self.test_features),), floating=False)


class LinearProbe(nn.Module):
    """A linear classifier on standardised features (what :func:`fit_linear_probe` returns).

    Args:
        mean: ``(C,)`` feature mean of the training set.
        std: ``(C,)`` its standard deviation (no zeros).
        layer: ``Linear(C, K)``.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, layer: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.layer = layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` features -> ``(N, K)`` logits."""
        return self.layer((features - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` features -> ``(N,)`` int64 classes."""
        return self(features.float()).argmax(dim=1)


def _check_labels(labels: torch.Tensor, name: str, num_classes: int) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: class ids must lie in 0..{num_classes - 1} (after removing ignore_index), "
                         f"got {int(labels.min())}..{int(labels.max())}")


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 100, weight_decay: float = 1e-4
) -> LinearProbe:
    """Fit a softmax classifier on frozen features: full-batch L-BFGS, zero-initialised.

    The features are standardised with the training set's mean and standard deviation; the loss
    is cross-entropy with inverse-frequency class weights (every class that occurs weighs the
    same, as in mean IoU / Dice) plus ``weight_decay / 2 * |W|^2``, which keeps the optimum finite
    on separable data. Zero initialisation and full-batch steps make the fit deterministic.

    Args:
        features: ``(N, C)`` float training features.
        labels: ``(N,)`` class ids in ``0..num_classes-1``.
        num_classes: ``K``.
        steps: L-BFGS iterations.
        weight_decay: L2 penalty on the weights (not the bias).

    Returns:
        The fitted probe, on the features' device.

    Raises:
        ValueError: bad shapes, no rows, or class ids out of range.
    """
    check_tensor(features, "features", ndim=2, floating=True)
    check_tensor(labels, "labels", shape=(len(features),), floating=False)
    _check_labels(labels, "labels", num_classes)
    features, labels = features.float(), labels.long()
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    layer = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    counts = torch.bincount(labels, minlength=num_classes).float()
    class_weights = torch.where(counts > 0, len(labels) / (counts.clamp_min(1) * (counts > 0).sum()), 0.0)
    inputs = (features - mean) / std
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(inputs), labels, weight=class_weights)
        loss = loss + 0.5 * weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, layer.requires_grad_(False))


def segmentation_scores(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Per-class IoU and Dice of predicted classes against labels, pooled over all elements.

    ``IoU_k = TP / (TP + FP + FN)`` and ``Dice_k = 2 TP / (2 TP + FP + FN)``; a class that neither
    occurs in ``labels`` nor is predicted has no score (NaN).

    Args:
        predictions: ``(M,)`` predicted class ids in ``0..num_classes-1``.
        labels: ``(M,)`` true class ids in ``0..num_classes-1``.
        num_classes: ``K``.

    Returns:
        ``{"iou": (K,), "dice": (K,)}`` float64 tensors.

    Raises:
        ValueError: different lengths or ids out of range.
    """
    check_tensor(labels, "labels", ndim=1, min_rows=0, floating=False)
    check_tensor(predictions, "predictions", shape=(len(labels),), min_rows=0, floating=False)
    _check_labels(labels, "labels", num_classes)
    _check_labels(predictions, "predictions", num_classes)
    confusion = torch.bincount(labels.long() * num_classes + predictions.long(), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()  # rows: truth, columns: prediction
    true_positive = confusion.diagonal()
    false_positive = confusion.sum(dim=0) - true_positive
    false_negative = confusion.sum(dim=1) - true_positive
    union = true_positive + false_positive + false_negative
    nan = torch.full_like(union, math.nan)
    return {
        "iou": torch.where(union > 0, true_positive / union.clamp_min(1), nan),
        "dice": torch.where(union > 0, 2 * true_positive / (union + true_positive).clamp_min(1), nan),
    }


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode and no gradients; each module's own mode is restored afterwards
    (a submodule kept in eval on purpose, e.g. a frozen teacher, stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


class OnlineProbe(Callback):
    """Fits a linear probe on frozen dense features every ``every`` steps and logs IoU / Dice.

    Args:
        extract: ``extract(model) -> DenseProbeData``: the plugin's dense features of its labelled
            probe set; ``model`` is the trained model unwrapped from DDP, in eval mode, without
            gradients.
        num_classes: ``K``: class ids are ``0..K-1`` (besides ``ignore_index``).
        every: steps between probes; it also runs after the last step, and before the first step
            of a fresh run (step 0: the features at initialisation, the baseline of the curve).
        class_names: ``K`` names for the per-class metrics (default: the class ids).
        ignore_index: a label whose elements are left out of fitting and scoring (unlabelled points).
        background: a class that is fitted and predicted but left out of the scores (segmentation
            Dice usually excludes the background).
        fit_steps: L-BFGS iterations of :func:`fit_linear_probe`.
        namespace: prefix of the logged metrics.

    Raises:
        ValueError: ``class_names`` of another length than ``num_classes``.
    """

    def __init__(
        self,
        extract: Callable[[nn.Module], DenseProbeData],
        num_classes: int,
        every: int,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = None,
        background: int | None = None,
        fit_steps: int = 100,
        namespace: str = "probe",
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: {len(class_names)} names for num_classes {num_classes}")
        self.extract = extract
        self.num_classes = num_classes
        self.every = every
        self.class_names = [str(name) for name in class_names] if class_names is not None else [
            str(index) for index in range(num_classes)]
        self.ignore_index = ignore_index
        self.background = background
        self.fit_steps = fit_steps
        self.namespace = namespace

    def on_train_start(self, state: TrainingState) -> None:
        if state.is_main and state.resumed is None:
            state.log(self.probe(state.model))

    def on_step(self, state: TrainingState) -> None:
        if state.is_main:
            state.log(self.probe(state.model))

    def probe(self, model: nn.Module) -> dict[str, float]:
        """Extract, fit and score once.

        Returns:
            ``{"<namespace>/miou", "<namespace>/dice", "<namespace>/iou/<class>",
            "<namespace>/dice/<class>"}``; a class without a score (absent from the test labels
            and never predicted) is NaN and does not count in the means.
        """
        started = time.perf_counter()
        with _evaluating(model):
            data = self.extract(model)
        if not isinstance(data, DenseProbeData):
            raise TypeError(f"the probe's extract(model) must return a DenseProbeData, got {type(data).__name__}")
        train_features, train_labels = self._labelled(data.train_features, data.train_labels)
        test_features, test_labels = self._labelled(data.test_features, data.test_labels)
        probe = fit_linear_probe(train_features, train_labels, self.num_classes, steps=self.fit_steps)
        scores = segmentation_scores(probe.predict(test_features), test_labels, self.num_classes)
        scored = [index for index in range(self.num_classes) if index != self.background]
        metrics = {}
        for metric, mean_name in (("iou", "miou"), ("dice", "dice")):
            values = scores[metric][scored]
            metrics[f"{self.namespace}/{mean_name}"] = float(values.nanmean())
        for metric in ("iou", "dice"):
            for index in scored:
                metrics[f"{self.namespace}/{metric}/{self.class_names[index]}"] = float(scores[metric][index])
        log.info("%s: %d train / %d test elements, %.1f s", self.namespace, len(train_labels), len(test_labels),
                 time.perf_counter() - started)
        return metrics

    def _labelled(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ignore_index is None:
            return features, labels
        keep = labels != self.ignore_index
        return features[keep], labels[keep]
