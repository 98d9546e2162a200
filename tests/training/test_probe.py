"""The online dense probe: scores against plain references, the linear fit, modes, logging during a run."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from accord.training import DenseProbeData, OnlineProbe, Trainer
from accord.training.probe import fit_linear_probe, segmentation_scores
from accord.training.progress import read_metrics

_spec = importlib.util.spec_from_file_location("toy_train", Path(__file__).with_name("toy_train.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _reference_scores(predictions: list[int], labels: list[int], num_classes: int) -> tuple[list[float], list[float]]:
    """Per-class IoU and Dice by counting, element by element."""
    iou, dice = [], []
    for k in range(num_classes):
        tp = sum(p == k and t == k for p, t in zip(predictions, labels))
        fp = sum(p == k and t != k for p, t in zip(predictions, labels))
        fn = sum(p != k and t == k for p, t in zip(predictions, labels))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
    return iou, dice


def test_per_class_iou_and_dice_match_a_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (300,), generator=generator)  # class 4 never occurs
    predictions = torch.where(torch.rand(300, generator=generator) < 0.6, labels,
                              torch.randint(0, 4, (300,), generator=generator))
    predictions[:5] = 5  # class 5 is predicted but never true: IoU and Dice 0
    scores = segmentation_scores(predictions, labels, num_classes=6)
    iou, dice = _reference_scores(predictions.tolist(), labels.tolist(), 6)
    torch.testing.assert_close(scores["iou"], torch.tensor(iou, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(scores["dice"], torch.tensor(dice, dtype=torch.float64), equal_nan=True)
    assert math.isnan(scores["iou"][4]) and scores["iou"][5] == 0
    with pytest.raises(ValueError, match=r"predictions: class ids must lie in 0..5"):
        segmentation_scores(predictions + 1, labels, num_classes=6)


def _data(train: list[tuple[list[float], int]], test: list[tuple[list[float], int]]) -> DenseProbeData:
    def tensors(rows: list[tuple[list[float], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([row[0] for row in rows]), torch.tensor([row[1] for row in rows])

    return DenseProbeData(*tensors(train), *tensors(test))


def test_separable_features_score_one() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(40)
    features = 5 * torch.nn.functional.one_hot(labels, 3).float() + 0.3 * torch.randn(120, 3, generator=generator)
    data = DenseProbeData(features[:60], labels[:60], features[60:], labels[60:])
    metrics = OnlineProbe(lambda model: data, num_classes=3, every=1, class_names=["a", "b", "c"]).probe(
        torch.nn.Linear(1, 1))
    assert metrics["probe/miou"] == 1.0 and metrics["probe/dice"] == 1.0
    assert [metrics[f"probe/iou/{name}"] for name in "abc"] == [1.0, 1.0, 1.0]


def test_overlapping_features_give_the_known_scores() -> None:
    # Train: class 0 at x = -1, class 1 at x = +1, so the probe predicts 0 at -1 and 1 at +1.
    train = [([-1.0], 0)] * 10 + [([1.0], 1)] * 10
    # Test: at -1 three 0s and one 1, at +1 two 1s and two 0s. Class 0: TP 3, FP 1, FN 2 -> IoU 3/6,
    # Dice 6/9; class 1: TP 2, FP 2, FN 1 -> IoU 2/5, Dice 4/7.
    test = [([-1.0], 0)] * 3 + [([-1.0], 1)] + [([1.0], 1)] * 2 + [([1.0], 0)] * 2
    metrics = OnlineProbe(lambda model: _data(train, test), num_classes=2, every=1).probe(torch.nn.Linear(1, 1))
    assert metrics["probe/iou/0"] == pytest.approx(0.5) and metrics["probe/iou/1"] == pytest.approx(0.4)
    assert metrics["probe/dice/0"] == pytest.approx(2 / 3) and metrics["probe/dice/1"] == pytest.approx(4 / 7)
    assert metrics["probe/miou"] == pytest.approx(0.45)
    assert metrics["probe/dice"] == pytest.approx((2 / 3 + 4 / 7) / 2)


def test_ignored_labels_and_the_background_are_not_scored() -> None:
    train = [([-1.0, 0.0], 0)] * 5 + [([1.0, 0.0], 1)] * 5 + [([0.0, 1.0], 2)] * 5 + [([9.0, 9.0], 7)] * 3
    # Class 1 is predicted once where the truth is 2; class 2 is never predicted right.
    test = [([-1.0, 0.0], 0)] * 4 + [([1.0, 0.0], 1)] * 2 + [([1.0, 0.0], 2)] + [([5.0, 5.0], 7)] * 6
    probe = OnlineProbe(lambda model: _data(train, test), num_classes=3, every=1, class_names=["bg", "x", "y"],
                        ignore_index=7, background=0)
    metrics = probe.probe(torch.nn.Linear(1, 1))
    assert "probe/iou/bg" not in metrics
    assert metrics["probe/iou/x"] == pytest.approx(2 / 3) and metrics["probe/iou/y"] == 0.0
    assert metrics["probe/miou"] == pytest.approx(1 / 3)


def test_the_fit_is_deterministic_and_learns_a_linear_rule() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2000, 16, generator=generator)
    labels = (features[:, :3] @ torch.tensor([1.0, -2.0, 0.5])).gt(0).long() + 2 * features[:, 5].gt(1).long()
    first = fit_linear_probe(features, labels, num_classes=4)
    again = fit_linear_probe(features, labels, num_classes=4)
    assert torch.equal(first.layer.weight, again.layer.weight)
    accuracy = (first.predict(features) == labels).float().mean()
    assert accuracy > 0.9
    with pytest.raises(ValueError, match=r"labels: class ids must lie in 0..2"):
        fit_linear_probe(features, labels, num_classes=3)


def test_extract_runs_in_eval_mode_without_gradients_and_modes_are_restored() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model[1].eval()  # a submodule kept in eval on purpose stays in eval
    seen = []

    def extract(module: torch.nn.Module) -> DenseProbeData:
        seen.append((module.training, module[0].training, torch.is_grad_enabled()))
        features = module[0](torch.eye(2).repeat(4, 1))
        return DenseProbeData(features, torch.arange(2).repeat(4), features, torch.arange(2).repeat(4))

    OnlineProbe(extract, num_classes=2, every=1).probe(model)
    assert seen == [(False, False, False)]
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(ValueError, match=r"test_features: expected shape \(\*, 3\)|test_features"):
        DenseProbeData(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(4, 3),
                       torch.zeros(4, dtype=torch.long))


def test_a_run_logs_the_probe_at_start_every_n_steps_and_at_the_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    probe = OnlineProbe(toy.probe_data, num_classes=2, every=4, class_names=["negative", "positive"])
    result = Trainer(toy.toy_config(max_steps=10), tmp_path, seed=0, callbacks=[probe]).fit(
        toy.ToyModel(), toy.ToyDataset())
    records = read_metrics(tmp_path / "metrics.jsonl")
    probes = [record for record in records if "probe/miou" in record]
    assert [record["step"] for record in probes] == [0, 4, 8, 10]
    assert {"probe/dice", "probe/iou/negative", "probe/dice/positive"} <= probes[-1].keys()
    assert all(0.0 <= record["probe/miou"] <= 1.0 for record in probes)
    assert "loss" in result and "probe/miou" not in result
    # loss_curves.png: one panel per loss term (loss, fit, consistency) and one for the probe,
    # 2.2 inches at 100 dpi each.
    with Image.open(tmp_path / "loss_curves.png") as image:
        assert image.height == 4 * 220
