"""Point mIoU: mmdet3d's seg_eval and the devkit's LidarSegEval agree; the evaluate task's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.config import validate_config
from accord_superflow.data import load_info_index, synth_nuscenes
from accord_superflow.evaluate import (
    EvaluateConfig,
    devkit_scores,
    evaluate,
    load_segmenter,
    mmdet3d_scores,
    save_segmenter,
    write_devkit_predictions,
)
from accord_superflow.segmentation import (
    IGNORE_INDEX,
    SEGMENTATION_CLASSES,
    LidarSegDataset,
    SegmentationModelConfig,
    build_segmenter,
)

TINY_MODEL = SegmentationModelConfig(
    backbone={"base_channels": 4, "encoder_channels": [4, 4, 8, 8], "encoder_blocks": [1, 1, 1, 1],
              "decoder_channels": [8, 8, 4, 4], "decoder_blocks": [1, 1, 1, 1], "bn_momentum": 0.02},
    voxel_size=(0.3, 3.0, 0.3))


@pytest.fixture(scope="module")
def full_mini_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both mini_val scenes (the devkit scores whole splits) and one mini_train scene, two keyframes each."""
    return synth_nuscenes(tmp_path_factory.mktemp("mini_val") / "data",
                          scene_names=("scene-0061", "scene-0103", "scene-0916"), keyframes_per_scene=2,
                          sweeps_between_keyframes=1, image_width=64, lidar_azimuth_steps=120)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny segmenter in the finetune task's weights format."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "best.pt"
    return save_segmenter(path, build_segmenter(TINY_MODEL), TINY_MODEL,
                          {"step": 0, "validation_miou": None, "linear_probe": False})


def test_mmdet3d_and_devkit_scores_agree_on_the_same_predictions(full_mini_val, tmp_path):
    index = load_info_index(full_mini_val, "v1.0-mini", "mini_val", max_sweeps=0, cache_dir=tmp_path / "index")
    dataset = LidarSegDataset(full_mini_val, index)
    rng = np.random.default_rng(0)
    labels, predictions = [], []
    for keyframe in index.keyframes:
        _, label = dataset.scan(keyframe)
        # Mostly right, else one of classes 0..9: some classes get IoU 0 and other_flat (11) none at all.
        guess = np.where(rng.random(len(label)) < 0.7, label, rng.integers(0, 10, len(label)))
        predicted = np.where(guess == IGNORE_INDEX, rng.integers(0, 10, len(label)), guess)
        write_devkit_predictions(tmp_path / "results", "mini_val", keyframe, predicted)
        labels.append(label)
        predictions.append(predicted)
    ours = mmdet3d_scores(labels, predictions)
    devkit = devkit_scores(full_mini_val, "v1.0-mini", tmp_path / "results", "mini_val")
    assert ours["iou_per_class"]["other_flat"] is None and devkit["iou_per_class"]["other_flat"] is None
    assert ours["iou_per_class"]["bus"] == 0.0
    assert 0.2 < ours["miou"] < 1
    assert devkit["miou"] == pytest.approx(ours["miou"], abs=1e-9)
    for name in SEGMENTATION_CLASSES:
        assert devkit["iou_per_class"][name] == pytest.approx(ours["iou_per_class"][name], abs=1e-9, nan_ok=True)


def _evaluate_config(root: Path, weights: Path, run_dir: Path, **changes) -> EvaluateConfig:
    data = {"plugin": "superflow", "task": "evaluate", "run_dir": str(run_dir), "checkpoint": str(weights),
            "data": {"root": str(root), "version": "v1.0-mini", "split": "mini_val",
                     "cache_dir": str(run_dir.parent / "index")}, **changes}
    return validate_config(EvaluateConfig, data, "test")


def test_evaluate_writes_scores_table_and_devkit_predictions(full_mini_val, weights, tmp_path):
    result = evaluate(_evaluate_config(full_mini_val, weights, tmp_path / "eval", devkit_check=True))
    assert result["keyframes"] == 4 and set(result["iou_per_class"]) == set(SEGMENTATION_CLASSES)
    assert result["devkit"]["miou"] == pytest.approx(result["miou"], abs=1e-9)
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["miou"] == result["miou"] and written["temporal_voting"] is None
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| mmdet3d seg_eval |" in table and "| devkit LidarSegEval |" in table and "driveable_surface" in table
    # One uint8 prediction in 1..16 per point of every scan, named by the LiDAR token.
    index = load_info_index(full_mini_val, "v1.0-mini", "mini_val", max_sweeps=0, cache_dir=tmp_path / "index")
    for keyframe in index.keyframes:
        predicted = np.fromfile(tmp_path / "eval" / "predictions" / "lidarseg" / "mini_val"
                                / f"{keyframe.lidar.sample_data_token}_lidarseg.bin", dtype=np.uint8)
        points = np.fromfile(full_mini_val / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
        assert len(predicted) == len(points) and predicted.min() >= 1 and predicted.max() <= 16


def test_evaluate_with_temporal_voting(full_mini_val, weights, tmp_path):
    result = evaluate(_evaluate_config(full_mini_val, weights, tmp_path / "eval",
                                       temporal_voting={"neighbours": 1, "voxel_size": 0.3}))
    assert result["temporal_voting"] == {"neighbours": 1, "neighbour_weight": 1.0, "voxel_size": 0.3}
    assert 0 <= result["miou"] <= 1
    assert "temporal voting (accord implementation)" in (tmp_path / "eval" / "results.md").read_text()


def test_devkit_check_needs_the_whole_split(_tiny_template, weights, tmp_path):
    # The tiny dataset has scene-0103 but not scene-0916 of mini_val.
    with pytest.raises(ValueError, match="scene-0916"):
        evaluate(_evaluate_config(_tiny_template, weights, tmp_path / "eval", devkit_check=True))


def test_weights_file_round_trip_and_errors(weights, tmp_path):
    segmenter, record = load_segmenter(weights)
    assert record["step"] == 0 and not segmenter.training
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not segmenter weights"):
        load_segmenter(foreign)
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_segmenter(tmp_path / "broken.pt")
