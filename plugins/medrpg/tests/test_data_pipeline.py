"""The training pipeline: negative sampler guarantees, box/image consistency through resize, crop and pad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord.boxes import box_iou, cxcywh_to_xyxy, xywh_to_xyxy

from accord_medrpg.data import (
    GroundingDataset,
    canvas_to_original,
    collate_grounding,
    has_direction_word,
    place_on_canvas,
    sample_negatives,
)
from accord_medrpg.data import transforms


def test_negatives_are_inside_jittered_and_barely_overlap() -> None:
    gt = torch.tensor([40.0, 60.0, 100.0, 90.0])  # 60 x 30
    for seed in range(20):
        negatives = sample_negatives(gt, 200, 150, 5, np.random.default_rng(seed))
        assert negatives.shape == (5, 4)
        assert (negatives[:, :2] >= 0).all() and (negatives[:, 2] <= 200).all() and (negatives[:, 3] <= 150).all()
        assert (box_iou(negatives, gt[None]) <= 0.25).all()
        sizes = negatives[:, 2:] - negatives[:, :2]
        assert ((sizes / torch.tensor([60.0, 30.0]) - 1).abs() <= 0.1 + 1e-6).all()
    first = sample_negatives(gt, 200, 150, 5, np.random.default_rng(7))
    assert torch.equal(first, sample_negatives(gt, 200, 150, 5, np.random.default_rng(7)))
    assert not torch.equal(first, sample_negatives(gt, 200, 150, 5, np.random.default_rng(8)))


def test_negatives_on_exhaustion_are_the_least_overlapping_candidates() -> None:
    gt = torch.tensor([5.0, 5.0, 95.0, 95.0])  # covers 81 % of a 100 x 100 image: IoU <= 0.25 is impossible
    negatives = sample_negatives(gt, 100, 100, 5, np.random.default_rng(0), max_attempts=50)
    assert negatives.shape == (5, 4) and (negatives >= 0).all() and (negatives <= 100).all()
    ious = box_iou(negatives, gt[None]).squeeze(1)
    assert (ious > 0.25).all() and torch.equal(ious, ious.sort().values)


def test_direction_words() -> None:
    assert has_direction_word("Small LEFT effusion") and has_direction_word("right-sided pneumothorax")
    assert not has_direction_word("cardiomegaly")


def _ramps(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return ((x + 0.5) / width).astype(np.float32), ((y + 0.5) / height).astype(np.float32)


@pytest.mark.parametrize("augment", [False, True])
def test_image_and_boxes_move_together(monkeypatch, augment: bool) -> None:
    """Canvas pixels show the original point that the placement maps there, and boxes follow the same map."""
    monkeypatch.setattr(transforms, "_colour_jitter", lambda image, rng: image)  # keep the ramps exact
    height, width, size = 300, 240, 128
    boxes = torch.tensor([[100.0, 120.0, 160.0, 200.0], [10.0, 10.0, 70.0, 90.0], [150.0, 200.0, 230.0, 290.0]])
    ramp_x, ramp_y = _ramps(height, width)
    cropped = 0
    for seed in range(40):
        results = [place_on_canvas(ramp, boxes, "cardiomegaly", size, augment=augment, rng=np.random.default_rng(seed))
                   for ramp in (ramp_x, ramp_y)]
        (canvas_x, padding, moved, placement), (canvas_y, _, moved_y, _) = results
        assert torch.equal(moved, moved_y)
        visible = ~padding
        rows, cols = np.nonzero(visible)
        # Where each visible canvas pixel comes from in the original, through the placement.
        source_x = (cols + 0.5 - placement.offset_x) / placement.scale_x
        source_y = (rows + 0.5 - placement.offset_y) / placement.scale_y
        np.testing.assert_allclose(canvas_x[visible] * width, source_x, atol=2.5)
        np.testing.assert_allclose(canvas_y[visible] * height, source_y, atol=2.5)
        assert (canvas_x[padding] == 0).all()
        # Boxes: the same map, clipped to the visible part of the image.
        left, top, right, bottom = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
        expected = boxes * torch.tensor([placement.scale_x, placement.scale_y] * 2) + torch.tensor(
            [placement.offset_x, placement.offset_y] * 2)
        expected = torch.maximum(torch.minimum(expected, torch.tensor([right, bottom] * 2)),
                                 torch.tensor([left, top] * 2, dtype=torch.float32))
        torch.testing.assert_close(moved, expected, atol=1.0, rtol=0)
        full_width = round(width * placement.scale_x)
        cropped += int(right - left < full_width - 1)
        if not augment:  # evaluation: long side to the canvas, centred
            assert bottom - top == size and abs((left + right) / 2 - size / 2) <= 1
    assert (cropped > 0) == augment  # without a direction word, training crops about a quarter of the time


def test_direction_word_phrases_are_never_cropped(monkeypatch) -> None:
    height, width = 300, 240
    for seed in range(40):
        _, padding, _, placement = place_on_canvas(np.ones((height, width), np.float32), torch.zeros(1, 4) + 50,
                                                   "left effusion", 128, augment=True, rng=np.random.default_rng(seed))
        visible = int((~padding).sum())
        assert visible == round(width * placement.scale_x) * round(height * placement.scale_y)
        assert round(height * placement.scale_y) in {round(s * 128 / 640) for s in range(448, 641, 32)}


def test_dataset_items_and_mapping_back(grounding_dir) -> None:
    dataset = GroundingDataset(grounding_dir / "train.jsonl", image_size=64, train=False, num_negatives=3)
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image_mask"].shape == (64, 64) and item["image_mask"].dtype == torch.bool
    assert item["box"].shape == (4,) and item["negatives"].shape == (3, 4)
    assert set(item["meta"]) == {"orig_width", "orig_height", "scale_x", "scale_y", "offset_x", "offset_y",
                                 "canvas_size"}
    assert (item["image"][:, item["image_mask"]] == 0).all()
    # Grey replicated and ImageNet-normalised: channel c = (grey - mean_c) / std_c.
    visible = ~item["image_mask"]
    grey = item["image"][0][visible] * 0.229 + 0.485
    torch.testing.assert_close(item["image"][2][visible], (grey - 0.406) / 0.225, atol=1e-5, rtol=0)
    batch = collate_grounding([dataset[i] for i in range(len(dataset))])
    back = canvas_to_original(batch["box"], batch["meta"])
    truth = xywh_to_xyxy(torch.tensor([r["box"] for r in dataset.records], dtype=torch.float64))
    torch.testing.assert_close(back, truth, atol=1e-3, rtol=0)
    torch.testing.assert_close(canvas_to_original(item["box"], item["meta"]), truth[0], atol=1e-3, rtol=0)
    # Negatives stay off the GT.
    negatives = cxcywh_to_xyxy(batch["negatives"].double())
    for b in range(len(dataset)):
        assert (box_iou(negatives[b], cxcywh_to_xyxy(batch["box"][b:b + 1].double())) <= 0.25 + 1e-6).all()


def test_training_items_are_seeded_per_epoch(grounding_dir) -> None:
    dataset = GroundingDataset(grounding_dir / "train.jsonl", image_size=64, train=True, seed=3)
    first = dataset[1]
    again = GroundingDataset(grounding_dir / "train.jsonl", image_size=64, train=True, seed=3)[1]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["negatives"], again["negatives"])
    dataset.set_epoch(1)
    assert not torch.equal(first["negatives"], dataset[1]["negatives"])


def test_dataset_arguments_are_checked(grounding_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.jsonl: grounding split file not found"):
        GroundingDataset(tmp_path / "nothing.jsonl", train=True)
    with pytest.raises(ValueError, match="num_negatives must be >= 0"):
        GroundingDataset(grounding_dir / "train.jsonl", train=True, num_negatives=-1)


def test_boxes_follow_an_image_decoded_at_a_reduced_scale(tmp_path) -> None:
    import json

    from accord_medrpg.data import read_image, write_image

    image = np.zeros((480, 400), np.float32)
    image[100:200, 40:120] = 1.0  # the finding: x 40..120, y 100..200
    write_image(tmp_path / "big.jpg", image)
    record = {"id": "a", "dicom_id": "d", "image": "big.jpg", "phrase": "right opacity", "category": "Lung Opacity",
              "box": [40, 100, 80, 100], "image_width": 400, "image_height": 480, "split": "train"}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    assert read_image(tmp_path / "big.jpg", min_size=64).shape == (120, 100)  # what the dataset decodes
    item = GroundingDataset(tmp_path / "train.jsonl", image_size=64, train=False)[0]
    torch.testing.assert_close(canvas_to_original(item["box"], item["meta"]),
                               torch.tensor([40.0, 100.0, 120.0, 200.0], dtype=torch.float64), atol=1e-3, rtol=0)
    x1, y1, x2, y2 = (cxcywh_to_xyxy(item["box"]) * 64).round().int().tolist()
    inside = item["image"][0, y1 + 1:y2 - 1, x1 + 1:x2 - 1]
    assert inside.mean() > item["image"][0, ~item["image_mask"]].mean() + 1.0  # the bright finding is in the box


def test_crops_keep_the_gt_centre(monkeypatch) -> None:
    monkeypatch.setattr(transforms, "_colour_jitter", lambda image, rng: image)
    gt = torch.tensor([[900.0, 250.0, 930.0, 290.0]])  # a small GT far right in a wide image
    for seed in range(60):
        _, _, moved, _ = place_on_canvas(np.ones((300, 1000), np.float32), gt, "nodule", 128, augment=True,
                                         rng=np.random.default_rng(seed))
        assert ((moved[0, 2:] - moved[0, :2]) > 0).all()
