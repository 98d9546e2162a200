"""Box operations shared by detection and grounding plugins (see docs/engine.md, "Boxes").

* :mod:`accord.boxes.convert` - axis-aligned formats ``xyxy`` / ``xywh`` / ``cxcywh`` and
  normalisation by the image size;
* :mod:`accord.boxes.iou` - differentiable IoU and generalised IoU, all pairs or aligned;
* :mod:`accord.boxes.rotated` - le90 rotated boxes ``(cx, cy, w, h, theta)``: canonical form,
  corners and DOTA polygons, min-area rectangles, and rotated IoU / NMS through mmcv;
* :mod:`accord.boxes.matching` - Hungarian matching and the DETR-style :class:`HungarianMatcher`.

Coordinates are continuous, x to the right and y down; theta is in radians.
"""

from __future__ import annotations

from accord.boxes.convert import (
    box_convert,
    cxcywh_to_xyxy,
    denormalise_boxes,
    normalise_boxes,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from accord.boxes.iou import box_giou, box_iou
from accord.boxes.matching import HungarianMatcher, hungarian_match
from accord.boxes.rotated import (
    box_iou_rotated,
    corners_to_le90,
    le90_to_corners,
    le90_to_polygon,
    nms_rotated,
    normalise_le90,
    polygon_to_le90,
)

__all__ = [
    "HungarianMatcher",
    "box_convert",
    "box_giou",
    "box_iou",
    "box_iou_rotated",
    "corners_to_le90",
    "cxcywh_to_xyxy",
    "denormalise_boxes",
    "hungarian_match",
    "le90_to_corners",
    "le90_to_polygon",
    "nms_rotated",
    "normalise_boxes",
    "normalise_le90",
    "polygon_to_le90",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]
