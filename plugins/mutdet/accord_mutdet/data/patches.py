"""DOTA patch splitting and merging of patch detections back to full images.

Splitting follows mmrotate's ``tools/data/dota/split`` (``img_split.py``) and the DOTA devkit:
square windows of ``size`` pixels every ``size - gap`` pixels, the last window of a row / column
moved back to end at the image border; images smaller than a window give one window, padded on
the right / bottom with the ImageNet-mean colour ``(104, 116, 124)``. Reference settings: 800/200
(MutDet's pretraining patches) and 1024/200 (the usual DOTA training split).

Box rule (the usual area-ratio rule, mmrotate's ``iof_thr``): an object goes into a window when at
least ``iof_thr`` (0.7) of its area lies inside it. An object wholly inside keeps its box; a
partly inside one is *clipped*: it becomes the minimum-area rectangle of its part inside the window
(the DOTA devkit's rule) and is flagged ``truncated`` (mmrotate 1.x's ``trunc``). The difficult
flag is kept.

Merging follows MutDet's ``merge_det``: detections below ``score_thr`` (0.05) are dropped, rotated
NMS per class at ``patch_iou_thr`` (0.5) within each patch, boxes are shifted by their window's
offset, then rotated NMS per class at ``iou_thr`` (0.1) across the patches of an image
(``accord.boxes.nms_rotated``, mmcv's kernel). The first NMS is not implied by the second: a box
suppressed at 0.5 in its patch can no longer suppress others at 0.1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np
import torch
from pydantic import Field

from accord.boxes import corners_to_le90, nms_rotated
from accord.config import ExistingPath, RunConfig
from accord_mutdet.data.records import ImageRecord, detection_arrays

PAD_VALUE = (104, 116, 124)  # RGB, mmrotate's split padding
_PATCH_NAME = re.compile(r"^(?P<source>.+)__(?P<size>\d+)__(?P<x>-?\d+)___(?P<y>-?\d+)$")


def window_starts(length: int, size: int, gap: int) -> list[int]:
    """Start offsets of the windows along one side of ``length`` pixels."""
    if not 0 <= gap < size:
        raise ValueError(f"patch gap: expected 0 <= gap < size ({size}), got {gap}")
    step = size - gap
    if length <= size:
        return [0]
    count = math.ceil((length - size) / step) + 1
    starts = [step * i for i in range(count)]
    starts[-1] = length - size  # the last window ends at the border
    return starts


def patch_name(source_id: str, size: int, x: int, y: int) -> str:
    """mmrotate's patch file stem ``<id>__<size>__<x>___<y>``."""
    return f"{source_id}__{size}__{x}___{y}"


def parse_patch_name(name: str) -> tuple[str, int, int]:
    """``(source id, x, y)`` from a patch stem written by :func:`patch_name`."""
    match = _PATCH_NAME.match(Path(name).stem if "." in name else name)
    if match is None:
        raise ValueError(f"patch name {name!r}: expected '<image id>__<size>__<x>___<y>' (mmrotate's split naming)")
    return match["source"], int(match["x"]), int(match["y"])


@dataclass
class Patch:
    """One window of an image and the objects assigned to it.

    Attributes:
        record: the patch as an image record: ``image`` is the *source* image until the patch is
            written (:func:`write_patches`), ``boxes`` are in patch pixels, ``id`` is the patch name.
        source_id: the full image's id.
        x: window left edge in the full image.
        y: window top edge in the full image.
        truncated: per box, whether it was clipped to the window, bool ``(N,)``.
    """

    record: ImageRecord
    source_id: str
    x: int
    y: int
    truncated: np.ndarray


def split_record(record: ImageRecord, size: int = 1024, gap: int = 200, iof_thr: float = 0.7) -> list[Patch]:
    """The windows of one image with their objects (see the module docstring for the rule)."""
    from shapely.geometry import Polygon, box

    polygons = [Polygon(p.reshape(4, 2)) for p in record.polygons()]
    patches = []
    for y in window_starts(record.height, size, gap):
        for x in window_starts(record.width, size, gap):
            window = box(x, y, x + size, y + size)
            boxes, labels, difficult, truncated = [], [], [], []
            for index, polygon in enumerate(polygons):
                if polygon.area <= 0:
                    continue
                inside = polygon.intersection(window)
                fraction = inside.area / polygon.area
                if fraction < iof_thr:
                    continue
                if fraction >= 1 - 1e-6:
                    kept = record.boxes[index].copy()
                else:
                    corners = np.asarray(inside.minimum_rotated_rectangle.exterior.coords)[:4]
                    kept = corners_to_le90(torch.from_numpy(corners)).float().numpy()
                kept[:2] -= (x, y)
                boxes.append(kept)
                labels.append(record.labels[index])
                difficult.append(record.difficult[index])
                truncated.append(fraction < 1 - 1e-6)
            name = patch_name(record.id, size, x, y)
            patch_record = ImageRecord(record.image, size, size, np.asarray(boxes, np.float32).reshape(-1, 5),
                                       labels, np.asarray(difficult, bool), name)
            patches.append(Patch(patch_record, record.id, x, y, np.asarray(truncated, bool)))
    return patches


