"""Fine-tuning: case split, label fraction, Dice, best-checkpoint selection, and evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from accord.runs import load_run
from accord.training.checkpoint import seed_everything
from accord.training.progress import read_metrics
from accord_medssl.weights import load_monai_weights
from accord_medssl.finetune import (
    EvaluateConfig,
    FinetuneConfig,
    SegmentationModel,
    SlidingWindowOptions,
    SplitOptions,
    evaluate,
    finetune,
    inverse_sqrt_frequency_weights,
    labelled_items,
    labelled_subset,
    segmentation_dice,
    split_cases,
    training_class_weights,
    training_crops,
)

TINY_BACKBONE = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4, "norm_name": "batch"}
CASES = [{"image": f"case{i}.nii.gz", "label": f"label{i}.nii.gz"} for i in range(20)]


def test_split_is_disjoint_complete_and_fixed_by_its_own_seed() -> None:
    splits = split_cases(CASES, SplitOptions(validation_fraction=0.2, test_fraction=0.25, seed=3))
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [11, 4, 5]
    names = [item["image"] for part in splits.values() for item in part]
    assert sorted(names) == sorted(item["image"] for item in CASES)
    assert split_cases(CASES, SplitOptions(validation_fraction=0.2, test_fraction=0.25, seed=3)) == splits
    assert split_cases(CASES, SplitOptions(validation_fraction=0.2, test_fraction=0.25, seed=4)) != splits
    # Each part keeps at least one case; too few cases is an error naming the fix.
    assert [len(part) for part in split_cases(CASES[:3], SplitOptions()).values()] == [1, 1, 1]
    with pytest.raises(ValueError, match="2 labelled cases cannot give 1 test, 1 validation"):
        split_cases(CASES[:2], SplitOptions())


def test_label_fraction_keeps_at_least_one_case_and_nests() -> None:
    assert len(labelled_subset(CASES, 0.1, seed=0)) == 2
    assert len(labelled_subset(CASES[:4], 0.1, seed=0)) == 1
    assert labelled_subset(CASES, 1.0, seed=0) == CASES
    small, large = labelled_subset(CASES, 0.25, seed=5), labelled_subset(CASES, 0.5, seed=5)
    assert len(small) == 5 and all(item in large for item in small)
    assert labelled_subset(CASES, 0.25, seed=6) != small


def test_training_crops_are_fixed_by_the_seed(msd_root: Path) -> None:
    def crops(seed: int) -> list[torch.Tensor]:
        seed_everything(seed)  # as run_task does: the crops follow the global NumPy stream the trainer checkpoints
        cfg = FinetuneConfig(plugin="medssl", task="finetune", data=msd_root, cache="none", crop_size=(32, 32, 32),
                             samples_per_volume=3, seed=seed)
        samples = training_crops(cfg, labelled_items(msd_root)[0][:1])[0]
        assert [tuple(sample["label"].shape) for sample in samples] == [(1, 32, 32, 32)] * 3
        return [sample["image"].as_tensor() for sample in samples]

    first, again, other = crops(seed=0), crops(seed=0), crops(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_inverse_sqrt_frequency_weights_follow_the_formula() -> None:
    counts = torch.tensor([900, 90, 10, 0])
    # Plain reference: w_k = 1 / sqrt(n_k / N); an absent class takes the largest present weight; mean 1.
    raw = [1 / math.sqrt(n / 1000) for n in (900, 90, 10)]
    raw.append(max(raw))
    expected = [value / (sum(raw) / len(raw)) for value in raw]
    torch.testing.assert_close(inverse_sqrt_frequency_weights(counts), torch.tensor(expected))
    assert inverse_sqrt_frequency_weights(torch.tensor([5, 5])).tolist() == [1.0, 1.0]
    for bad in (torch.tensor([0, 0]), torch.tensor([3, -1]), torch.ones(2, 2)):
        with pytest.raises(ValueError, match="counts: expected"):
            inverse_sqrt_frequency_weights(bad)


def test_class_weights_come_from_the_training_labels_or_the_config(msd_root: Path) -> None:
    labels = {0: "background", 1: "liver", 2: "spleen"}
    first = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    first[0, :4, :5] = 1  # 200 liver voxels
    first[0, 9, 9, :2] = 2  # 2 spleen voxels
    second = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    second[0, :2, :5, :8] = 1  # 80 more liver voxels
    volumes = [{"label": first}, {"label": second}]

    def config(class_weights: object) -> FinetuneConfig:
        return FinetuneConfig(plugin="medssl", task="finetune", data=msd_root, class_weights=class_weights)

    computed = training_class_weights(config("inverse_sqrt_frequency"), volumes, labels)
    assert computed == pytest.approx(inverse_sqrt_frequency_weights(torch.tensor([1718, 280, 2])).tolist())
    assert computed[0] < computed[1] < computed[2]
    assert training_class_weights(config("none"), volumes, labels) is None
    assert training_class_weights(config([0.5, 1, 2]), volumes, labels) == [0.5, 1, 2]
    with pytest.raises(ValueError, match=r"class_weights: 2 weights given, expected one per label \(3: background, liver"):
        training_class_weights(config([1, 2]), volumes, labels)
    with pytest.raises(ValueError, match="greater than 0"):
        config([1, 0, 2])


def test_class_weights_weigh_both_loss_terms() -> None:
    network = nn.Conv3d(1, 3, 1)
    batch = {"image": torch.rand(2, 1, 4, 4, 4), "label": torch.randint(0, 3, (2, 1, 4, 4, 4))}
    weights = [0.2, 1.0, 1.8]
    weighted = SegmentationModel(network, weights)(batch)["loss"]
    logits, target = network(batch["image"]), batch["label"][:, 0]
    # Weighted CE (normalised by the weights of the targets) + the mean over classes and cases of the
    # weighted soft-Dice losses, written out.
    cross_entropy = nn.functional.cross_entropy(logits, target, weight=torch.tensor(weights))
    probabilities, one_hot = logits.softmax(1), nn.functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float()
    overlap = (probabilities * one_hot).sum((2, 3, 4))
    total = probabilities.sum((2, 3, 4)) + one_hot.sum((2, 3, 4))
    dice_loss = 1 - (2 * overlap + 1e-5) / (total + 1e-5)
    torch.testing.assert_close(weighted, cross_entropy + (dice_loss * torch.tensor(weights)).mean())


class _IntensityDecoder(nn.Module):
    """A perfect "network" for images that encode the class as intensity ``class / 10``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.unused = nn.Parameter(torch.zeros(1))  # gives segmentation_dice a device to read

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        classes = (images * 10).round().long().clamp(0, self.num_classes - 1)
        return nn.functional.one_hot(classes[:, 0], self.num_classes).permute(0, 4, 1, 2, 3).float()


