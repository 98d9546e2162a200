"""Rotated boxes in mmrotate's ``le90`` convention: conversions, IoU and NMS.

Convention (mmrotate 0.x ``poly2obb_np_le90`` / ``obb2poly_le90``, mmrotate 1.x
``RotatedBoxes.regularize_boxes(pattern="le90")``; DOTA / DIOR-R tooling and ARS-DETR use it):

* a box is ``(cx, cy, w, h, theta)`` in pixel (or normalised, see :func:`normalise_boxes`)
  coordinates with x to the right and y *down*, theta in **radians**;
* it is the axis-aligned box ``(cx, cy, w, h)`` rotated about its centre by ``theta``, with the
  rotation matrix ``[[cos, -sin], [sin, cos]]``: the ``w`` side points along
  ``(cos theta, sin theta)``. Because y points down, a positive theta turns the box **clockwise**
  on screen (mmcv's ``clockwise=True``);
* canonical form: ``w >= h`` (``w`` is the long side) and ``theta`` in ``[-pi/2, pi/2)``. Every
  rectangle has one canonical form except squares, whose ``theta`` stays ambiguous modulo
  ``pi/2`` (like mmrotate's; see :func:`normalise_le90` for the tie rule).

Corners are listed as the box-frame points ``(-w/2, -h/2), (w/2, -h/2), (w/2, h/2),
(-w/2, h/2)`` rotated and shifted, i.e. "top-left, top-right, bottom-right, bottom-left" before
rotation, clockwise on screen: the order of mmrotate 0.x ``obb2poly_le90`` and of DOTA labels.

Rotated IoU and NMS call mmcv's compiled ops (``mmcv.ops.box_iou_rotated`` /
``mmcv.ops.nms_rotated``): exact polygon clipping on CPU and CUDA, which the core does not
re-implement. mmcv is imported on first use only, so the rest of ``accord.boxes`` works without it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from accord.boxes.convert import check_boxes
from accord.utils.checks import check_same_shape, check_tensor

# The install the Makefile uses: building from source is what compiles the ops against the
# installed torch (about 13 min on 2 cores); --no-deps keeps mmcv's opencv-python from pulling
# numpy 2 (opencv itself is still needed by `import mmcv`).
MMCV_INSTALL = "MMCV_WITH_OPS=1 pip install mmcv==2.1.0 --no-build-isolation --no-deps"


def normalise_le90(boxes: torch.Tensor) -> torch.Tensor:
    """Bring any ``(cx, cy, w, h, theta)`` to the canonical le90 form of the same rectangle.

    If ``w < h`` the sides swap and theta grows by ``pi/2``; theta is then wrapped into
    ``[-pi/2, pi/2)`` modulo ``pi``. Ties (``w == h``) keep their sides, as mmrotate 0.x
    ``poly2obb_np_le90`` does (mmrotate 1.x swaps ties; both describe the same square).

    Args:
        boxes: rotated boxes with ``w, h >= 0`` and any finite theta.

    Returns:
        The same rectangles with ``w >= h`` and ``theta`` in ``[-pi/2, pi/2)``.

    Shape:
        boxes: ``(..., 5)``; output: ``(..., 5)``.
    """
    cx, cy, w, h, theta = check_boxes(boxes, "boxes", size=5).unbind(-1)
    swap = w < h
    long_side, short_side = torch.where(swap, h, w), torch.where(swap, w, h)
    theta = torch.where(swap, theta + math.pi / 2, theta)
    theta = torch.remainder(theta + math.pi / 2, math.pi) - math.pi / 2
    # remainder can round up to exactly pi for inputs just below a multiple of pi.
    theta = torch.where(theta >= math.pi / 2, theta - math.pi, theta)
    return torch.stack([cx, cy, long_side, short_side, theta], dim=-1)


def le90_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """The four corners of rotated boxes, in the order given in the module docstring.

    Works for any theta (canonical or not); differentiable.

    Args:
        boxes: rotated boxes ``(cx, cy, w, h, theta)``.

    Returns:
        Corner points ``(x, y)``.

    Shape:
        boxes: ``(..., 5)``; output: ``(..., 4, 2)``.
    """
    centre, w, h, theta = check_boxes(boxes, "boxes", size=5).split([2, 1, 1, 1], dim=-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    half_w = torch.cat([cos, sin], dim=-1) * (w / 2)  # along the w side
    half_h = torch.cat([-sin, cos], dim=-1) * (h / 2)  # along the h side
    return torch.stack(
        [
            centre - half_w - half_h,
            centre + half_w - half_h,
            centre + half_w + half_h,
            centre - half_w + half_h,
        ],
        dim=-2,
    )


def corners_to_le90(corners: torch.Tensor) -> torch.Tensor:
    """Minimum-area rotated rectangle around four points, in canonical le90 form.

    DOTA / DIOR-R labels are quadrilaterals that are only roughly rectangular, so a polygon is
    turned into a box the way mmrotate's ``poly2obb_np_le90`` does: its minimum-area enclosing
    rectangle. Algorithm (rotating calipers, Freeman & Shapira 1975): the minimum-area rectangle
    around a convex polygon has a side collinear with one of its edges. The six directions
    between pairs of the four points contain every edge of their convex hull, and each direction
    yields a valid enclosing rectangle (extent of the points along it and across it), so the
    smallest of those six is the minimum; no hull needs to be built, any point order (even a
    self-intersecting one) works, and it runs batched on the input device. This replaces
    ``cv2.minAreaRect``, which would make opencv a core dependency, works one float32 polygon at a
    time on CPU, and changed its angle convention in OpenCV 4.5.1. Unlike mmrotate, boxes
    smaller than 2 px are not dropped; filter them where the dataset needs it.

    The arithmetic runs in float64 (pixel coordinates of large DOTA images in float32 lose
    sub-pixel precision in the products) and the result is cast back.

    Args:
        corners: four points ``(x, y)`` per box. All four equal gives ``w = h = 0``; collinear
            points give ``h = 0``.

    Returns:
        Rotated boxes ``(cx, cy, w, h, theta)`` in canonical le90 form.

    Shape:
        corners: ``(..., 4, 2)``; output: ``(..., 5)``.
    """
    check_tensor(corners, "corners", min_rows=0, floating=True)
    if corners.ndim < 2 or tuple(corners.shape[-2:]) != (4, 2):
        raise ValueError(f"corners: expected shape (..., 4, 2), got {tuple(corners.shape)}")
    points = corners.to(torch.float64)
    first, second = torch.triu_indices(4, 4, offset=1, device=corners.device)  # the 6 pairs
    edges = points[..., second, :] - points[..., first, :]  # (..., 6, 2)
    length = edges.norm(dim=-1, keepdim=True)
    # A pair of equal points has no direction; the x axis stands in. Any direction gives a valid
    # enclosing rectangle, so a stand-in never beats the minimum, and four equal points still get
    # their centre.
    x_axis = torch.tensor([1.0, 0.0], dtype=torch.float64, device=corners.device)
    along = torch.where(length > 0, edges / torch.where(length > 0, length, 1.0), x_axis)
    across = torch.stack([-along[..., 1], along[..., 0]], dim=-1)
    # Coordinates of the 4 points along / across each candidate direction: (..., 6, 4).
    a = along @ points.transpose(-1, -2)
    b = across @ points.transpose(-1, -2)
    a_min, a_max = a.aminmax(dim=-1)
    b_min, b_max = b.aminmax(dim=-1)
    area = (a_max - a_min) * (b_max - b_min)
    best = area.argmin(dim=-1, keepdim=True)  # (..., 1)

    def pick(values: torch.Tensor) -> torch.Tensor:
        return values.gather(-1, best)[..., 0]

    direction = along.gather(-2, best[..., None].expand(*best.shape, 2))[..., 0, :]
    normal = torch.stack([-direction[..., 1], direction[..., 0]], dim=-1)
    centre = (
        direction * pick(a_min + a_max)[..., None] + normal * pick(b_min + b_max)[..., None]
    ) / 2
    boxes = torch.cat(
        [
            centre,
            pick(a_max - a_min)[..., None],
            pick(b_max - b_min)[..., None],
            torch.atan2(direction[..., 1], direction[..., 0])[..., None],
        ],
        dim=-1,
    )
    return normalise_le90(boxes).to(corners.dtype)


def le90_to_polygon(boxes: torch.Tensor) -> torch.Tensor:
    """Rotated boxes to flat DOTA polygons ``(x1, y1, ..., x4, y4)`` (corner order as above).

    Shape:
        boxes: ``(..., 5)``; output: ``(..., 8)``.
    """
    return le90_to_corners(boxes).flatten(-2)


def polygon_to_le90(polygons: torch.Tensor) -> torch.Tensor:
    """Flat DOTA polygons ``(x1, y1, ..., x4, y4)`` to le90 boxes (see :func:`corners_to_le90`).

    Shape:
        polygons: ``(..., 8)``; output: ``(..., 5)``.
    """
    check_boxes(polygons, "polygons", size=8)
    return corners_to_le90(polygons.unflatten(-1, (4, 2)))


def _mmcv_op(name: str) -> Callable[..., Any]:
    """``mmcv.ops.<name>``, or an ImportError that says how to install mmcv with its ops."""
    try:
        from mmcv import ops  # heavy (pulls in mmengine, opencv), so imported on first use
    except ImportError as error:
        raise ImportError(
            f"accord.boxes.{name} needs mmcv with compiled ops; install it with {MMCV_INSTALL}. "
            f"Importing mmcv.ops failed: {error}"
        ) from error
    return getattr(ops, name)


def _check_rotated(boxes: torch.Tensor, name: str) -> torch.Tensor:
    check_boxes(boxes, name, size=5)
    if boxes.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, 5), got {tuple(boxes.shape)}")
    return boxes


def box_iou_rotated(
    boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool = False
) -> torch.Tensor:
    """IoU of le90 rotated boxes through ``mmcv.ops.box_iou_rotated`` (``clockwise=True``).

    mmcv's kernel is float32 and has no backward, so the result carries no gradient: use it for
    matching costs, NMS and evaluation, not as a loss.

    Args:
        boxes1: rotated boxes ``(cx, cy, w, h, theta)``, theta in radians (any range).
        boxes2: rotated boxes, same layout.
        aligned: compare ``boxes1[i]`` with ``boxes2[i]`` only, instead of all pairs.

    Returns:
        IoU in ``[0, 1]``, in the dtype of ``boxes1``.

    Raises:
        ImportError: mmcv with compiled ops is not installed (the message gives the command).

    Shape:
        ``aligned=False``: boxes1 ``(N, 5)``, boxes2 ``(M, 5)``, output ``(N, M)``.
        ``aligned=True``: boxes1 and boxes2 ``(N, 5)``, output ``(N,)``.
    """
    _check_rotated(boxes1, "boxes1")
    _check_rotated(boxes2, "boxes2")
    if aligned:
        check_same_shape(boxes1, boxes2, "boxes1", "boxes2")
    op = _mmcv_op("box_iou_rotated")
    shape = (boxes1.shape[0],) if aligned else (boxes1.shape[0], boxes2.shape[0])
    if boxes1.shape[0] == 0 or boxes2.shape[0] == 0:
        return boxes1.new_zeros(shape)
    ious = op(
        boxes1.detach().float(), boxes2.detach().float(), aligned=aligned, clockwise=True
    )
    return ious.reshape(shape).to(boxes1.dtype)


def nms_rotated(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy non-maximum suppression of le90 rotated boxes (``mmcv.ops.nms_rotated``).

    In order of decreasing score, a box is kept unless its rotated IoU with an already kept box
    is above ``iou_threshold``. With ``labels``, only boxes of the same label suppress each other
    (per-class NMS, as in DOTA patch merging).

    Args:
        boxes: rotated boxes ``(cx, cy, w, h, theta)``.
        scores: one score per box.
        iou_threshold: suppression threshold in ``[0, 1]``.
        labels: optional class of each box.

    Returns:
        Indices of the kept boxes, by decreasing score.

    Raises:
        ImportError: mmcv with compiled ops is not installed (the message gives the command).

    Shape:
        boxes: ``(N, 5)``; scores: ``(N,)``; labels: ``(N,)`` integer; output: ``(K,)`` long.
    """
    _check_rotated(boxes, "boxes")
    check_tensor(scores, "scores", shape=(boxes.shape[0],), min_rows=0, floating=True)
    if labels is not None:
        check_tensor(labels, "labels", shape=(boxes.shape[0],), min_rows=0, floating=False)
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in [0, 1], got {iou_threshold!r}")
    op = _mmcv_op("nms_rotated")
    boxes, scores = boxes.detach().float(), scores.detach().float()
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if labels is None:
        return op(boxes, scores, float(iou_threshold), clockwise=True)[1].to(torch.long)
    # One label at a time: mmcv 2.1's CPU kernel ignores `labels` (only the CUDA kernel reads
    # them), and the coordinate-offset trick of batched NMS would cost float32 precision.
    kept = []
    for label in labels.unique():
        members = (labels == label).nonzero()[:, 0]
        inner = op(boxes[members], scores[members], float(iou_threshold), clockwise=True)[1]
        kept.append(members[inner.to(torch.long)])
    keep = torch.cat(kept)
    return keep[scores[keep].argsort(descending=True, stable=True)]
