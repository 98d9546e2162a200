"""DetectionDataset: resize/pad, labels, pseudo-labels, and boxes that follow the augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.boxes import le90_to_corners
from accord_mutdet.data import (
    DIOR_R_CLASSES,
    DetectionDataset,
    ImageRecord,
    collate_detection,
    flip_boxes,
    load_dior_r,
    rot90_boxes,
)
from accord_mutdet.pseudo.store import write_pseudo_labels

BOXES = torch.tensor([[20.0, 30.0, 24.0, 8.0, 0.4], [44.0, 18.0, 16.0, 10.0, -1.2]])


def _mask(boxes: torch.Tensor, size: int) -> np.ndarray:
    import cv2

    mask = np.zeros((size, size), np.uint8)
    for corners in le90_to_corners(boxes).numpy():
        cv2.fillPoly(mask, [np.round((corners - 0.5) * 16).astype(np.int32)], 1, shift=4)  # cv2: centres at integers
    return mask


@pytest.mark.parametrize("transform", ["hflip", "vflip", "rot1", "rot2", "rot3"])
def test_box_transforms_follow_the_pixels(transform: str):
    size = 64
    image = torch.from_numpy(_mask(BOXES, size)).float()
    if transform == "hflip":
        moved, boxes = image.flip(-1), flip_boxes(BOXES, size, horizontal=True)
    elif transform == "vflip":
        moved, boxes = image.flip(-2), flip_boxes(BOXES, size, horizontal=False)
    else:
        k = int(transform[-1])
        moved, boxes = torch.rot90(image, k, dims=(-2, -1)), rot90_boxes(BOXES, size, k)
    drawn = _mask(boxes, size)
    overlap = (drawn & moved.numpy().astype(np.uint8)).sum() / (drawn | moved.numpy().astype(np.uint8)).sum()
    assert overlap > 0.9
    assert torch.all(boxes[:, 2] >= boxes[:, 3]) and torch.all(boxes[:, 4].abs() <= math.pi / 2)


def test_items_and_collate(synth_root: Path):
    records = load_dior_r(synth_root / "DIOR-R", "train")
    dataset = DetectionDataset(records, image_size=96, train=False, class_names=DIOR_R_CLASSES)
    item = dataset[0]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.float32
    assert item["scale"] == pytest.approx(96 / 160)
    np.testing.assert_allclose(item["boxes"][:, :4].numpy(), records[0].boxes[:, :4] * 96 / 160, rtol=1e-5)
    assert item["labels"].tolist() == [DIOR_R_CLASSES.index(n) for n in records[0].labels]
    batch = collate_detection([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, 96, 96) and batch["image_ids"] == [records[0].id, records[1].id]
    assert "embeddings" not in batch


def test_training_augmentation_keeps_boxes_on_their_objects(tmp_path: Path):
    """An image that is exactly its boxes painted white: after any augmentation the boxes paint it again."""
    from accord_mutdet.data.records import write_image

    painted = _mask(BOXES, 64)
    write_image(tmp_path / "boxes.png", np.repeat(painted[..., None] * 255, 3, axis=2).astype(np.uint8))
    record = ImageRecord(tmp_path / "boxes.png", 64, 64, BOXES.numpy(), ["plane", "ship"], np.zeros(2, bool))
    dataset = DetectionDataset([record], image_size=64, train=True, rotate90=True, class_names=["plane", "ship"])
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        item = dataset[0]
        white = (item["image"][0] > 0).numpy().astype(np.uint8)  # normalised white > 0 > normalised black
        drawn = _mask(item["boxes"], 64)
        assert (white & drawn).sum() / (white | drawn).sum() > 0.9
        assert item["labels"].tolist() == [0, 1]
        seen.add(tuple(np.round(item["boxes"][0, :2].numpy())))
    assert len(seen) >= 4  # several different flips / turns were drawn


def test_pseudo_labels_replace_annotations(synth_root: Path, tmp_path: Path):
    records = load_dior_r(synth_root / "DIOR-R", "test")
    with pytest.raises(FileNotFoundError, match="no pseudo-labels for 1 image"):
        DetectionDataset(records, image_size=80, train=False, pseudo_dir=tmp_path)
    boxes = np.array([[40, 40, 20, 10, 0.3]], np.float32)
    write_pseudo_labels(tmp_path / f"{records[0].id}.npz", boxes, np.ones((1, 8), np.float32) / math.sqrt(8),
                        np.array([5]), np.array([0.9]))
    item = DetectionDataset(records, image_size=80, train=False, pseudo_dir=tmp_path)[0]
    assert item["labels"].tolist() == [5] and item["embeddings"].shape == (1, 8)
    np.testing.assert_allclose(item["boxes"].numpy(), [[20, 20, 10, 5, 0.3]], rtol=1e-5)
    assert "embeddings" in collate_detection([item])


def test_unknown_class_names_are_refused():
    record = ImageRecord(Path("a.png"), 10, 10, np.zeros((1, 5)), ["ufo"], np.zeros(1, bool))
    with pytest.raises(ValueError, match=r"class names \['ufo'\]"):
        DetectionDataset([record], image_size=8, train=False, class_names=["plane"])
