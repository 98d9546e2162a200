"""DOTA patch splitting and merging patch detections back with rotated NMS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from accord.boxes import box_iou_rotated
from accord_mutdet.data import (
    ImageRecord,
    load_dota,
    merge_patch_detections,
    parse_patch_name,
    split_record,
    window_starts,
    write_patches,
)


def test_window_starts_reference_settings():
    assert window_starts(800, 800, 200) == [0]
    assert window_starts(500, 800, 200) == [0]
    assert window_starts(2000, 1024, 200) == [0, 824, 976]  # last window ends at the border
    assert window_starts(1500, 800, 200) == [0, 600, 700]
    with pytest.raises(ValueError, match="gap"):
        window_starts(100, 64, 64)


def test_area_ratio_rule_keeps_whole_and_clips_partial():
    boxes = np.array([[20, 20, 20, 10, 0.0],  # inside window (0, 0)
                      [60, 20, 20, 10, 0.0],  # 3/4 inside window (0, 0) -> clipped there
                      [52, 63, 20, 10, 0.0]], np.float32)  # 0.6 inside window (0, 0) -> dropped there
    record = ImageRecord(Path("x.png"), 100, 100, boxes, ["plane"] * 3, np.zeros(3, bool), "P1")
    patches = {(p.x, p.y): p for p in split_record(record, size=64, gap=28, iof_thr=0.7)}
    assert set(patches) == {(0, 0), (36, 0), (0, 36), (36, 36)}
    first = patches[(0, 0)]
    assert first.record.id == "P1__64__0___0" and len(first.record.boxes) == 2
    np.testing.assert_allclose(first.record.boxes[0], boxes[0], atol=1e-5)
    np.testing.assert_allclose(first.record.boxes[1], [57, 20, 14, 10, 0], atol=1e-4)  # clipped at x = 64
    assert first.truncated.tolist() == [False, True]
    shifted = patches[(36, 0)].record.boxes
    assert np.any(np.all(np.abs(shifted - [24, 20, 20, 10, 0]) < 1e-4, axis=1))  # box 2 whole, shifted


def test_split_then_merge_recovers_full_image_boxes(synth_root: Path, tmp_path: Path):
    records = load_dota(synth_root / "DOTA", "train")
    patches = write_patches(records, tmp_path / "train_128_64", size=128, gap=64)
    assert len(patches) == len(records) * 4
    assert {p.id for p in load_dota(tmp_path, "train_128_64")} == {p.id for p in patches}
    classes = sorted({label for record in records for label in record.labels})
    detections = {}
    for split in (split_record(r, size=128, gap=64) for r in records):
        for patch in split:
            # a detector scores cut objects lower than whole ones
            detections[patch.record.id] = {"boxes": patch.record.boxes,
                                           "scores": np.where(patch.truncated, 0.5, 0.9),
                                           "labels": np.array([classes.index(n) for n in patch.record.labels])}
    merged = merge_patch_detections(detections)
    assert set(merged) == {r.id for r in records}
    for record in records:
        found = merged[record.id]
        assert len(found["boxes"]) == len(record.boxes)
        iou = box_iou_rotated(torch.from_numpy(record.boxes), found["boxes"])
        assert torch.all(iou.max(dim=1).values > 0.99)
        assert sorted(record.labels) == sorted(classes[i] for i in found["labels"].tolist())


def test_patch_names():
    assert parse_patch_name("P0003__1024__824___0") == ("P0003", 824, 0)
    assert parse_patch_name("a__b__800__0___600.png") == ("a__b", 0, 600)
    with pytest.raises(ValueError, match="expected '<image id>__<size>__<x>___<y>'"):
        parse_patch_name("P0003")


def test_split_dota_task(synth_root: Path, tmp_path: Path):
    from accord.runs import run_task
    from accord_mutdet.data.patches import SplitDotaConfig

    result = run_task(SplitDotaConfig(run_dir=tmp_path, data=synth_root / "DOTA", split="val", size=100, gap=40))
    assert result["split"] == "val_100_40" and result["patches"] == 4 and result["images"] == 1
    assert len(load_dota(tmp_path, "val_100_40")) == 4


def test_merge_suppresses_within_a_patch_first():
    """merge_det's order: NMS 0.5 inside a patch, then 0.1 across; B (0.3 with A, 0.6 with C) removes
    C inside the patch before A removes B, so C never survives (one 0.1 NMS would keep A and C)."""
    a, b, c = [10, 10, 10, 10, 0.0], [16, 10, 10, 10, 0.0], [18.5, 10, 10, 10, 0.0]
    iou = box_iou_rotated(torch.tensor([a, b, c]), torch.tensor([a, b, c]))
    assert 0.1 < iou[0, 1] < 0.5 < iou[1, 2] and iou[0, 2] < 0.1
    detections = {"P1__64__0___0": {"boxes": np.array([a, b, c], np.float32), "scores": np.array([0.9, 0.8, 0.7]),
                                    "labels": np.zeros(3, np.int64)}}
    assert merge_patch_detections(detections)["P1"]["scores"].tolist() == pytest.approx([0.9])
    kept = merge_patch_detections(detections, patch_iou_thr=None)["P1"]["scores"].tolist()
    assert kept == pytest.approx([0.9, 0.7])
