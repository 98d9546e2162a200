"""Axis-aligned IoU and generalised IoU (Rezatofighi et al. 2019), differentiable.

Both take ``xyxy`` boxes. ``aligned=False`` compares every box of ``boxes1`` with every box of
``boxes2`` (``(N, 4)`` x ``(M, 4)`` -> ``(N, M)``, matching costs); ``aligned=True`` compares
boxes pairwise by position (same shape ``(..., 4)`` -> ``(...)``, losses such as MedRPG's
``1 - GIoU``). The core computes these itself so that it does not depend on MONAI or torchvision;
the tests compare against ``monai.data.box_utils``.
"""

from __future__ import annotations

import torch

from accord.boxes.convert import check_boxes
from accord.utils.checks import check_same_shape


def _pair_up(
    boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate both inputs and broadcast them against each other (all pairs unless aligned)."""
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        check_boxes(boxes, name)
        if not aligned and boxes.ndim != 2:
            raise ValueError(
                f"{name}: expected shape (N, 4) with aligned=False, got {tuple(boxes.shape)}"
            )
        # One reduction catches both inverted corners and NaN (NaN >= x is False). Degenerate
        # boxes would otherwise give negative areas and silently wrong IoUs and gradients.
        if not bool((boxes[..., 2:] >= boxes[..., :2]).all()):
            bad = int((~(boxes[..., 2:] >= boxes[..., :2]).all(-1)).sum())
            raise ValueError(
                f"{name}: expected xyxy boxes with x2 >= x1 and y2 >= y1, got {bad} invalid or "
                "NaN box(es)"
            )
    if aligned:
        check_same_shape(boxes1, boxes2, "boxes1", "boxes2")
        return boxes1, boxes2
    return boxes1[:, None, :], boxes2[None, :, :]


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, defined as 0 where the denominator is 0.

    A zero union or enclosing area means both boxes are degenerate (zero intersection). Masking
    the divisor, instead of adding an epsilon, keeps every other value exact and the gradient
    finite.
    """
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator) / torch.where(
        zero, torch.ones_like(denominator), denominator
    )


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection_union(
    boxes1: torch.Tensor, boxes2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    return intersection, _area(boxes1) + _area(boxes2) - intersection


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """Intersection over union of axis-aligned boxes.

    Args:
        boxes1: ``xyxy`` boxes with ``x2 >= x1`` and ``y2 >= y1``.
        boxes2: ``xyxy`` boxes, same rule.
        aligned: compare ``boxes1[i]`` with ``boxes2[i]`` only, instead of all pairs.

    Returns:
        IoU in ``[0, 1]``; 0 for two zero-area boxes.

    Shape:
        ``aligned=False``: boxes1 ``(N, 4)``, boxes2 ``(M, 4)``, output ``(N, M)``.
        ``aligned=True``: boxes1 and boxes2 ``(..., 4)`` (same shape), output ``(...)``.
    """
    boxes1, boxes2 = _pair_up(boxes1, boxes2, aligned)
    return _safe_divide(*_intersection_union(boxes1, boxes2))


def box_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """Generalised IoU: ``IoU - (C - U) / C``, with ``C`` the area of the smallest enclosing box.

    GIoU lies in ``[-1, 1]``, equals IoU for nested or identical boxes, and keeps a gradient for
    disjoint boxes, hence its use as a regression loss (``1 - GIoU``) and DETR matching cost.

    Args:
        boxes1: ``xyxy`` boxes with ``x2 >= x1`` and ``y2 >= y1``.
        boxes2: ``xyxy`` boxes, same rule.
        aligned: compare ``boxes1[i]`` with ``boxes2[i]`` only, instead of all pairs.

    Returns:
        GIoU in ``[-1, 1]``; 0 for two zero-area boxes with a zero-area enclosing box.

    Shape:
        ``aligned=False``: boxes1 ``(N, 4)``, boxes2 ``(M, 4)``, output ``(N, M)``.
        ``aligned=True``: boxes1 and boxes2 ``(..., 4)`` (same shape), output ``(...)``.
    """
    boxes1, boxes2 = _pair_up(boxes1, boxes2, aligned)
    intersection, union = _intersection_union(boxes1, boxes2)
    top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enclosing = (bottom_right - top_left).prod(dim=-1)
    return _safe_divide(intersection, union) - _safe_divide(enclosing - union, enclosing)