def test_dice_is_one_for_a_perfect_network_and_nan_for_an_absent_class() -> None:
    label = torch.zeros(1, 20, 20, 12, dtype=torch.uint8)
    label[0, 2:9, 3:10, 1:6] = 1
    label[0, 12:18, 10:19, 4:11] = 2
    cases = [{"image": label.float() / 10, "label": label}, {"image": label.float() / 10 * 0, "label": label * 0}]
    window = SlidingWindowOptions(overlap=0.25, batch_size=2)
    dice = segmentation_dice(_IntensityDecoder(4), cases, num_classes=4, roi_size=(16, 16, 16), window=window)
    assert dice[:2].tolist() == [1.0, 1.0] and math.isnan(dice[2])


@pytest.fixture(scope="module")
def tuned(msd_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneConfig, dict]:
    """Four steps from random init on half of the train cases, validating after every step, class-weighted."""
    run_dir = tmp_path_factory.mktemp("finetune")
    cfg = FinetuneConfig(
        plugin="medssl", task="finetune", data=msd_root, run_dir=run_dir, cache="memory", backbone=TINY_BACKBONE,
        crop_size=(32, 32, 32), label_fraction=0.5, seed=1, class_weights="inverse_sqrt_frequency",
        trainer={"max_steps": 4, "batch_size": 1, "lr": 3e-3, "warmup_steps": 0, "validate_every": 1, "log_every": 1},
    )
    return cfg, finetune(cfg)


def test_finetune_keeps_the_weights_of_the_best_validation_dice(tuned: tuple[FinetuneConfig, dict]) -> None:
    cfg, result = tuned
    # 4 cases: 1 test, 1 validation, 2 train of which label_fraction 0.5 keeps 1.
    assert result["labelled_cases"] == 1
    log = [record for record in read_metrics(cfg.run_dir / "metrics.jsonl") if "val/dice" in record]
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    best = max(log, key=lambda record: record["val/dice"])  # the first of equal maxima
    assert result["best_step"] == best["step"] and result["validation_dice"] == pytest.approx(best["val/dice"])
    state, info = load_monai_weights(result["weights"])
    assert info["step"] == best["step"] and info["swin_unetr_kwargs"]["out_channels"] == 7
    assert info["validation_dice_per_class"]["liver"] == pytest.approx(best["val/dice/liver"])
    network = SwinUNETR(**info["swin_unetr_kwargs"])
    network.load_state_dict(state, strict=True)
    _, labels = labelled_items(cfg.data)
    validation = cfg.volumes(split_cases(labelled_items(cfg.data)[0], cfg.split)["validation"], cfg.spacing)
    recomputed = segmentation_dice(network, validation, len(labels), cfg.crop_size, cfg.sliding_window)
    assert float(torch.nanmean(recomputed)) == pytest.approx(best["val/dice"], abs=1e-5)


def test_finetune_records_its_class_weights(only_medssl, tuned: tuple[FinetuneConfig, dict]) -> None:
    cfg, result = tuned
    weights = result["class_weights"]
    assert len(weights) == 7 and sum(weights) / 7 == pytest.approx(1.0) and min(weights) == weights[0]
    assert load_monai_weights(result["weights"])[1]["class_weights"] == weights
    # The checkpoint rebuilds the loss with the same weights.
    checkpoint = sorted((cfg.run_dir / "checkpoints").glob("step_*.pt"))[-1]
    torch.testing.assert_close(load_run(checkpoint).model.loss.cross_entropy.weight, torch.tensor(weights))


def test_evaluate_reports_per_class_dice_on_the_test_case(tuned: tuple[FinetuneConfig, dict], tmp_path: Path) -> None:
    cfg, result = tuned
    scores = evaluate(EvaluateConfig(plugin="medssl", task="evaluate", data=cfg.data, run_dir=tmp_path, cache="memory",
                                     checkpoint=result["weights"]))
    assert scores["subset"] == "test" and scores["cases"] == 1
    assert list(scores["dice_per_class"]) == ["liver", "spleen", "kidney_right", "kidney_left", "spine", "aorta"]
    assert all(0.0 <= value <= 1.0 for value in scores["dice_per_class"].values())
    assert 0.0 <= scores["dice"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text()) == scores
