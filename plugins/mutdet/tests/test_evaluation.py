"""VOC07 11-point rotated AP against hand-computed cases, both threshold rules, Task1 files, IoU speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from accord_mutdet.data import DOTA_V1_CLASSES, ImageRecord, load_dota, split_record
from accord_mutdet.evaluation import (
    evaluate_detections,
    evaluate_patch_detections,
    iou_speed,
    shapely_iou_matrix,
    voc07_ap,
    write_dota_task1,
)

GT = np.array([[10, 10, 10, 10, 0], [40, 40, 10, 10, 0], [70, 70, 10, 10, 0]], np.float32)


def _record(labels=("plane", "plane", "plane"), difficult=(False, False, True)) -> ImageRecord:
    return ImageRecord(Path("i.png"), 100, 100, GT, list(labels), np.array(difficult), "img")


DETS = {"img": {
    "boxes": np.array([[10, 10, 10, 10, 0],     # 0.9: TP on gt 0
                       [10, 10, 10, 10, 0],     # 0.8: duplicate -> FP
                       [70, 70, 10, 10, 0],     # 0.7: on the difficult gt -> ignored
                       [40, 37.5, 10, 5, 0]],   # 0.6: IoU exactly 0.5 with gt 1
                      np.float32),
    "scores": np.array([0.9, 0.8, 0.7, 0.6]),
    "labels": np.array([0, 0, 0, 0]),
}}


def test_hand_computed_ap_both_rules():
    voc = evaluate_detections(DETS, [_record()], ["plane", "ship"], iou_thresholds=(0.5,))
    # voc (IoU > 0.5): TP, FP, (ignored), FP -> recall .5 .5 .5, precision 1 .5 .33: levels 0..0.5 -> 1
    assert voc["per_class"]["plane"]["AP50"] == pytest.approx(6 / 11)
    assert voc["per_class"]["plane"]["num_gts"] == 2 and voc["per_class"]["plane"]["num_dets"] == 4
    # mmrotate (IoU >= 0.5): TP, FP, TP -> recall .5 .5 1, precision 1 .5 .67 -> (6 x 1 + 5 x 2/3) / 11
    ref = evaluate_detections(DETS, [_record()], ["plane", "ship"], iou_thresholds=(0.5,), rule="mmrotate")
    assert ref["per_class"]["plane"]["AP50"] == pytest.approx((6 + 10 / 3) / 11)
    assert ref["AP50"] == ref["per_class"]["plane"]["AP50"]  # ship has no ground truth: not in the mean
    assert "mean_AP50_AP75" not in ref and "mAP" not in ref


def test_ap50_ap75_and_their_mean_is_not_called_map():
    result = evaluate_detections(DETS, [_record()], ["plane"])
    assert result["AP75"] == pytest.approx(6 / 11)  # the 0.5-IoU detection fails 0.75 either way
    assert result["mean_AP50_AP75"] == pytest.approx((result["AP50"] + result["AP75"]) / 2)
    assert "mAP" not in result


def test_reference_recall_levels_quirk():
    recall, precision = np.array([0.1, 0.2, 3 / 10]), np.ones(3)
    assert voc07_ap(recall, precision) == pytest.approx(4 / 11)  # levels 0, .1, .2, .3
    assert voc07_ap(recall, precision, rule="mmrotate") == pytest.approx(3 / 11)  # 0.30000000000000004 > 0.3


def test_no_detections_and_unknown_ids():
    assert evaluate_detections({}, [_record()], ["plane"])["AP50"] == 0.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections({"other": DETS["img"]}, [_record()], ["plane"])


def test_task1_files(tmp_path: Path):
    paths = write_dota_task1({"P0001": {"boxes": np.array([[25, 15, 30, 10, 0]]), "scores": [0.5], "labels": [1]}},
                             ["plane", "ship"], tmp_path)
    assert [p.name for p in paths] == ["Task1_plane.txt", "Task1_ship.txt"]
    assert paths[0].read_text() == ""
    assert paths[1].read_text() == "P0001 0.5000 10.0 10.0 40.0 10.0 40.0 20.0 10.0 20.0\n"


def test_mmcv_iou_agrees_with_shapely_and_speed_summary():
    boxes = torch.tensor([[10.0, 10, 20, 8, 0.3], [14, 12, 18, 6, -0.7], [50, 50, 5, 5, 1.0]])
    from accord.boxes import box_iou_rotated

    np.testing.assert_allclose(box_iou_rotated(boxes, boxes).numpy(), shapely_iou_matrix(boxes, boxes), atol=1e-5)
    summary = iou_speed(num_dets=20, num_gts=5, repeats=2)
    assert summary["pairs"] == 100 and summary["max_abs_iou_difference"] < 1e-4
    assert summary["mmcv"]["min_s"] <= summary["mmcv"]["median_s"] <= summary["mmcv"]["max_s"]


def test_dota_patches_merged_and_scored_on_full_images(synth_root: Path, tmp_path: Path):
    records = load_dota(synth_root / "DOTA", "train")
    detections = {}
    for record in records:
        for patch in split_record(record, size=96, gap=64):
            detections[patch.record.id] = {
                "boxes": patch.record.boxes, "scores": np.where(patch.truncated, 0.4, 0.9),
                "labels": np.array([DOTA_V1_CLASSES.index(n) for n in patch.record.labels])}
    result = evaluate_patch_detections(detections, records, DOTA_V1_CLASSES, task1_dir=tmp_path)
    assert result["AP50"] == pytest.approx(1.0) and result["AP75"] == pytest.approx(1.0)
    assert len(list(tmp_path.glob("Task1_*.txt"))) == 15
    written = sum(len(p.read_text().splitlines()) for p in tmp_path.glob("Task1_*.txt"))
    assert written == sum(len(r.boxes) for r in records)


def test_eval_iou_speed_benchmark_is_registered(tmp_path: Path):
    from accord.benchmarking import find_benchmark
    from accord_mutdet.evaluation import EvalIouConfig

    component = find_benchmark("mutdet", "eval_iou", kind="speed")
    cfg = EvalIouConfig(plugin="mutdet", run_dir=tmp_path, quick=True, num_dets=10, num_gts=4, repeats=1)
    result = component.obj(cfg)
    values = dict(result.tables[0].rows)
    assert values["pairs"] == 40 and "speedup" in values and "shapely.median_s" in values