def write_patches(records: Iterable[ImageRecord], out_dir: str | Path, *, size: int = 1024, gap: int = 200,
                  iof_thr: float = 0.7, keep_empty: bool = True) -> list[ImageRecord]:
    """Split images into a DOTA-layout folder ``out_dir/{images,labelTxt}`` of ``.png`` patches.

    Args:
        records: the full images.
        out_dir: the patch split folder (e.g. ``<dota root>/train_1024_200``).
        size: window side in pixels.
        gap: overlap between neighbouring windows in pixels.
        iof_thr: fraction of an object's area that must lie inside a window.
        keep_empty: also write windows without objects (pretraining on pseudo-labels wants them).

    Returns:
        The written patches as records (``image`` is the written patch).
    """
    from accord_mutdet.data.dota import write_dota_labels
    from accord_mutdet.data.records import read_rgb, write_image

    out = Path(out_dir)
    written = []
    for record in records:
        image = read_rgb(record.image)
        for patch in split_record(record, size, gap, iof_thr):
            if not keep_empty and len(patch.record.boxes) == 0:
                continue
            canvas = np.empty((size, size, 3), np.uint8)
            canvas[:] = PAD_VALUE
            crop = image[patch.y:patch.y + size, patch.x:patch.x + size]
            canvas[:crop.shape[0], :crop.shape[1]] = crop
            name = patch.record.id
            write_image(out / "images" / f"{name}.png", canvas)
            difficult = patch.record.difficult
            write_dota_labels(out / "labelTxt" / f"{name}.txt", patch.record.polygons(), patch.record.labels, difficult)
            patch.record.image = out / "images" / f"{name}.png"
            written.append(patch.record)
    return written


def merge_patch_detections(detections: Mapping[str, Mapping[str, torch.Tensor | np.ndarray]], *,
                           iou_thr: float = 0.1, score_thr: float = 0.05,
                           patch_iou_thr: float | None = 0.5) -> dict[str, dict[str, torch.Tensor]]:
    """Merge per-patch detections into full-image detections.

    Args:
        detections: patch name (``<id>__<size>__<x>___<y>``) -> ``{"boxes": (M, 5) le90 in patch
            pixels, "scores": (M,), "labels": (M,) int}``.
        iou_thr: rotated NMS threshold across patches, per class (MutDet / mmrotate: 0.1).
        score_thr: detections below it are dropped first (0.05).
        patch_iou_thr: rotated NMS threshold within each patch first, per class (0.5; None: none).

    Returns:
        Source image id -> ``{"boxes": (K, 5) in full-image pixels, "scores": (K,), "labels": (K,)}``,
        by decreasing score.
    """
    grouped: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for name, det in detections.items():
        source, x, y = parse_patch_name(name)
        boxes, scores, labels = (torch.from_numpy(a) for a in detection_arrays(name, det))
        scores = scores.float()
        keep = scores >= score_thr
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if patch_iou_thr is not None and len(boxes):
            keep = nms_rotated(boxes, scores, patch_iou_thr, labels=labels)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        boxes[:, 0] += x
        boxes[:, 1] += y
        grouped.setdefault(source, []).append((boxes, scores, labels))
    merged = {}
    for source, parts in grouped.items():
        boxes, scores, labels = (torch.cat(values) for values in zip(*parts))
        keep = nms_rotated(boxes, scores, iou_thr, labels=labels)
        merged[source] = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    return merged


class SplitDotaConfig(RunConfig):
    """The ``split_dota`` task: cut a DOTA (or DIOR-R) split into patches, written under ``run_dir``."""

    plugin: str = "mutdet"
    task: str = "split_dota"
    data: ExistingPath = Field(description="DOTA root (<split>/images, <split>/labelTxt) or DIOR-R root")
    layout: Literal["auto", "dior_r", "dota"] = Field("auto", description="dataset layout")
    version: str = Field("1.0", description="DOTA version for the class names")
    split: str = Field("train", description="split to cut")
    size: int = Field(1024, ge=16, description="patch side (reference settings: 1024 or 800)")
    gap: int = Field(200, ge=0, description="overlap of neighbouring patches (reference: 200)")
    iof_thr: float = Field(0.7, gt=0, le=1, description="fraction of an object inside a patch to keep it")
    keep_empty: bool = Field(True, description="also write patches without objects")


def run_split_dota(cfg: SplitDotaConfig) -> dict[str, object]:
    """Check and read the split, then write ``run_dir/<split>_<size>_<gap>/{images,labelTxt}`` (a DOTA split)."""
    from accord_mutdet.data.check import load_checked

    records = load_checked(cfg.data, cfg.split, layout=cfg.layout, version=cfg.version)
    name = f"{cfg.split}_{cfg.size}_{cfg.gap}"
    patches = write_patches(records, Path(cfg.run_dir) / name, size=cfg.size, gap=cfg.gap, iof_thr=cfg.iof_thr,
                            keep_empty=cfg.keep_empty)
    return {"images": len(records), "patches": len(patches), "boxes": int(sum(len(p.boxes) for p in patches)),
            "root": str(cfg.run_dir), "split": name}
