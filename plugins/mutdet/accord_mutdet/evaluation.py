"""VOC07 11-point rotated AP (DIOR-R, DOTA) and DOTA ``Task1`` submission files.

Protocol (PASCAL VOC 2007 devkit, DOTA devkit, mmrotate's ``eval_rbbox_map``): per class, the
detections of all images are sorted by score; each is matched to the ground truth it overlaps most
(rotated IoU, ``accord.boxes.box_iou_rotated``); it is a true positive if that IoU passes the
threshold and the ground truth is not yet taken, a false positive otherwise, and it is *ignored*
(neither) when that ground truth is *difficult*. Difficult ground truths do not count in the
recall. AP is the mean over the 11 recall levels ``0, 0.1, ..., 1`` of the best precision at
that recall or above. Classes without ground truth get AP 0 and are left out of the mean.

Two rules (``rule=``):

* ``"voc"`` (default, the devkits' definition): a match needs IoU **>** the threshold, and the
  recall levels are exactly ``k / 10``;
* ``"mmrotate"`` (MutDet's numbers): IoU **>=** the threshold, and the recall levels come from
  ``np.arange(0, 1 + 1e-3, 0.1)``, whose float error puts level 3 at ``0.30000000000000004`` (also
  6 and 7), so a recall of exactly 0.3 does not reach it.

``AP50`` / ``AP75`` are the means of the per-class APs at IoU 0.5 / 0.75. The reference logs
their average as "mAP"; here it is ``mean_AP50_AP75`` and never called mAP (it is not COCO's
0.5:0.95 mAP).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field

from accord.benchmarking import BenchmarkResult, preset
from accord.boxes import box_iou_rotated, le90_to_polygon
from accord.config import BenchmarkConfig
from accord.utils.files import write_text_atomically
from accord_mutdet.data.records import ImageRecord, detection_arrays

Rule = Literal["voc", "mmrotate"]
IOU_THRESHOLDS = (0.5, 0.75)


def voc07_ap(recall: np.ndarray, precision: np.ndarray, *, rule: Rule = "voc") -> float:
    """11-point interpolated AP of one class.

    Args:
        recall: cumulative recall after each detection (by decreasing score), shape ``(D,)``.
        precision: cumulative precision, shape ``(D,)``.
        rule: ``"voc"`` (levels ``k / 10``) or ``"mmrotate"`` (levels from ``np.arange``).
    """
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    levels = np.arange(11) / 10 if rule == "voc" else np.arange(0, 1 + 1e-3, 0.1)
    total = 0.0
    for level in levels:
        reached = precision[recall >= level]
        total += reached.max() if reached.size else 0.0
    return total / 11


def match_image(boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_difficult: np.ndarray, iou_thr: float,
                rule: Rule = "voc") -> tuple[np.ndarray, np.ndarray]:
    """True / false positives of one image's detections of one class, already sorted by score.

    Returns:
        ``tp`` and ``fp`` as 0/1 float arrays ``(D,)``; both 0 for a detection matched to a
        difficult ground truth (ignored).
    """
    count = boxes.shape[0]
    tp, fp = np.zeros(count), np.zeros(count)
    if gt_boxes.shape[0] == 0:
        fp[:] = 1
        return tp, fp
    ious = box_iou_rotated(boxes.float(), gt_boxes.float()).numpy()
    best, which = ious.max(axis=1), ious.argmax(axis=1)
    passed = best >= iou_thr if rule == "mmrotate" else best > iou_thr
    taken = np.zeros(gt_boxes.shape[0], bool)
    for i in range(count):
        if not passed[i]:
            fp[i] = 1
        elif gt_difficult[which[i]]:
            continue
        elif taken[which[i]]:
            fp[i] = 1
        else:
            taken[which[i]] = True
            tp[i] = 1
    return tp, fp


def evaluate_detections(detections: Mapping[str, Mapping[str, Any]], records: Sequence[ImageRecord],
                        class_names: Sequence[str], *, iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                        rule: Rule = "voc") -> dict[str, Any]:
    """VOC07 11-point rotated AP per class and its means.

    Args:
        detections: image id -> ``{"boxes": (M, 5) le90 in original pixels, "scores": (M,),
            "labels": (M,) class index}``; an image without entry has no detections.
        records: the ground truth (boxes in original pixels, names, difficult flags).
        class_names: class of each label index.
        iou_thresholds: IoU thresholds (AP50 and AP75 by default).
        rule: ``"voc"`` or ``"mmrotate"`` (module docstring).

    Returns:
        ``{"per_class": {name: {"num_gts", "num_dets", "AP50", "AP75"}}, "AP50", "AP75",
        "mean_AP50_AP75", "rule"}`` (keys ``AP<round(100 t)>`` per threshold ``t``; the average
        of all thresholds is only added when they are exactly 0.5 and 0.75).
    """
    unknown = sorted(set(detections) - {r.id for r in records})
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: {unknown[:5]}")
    keys = [f"AP{round(100 * t)}" for t in iou_thresholds]
    empty = (np.zeros((0, 5), np.float32), np.zeros(0), np.zeros(0, np.int64))
    arrays = {r.id: detection_arrays(r.id, detections[r.id]) if r.id in detections else empty for r in records}
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        num_gts = sum(int(np.sum((np.asarray(r.labels) == name) & ~r.difficult)) for r in records if r.labels)
        scores_all, tps, fps = [], {k: [] for k in keys}, {k: [] for k in keys}
        for record in records:
            all_boxes, all_scores, all_labels = arrays[record.id]
            chosen = all_labels == index
            scores = all_scores[chosen]
            order = np.argsort(-scores, kind="stable")
            boxes = torch.from_numpy(all_boxes[chosen][order])
            gt_mask = np.asarray(record.labels) == name if record.labels else np.zeros(0, bool)
            gt_boxes = torch.from_numpy(record.boxes[gt_mask])
            for key, threshold in zip(keys, iou_thresholds):
                tp, fp = match_image(boxes, gt_boxes, record.difficult[gt_mask], threshold, rule)
                tps[key].append(tp)
                fps[key].append(fp)
            scores_all.append(scores[order])
        scores = np.concatenate(scores_all) if scores_all else np.zeros(0)
        order = np.argsort(-scores, kind="stable")
        entry: dict[str, Any] = {"num_gts": num_gts, "num_dets": int(scores.size)}
        for key in keys:
            tp = np.cumsum(np.concatenate(tps[key])[order]) if scores.size else np.zeros(0)
            fp = np.cumsum(np.concatenate(fps[key])[order]) if scores.size else np.zeros(0)
            recall = tp / max(num_gts, 1)
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            entry[key] = voc07_ap(recall, precision, rule=rule) if num_gts else 0.0
        per_class[name] = entry
    result: dict[str, Any] = {"per_class": per_class, "rule": rule}
    scored = [entry for entry in per_class.values() if entry["num_gts"] > 0]
    for key in keys:
        result[key] = float(np.mean([entry[key] for entry in scored])) if scored else 0.0
    if tuple(iou_thresholds) == IOU_THRESHOLDS:
        # What the reference logs as "mAP"; named for what it is.
        result["mean_AP50_AP75"] = (result["AP50"] + result["AP75"]) / 2
    return result


def write_dota_task1(detections: Mapping[str, Mapping[str, Any]], class_names: Sequence[str],
                     out_dir: str | Path) -> list[Path]:
    """DOTA Task1 (oriented) submission files, one ``Task1_<class>.txt`` per class (empty ones too).

    Each line: ``<image id> <score> x1 y1 x2 y2 x3 y3 x4 y4`` with the corners of the le90 box in
    full-image pixels (merge patch results first: :func:`accord_mutdet.data.merge_patch_detections`).
    """
    lines: dict[int, list[str]] = {i: [] for i in range(len(class_names))}
    for image_id in sorted(detections):
        boxes, scores, labels = detection_arrays(image_id, detections[image_id])
        polygons = le90_to_polygon(torch.from_numpy(boxes).double()).numpy()
        for polygon, score, label in zip(polygons, scores, labels):
            if not 0 <= int(label) < len(class_names):
                raise ValueError(f"detections of {image_id}: label {int(label)} outside 0..{len(class_names) - 1}")
            coords = " ".join(f"{value:.1f}" for value in polygon)
            lines[int(label)].append(f"{image_id} {float(score):.4f} {coords}")
    out = Path(out_dir)
    return [write_text_atomically(out / f"Task1_{name}.txt", "".join(f"{line}\n" for line in lines[i]))
            for i, name in enumerate(class_names)]


def evaluate_patch_detections(patch_detections: Mapping[str, Mapping[str, Any]], records: Sequence[ImageRecord],
                              class_names: Sequence[str], *, rule: Rule = "voc", nms_iou: float = 0.1,
                              score_thr: float = 0.05, patch_nms_iou: float | None = 0.5,
                              task1_dir: str | Path | None = None) -> dict[str, Any]:
    """DOTA protocol: merge patch detections into full images, score them, optionally write Task1 files.

    Args:
        patch_detections: patch name ``<id>__<size>__<x>___<y>`` -> detections in patch pixels
            (:func:`accord_mutdet.data.merge_patch_detections`).
        records: the full images' ground truth.
        class_names: class of each label index.
        rule: ``"voc"`` or ``"mmrotate"``.
        nms_iou: cross-patch rotated NMS threshold (0.1).
        score_thr: score filter before merging (0.05).
        patch_nms_iou: rotated NMS within each patch before merging (0.5; None: none).
        task1_dir: where to write ``Task1_<class>.txt`` (None: not written).

    Returns:
        :func:`evaluate_detections`'s result for the merged full-image detections.
    """
    from accord_mutdet.data.patches import merge_patch_detections

    merged = merge_patch_detections(patch_detections, iou_thr=nms_iou, score_thr=score_thr,
                                    patch_iou_thr=patch_nms_iou)
    if task1_dir is not None:
        write_dota_task1(merged, class_names, task1_dir)
    return evaluate_detections(merged, records, class_names, rule=rule)


def shapely_iou_matrix(boxes1: torch.Tensor, boxes2: torch.Tensor) -> np.ndarray:
    """All-pairs rotated IoU by a shapely polygon loop: the slow baseline of :func:`iou_speed`."""
    from shapely.geometry import Polygon

    first = [Polygon(p.reshape(4, 2)) for p in le90_to_polygon(boxes1.double()).numpy()]
    second = [Polygon(p.reshape(4, 2)) for p in le90_to_polygon(boxes2.double()).numpy()]
    out = np.zeros((len(first), len(second)))
    for i, a in enumerate(first):
        for j, b in enumerate(second):
            inter = a.intersection(b).area
            union = a.area + b.area - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def iou_speed(num_dets: int = 2000, num_gts: int = 100, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Time all-pairs rotated IoU of detections vs ground truth: mmcv's kernel vs a shapely loop.

    Boxes are random le90 boxes on a 1024 px image (the evaluation's workload: every detection of a
    class against that class's ground truth). Returns the median / min / max seconds of each, the
    pairs per second, the speed-up of the medians and the largest IoU difference between them.
    """
    generator = torch.Generator().manual_seed(seed)

    def boxes(n: int) -> torch.Tensor:
        u = torch.rand(n, 5, generator=generator)
        return torch.stack([u[:, 0] * 1024, u[:, 1] * 1024, 20 + u[:, 2] * 80, 10 + u[:, 3] * 40,
                            (u[:, 4] - 0.5) * torch.pi], dim=1)

    dets, gts = boxes(num_dets), boxes(num_gts)
    timings: dict[str, list[float]] = {"mmcv": [], "shapely": []}
    for _ in range(repeats):
        start = time.perf_counter()
        fast = box_iou_rotated(dets, gts).numpy()
        timings["mmcv"].append(time.perf_counter() - start)
        start = time.perf_counter()
        slow = shapely_iou_matrix(dets, gts)
        timings["shapely"].append(time.perf_counter() - start)
    summary: dict[str, Any] = {"pairs": num_dets * num_gts}
    for name, values in timings.items():
        summary[name] = {"median_s": float(np.median(values)), "min_s": float(np.min(values)),
                         "max_s": float(np.max(values)), "pairs_per_s": num_dets * num_gts / float(np.median(values))}
    summary["speedup"] = summary["shapely"]["median_s"] / summary["mmcv"]["median_s"]
    summary["max_abs_iou_difference"] = float(np.abs(fast - slow).max())
    return summary


class EvalIouConfig(BenchmarkConfig):
    """``accord benchmark mutdet --speed eval_iou``: :func:`iou_speed`."""

    num_dets: int = Field(2000, ge=1, description="detections (quick: 300)")
    num_gts: int = Field(100, ge=1, description="ground-truth boxes")
    repeats: int = Field(3, ge=1, description="timed repetitions")


def run_eval_iou(cfg: EvalIouConfig) -> BenchmarkResult:
    """Evaluation's rotated IoU: mmcv's kernel (what :func:`evaluate_detections` uses) vs shapely."""
    values = iou_speed(preset(cfg, "num_dets", 300), cfg.num_gts, cfg.repeats, cfg.seed)
    return BenchmarkResult.measured(
        "mutdet: rotated IoU for VOC07 evaluation, mmcv box_iou_rotated vs a shapely polygon loop", values,
        notes=[f"{values['pairs']} detection x ground-truth pairs, {cfg.repeats} repeats; seconds are "
               "median (min / max) wall time on this machine's CPU."])
