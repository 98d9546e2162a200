"""Fine-tuning: case split, label fraction, Dice, best-checkpoint selection, and evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from accord.training.progress import read_metrics
from accord_medssl.weights import load_monai_weights
from accord_medssl.finetune import (
    EvaluateConfig,
    FinetuneConfig,
    SlidingWindowOptions,
    SplitOptions,
    evaluate,
    finetune,
    labelled_items,
    labelled_subset,
    segmentation_dice,
    split_cases,
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
        cfg = FinetuneConfig(plugin="medssl", task="finetune", data=msd_root, cache="none", crop_size=(32, 32, 32),
                             samples_per_volume=3, seed=seed)
        samples = training_crops(cfg, labelled_items(msd_root)[0][:1])[0]
        assert [tuple(sample["label"].shape) for sample in samples] == [(1, 32, 32, 32)] * 3
        return [sample["image"].as_tensor() for sample in samples]

    first, again, other = crops(seed=0), crops(seed=0), crops(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


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
    """Four steps from random init on half of the train cases, validating after every step."""
    run_dir = tmp_path_factory.mktemp("finetune")
    cfg = FinetuneConfig(
        plugin="medssl", task="finetune", data=msd_root, run_dir=run_dir, cache="memory", backbone=TINY_BACKBONE,
        crop_size=(32, 32, 32), label_fraction=0.5, seed=1,
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


def test_evaluate_reports_per_class_dice_on_the_test_case(tuned: tuple[FinetuneConfig, dict], tmp_path: Path) -> None:
    cfg, result = tuned
    scores = evaluate(EvaluateConfig(plugin="medssl", task="evaluate", data=cfg.data, run_dir=tmp_path, cache="memory",
                                     checkpoint=result["weights"]))
    assert scores["subset"] == "test" and scores["cases"] == 1
    assert list(scores["dice_per_class"]) == ["liver", "spleen", "kidney_right", "kidney_left", "spine", "aorta"]
    assert all(0.0 <= value <= 1.0 for value in scores["dice_per_class"].values())
    assert 0.0 <= scores["dice"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text()) == scores
