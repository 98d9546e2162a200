"""Hungarian (optimal one-to-one) matching and the DETR-style query-to-target matcher."""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from accord.boxes.convert import check_boxes, cxcywh_to_xyxy
from accord.boxes.iou import box_giou
from accord.boxes.rotated import box_iou_rotated
from accord.utils.checks import check_finite, check_index_range, check_tensor

ClassCost = Literal["softmax", "focal"]
IoUCost = Literal["giou", "rotated_iou"]


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-to-one assignment of rows to columns with the smallest total cost.

    Solved exactly by scipy's ``linear_sum_assignment`` on CPU in float64 (the costs leave the
    device once; the indices come back to it). A rectangular matrix matches ``min(N, M)`` pairs.

    Args:
        cost: finite cost of pairing row ``i`` with column ``j``.

    Returns:
        ``(rows, cols)``: pair ``k`` is ``(rows[k], cols[k])``; rows ascending, ``long``, on
        ``cost``'s device.

    Shape:
        cost: ``(N, M)`` (``N`` or ``M`` may be 0); rows, cols: ``(min(N, M),)``.
    """
    check_tensor(cost, "cost", ndim=2, min_rows=0, floating=True)
    check_finite(cost, "cost")
    rows, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy())
    return (
        torch.as_tensor(rows, dtype=torch.long, device=cost.device),
        torch.as_tensor(cols, dtype=torch.long, device=cost.device),
    )


def _check_weight(value: float, name: str) -> float:
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
    return float(value)


class HungarianMatcher:
    """DETR-style bipartite matching of predicted queries to the targets of each image.

    Per image, the cost of query ``q`` for target ``t`` is::

        class_weight * class_cost(q, label_t)
        + l1_weight * |box_q[:4] - box_t[:4]|_1
        + iou_weight * (-GIoU(box_q, box_t)  or  -rotated IoU(box_q, box_t))
        + extra_costs[image][q, t]

    and :func:`hungarian_match` picks the cheapest one-to-one assignment. Boxes are
    ``(cx, cy, w, h)`` (usually normalised to the image) or le90 ``(cx, cy, w, h, theta)``.
    Class costs:

    * ``"softmax"`` (DETR): ``-softmax(logits)[label]``; ``logits`` may include a no-object
      column, which no target uses.
    * ``"focal"`` (Deformable DETR, ARS-DETR ``FocalLossCost``): with ``p = sigmoid(logits)``,
      ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at the target label, the
      logs computed as log-sigmoids (no epsilon).

    The L1 term uses the first four coordinates only: a rotated box's angle is periodic, so an
    angle cost (e.g. ARS-DETR's AR-CSL cross-entropy times ``2r / (1 + r)``) is passed through
    ``extra_costs``. ``iou_cost="giou"`` uses the horizontal box ``(cx, cy, w, h)`` (for rotated
    boxes that ignores the angle, as ARS-DETR's matcher does); ``"rotated_iou"`` uses
    :func:`box_iou_rotated` (needs mmcv; on normalised boxes it is exact only for square images).
    A weight of 0 skips its term.

    Matching runs without gradient (a matcher decides targets). Like the engine's matchers this
    is a plain class: it holds configuration only, no parameters.

    Args:
        class_weight: weight of the class cost (DETR 1, ARS-DETR 2).
        l1_weight: weight of the box L1 cost (DETR 5, ARS-DETR 2).
        iou_weight: weight of the negative (G)IoU cost (DETR 2, ARS-DETR 5).
        class_cost: ``"softmax"`` or ``"focal"``.
        iou_cost: ``"giou"`` or ``"rotated_iou"``.
        focal_alpha: focal-cost alpha.
        focal_gamma: focal-cost gamma.
    """

    def __init__(
        self,
        class_weight: float = 1.0,
        l1_weight: float = 1.0,
        iou_weight: float = 1.0,
        class_cost: ClassCost = "softmax",
        iou_cost: IoUCost = "giou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"class_cost: expected 'softmax' or 'focal', got {class_cost!r}")
        if iou_cost not in ("giou", "rotated_iou"):
            raise ValueError(f"iou_cost: expected 'giou' or 'rotated_iou', got {iou_cost!r}")
        if not 0 <= focal_alpha <= 1:
            raise ValueError(f"focal_alpha: expected a value in [0, 1], got {focal_alpha!r}")
        self.class_weight = _check_weight(class_weight, "class_weight")
        self.l1_weight = _check_weight(l1_weight, "l1_weight")
        self.iou_weight = _check_weight(iou_weight, "iou_weight")
        self.class_cost = class_cost
        self.iou_cost = iou_cost
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = _check_weight(focal_gamma, "focal_gamma")

    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        target_labels: torch.Tensor,
        target_boxes: torch.Tensor,
    ) -> torch.Tensor:
        """The weighted matching cost of one image, without ``extra_costs``.

        Args:
            logits: class logits of each query.
            boxes: predicted boxes, cxcywh or le90.
            target_labels: class of each target, in ``[0, C)``.
            target_boxes: target boxes, same layout as ``boxes``.

        Returns:
            Cost of query ``q`` for target ``t``, in ``logits``' dtype promoted to at least
            float32.

        Shape:
            logits: ``(Q, C)``; boxes: ``(Q, D)``, ``D`` 4 or 5; target_labels: ``(T,)``;
            target_boxes: ``(T, D)``; output: ``(Q, T)``.
        """
        check_tensor(logits, "logits", ndim=2, min_rows=0, floating=True)
        num_queries = logits.shape[0]
        check_boxes(boxes, "boxes", size=(4, 5))
        check_tensor(boxes, "boxes", shape=(num_queries, None), min_rows=0)
        check_tensor(target_labels, "target_labels", ndim=1, min_rows=0, floating=False)
        check_index_range(target_labels, "target_labels", logits.shape[1])
        check_tensor(
            target_boxes, "target_boxes", shape=(target_labels.shape[0], boxes.shape[1]),
            min_rows=0, floating=True,
        )
        if self.iou_cost == "rotated_iou" and boxes.shape[1] != 5:
            raise ValueError(
                f"boxes: iou_cost='rotated_iou' expects le90 boxes (Q, 5), got {tuple(boxes.shape)}"
            )
        # At least float32: bf16 / fp16 costs (autocast outputs) would tie near-equal queries.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        cost = logits.new_zeros(num_queries, target_labels.shape[0], dtype=dtype)
        if self.class_weight:
            class_cost = self._class_cost(logits.to(dtype))
            cost = cost + self.class_weight * class_cost[:, target_labels]
        if self.l1_weight:
            l1 = torch.cdist(boxes[:, :4].to(dtype), target_boxes[:, :4].to(dtype), p=1)
            cost = cost + self.l1_weight * l1
        if self.iou_weight:
            if self.iou_cost == "giou":
                overlap = box_giou(
                    cxcywh_to_xyxy(boxes[:, :4].to(dtype)),
                    cxcywh_to_xyxy(target_boxes[:, :4].to(dtype)),
                )
            else:
                overlap = box_iou_rotated(boxes, target_boxes)
            cost = cost - self.iou_weight * overlap.to(dtype)
        return cost

    def _class_cost(self, logits: torch.Tensor) -> torch.Tensor:
        """Class cost of every query for every class, ``(Q, C)``."""
        if self.class_cost == "softmax":
            return -logits.softmax(dim=-1)
        prob = logits.sigmoid()
        # -log p = -logsigmoid(x) and -log(1 - p) = -logsigmoid(-x), exact for large |x|.
        positive = self.focal_alpha * (1 - prob) ** self.focal_gamma * -F.logsigmoid(logits)
        negative = (1 - self.focal_alpha) * prob**self.focal_gamma * -F.logsigmoid(-logits)
        return positive - negative

    def __call__(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: Sequence[Mapping[str, torch.Tensor]],
        extra_costs: Sequence[torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match the queries of every image to its targets.

        Args:
            logits: class logits per image and query.
            boxes: predicted boxes per image and query, cxcywh or le90.
            targets: one mapping per image with ``"labels"`` ``(T_b,)`` integer and ``"boxes"``
                ``(T_b, D)``; ``T_b`` may differ between images and be 0.
            extra_costs: optional per-image costs ``(Q, T_b)``, already weighted, added before
                matching (e.g. an angle cost).

        Returns:
            Per image, ``(query_index, target_index)``: ``long`` tensors of length
            ``min(Q, T_b)`` on ``logits``' device, query indices ascending.

        Shape:
            logits: ``(B, Q, C)``; boxes: ``(B, Q, D)`` with ``D`` 4 or 5.
        """
        check_tensor(logits, "logits", ndim=3, min_rows=0, floating=True)
        batch, num_queries = logits.shape[:2]
        check_tensor(boxes, "boxes", shape=(batch, num_queries, None), min_rows=0)
        if len(targets) != batch:
            raise ValueError(
                f"targets: expected {batch} entries (one per image), got {len(targets)}"
            )
        if extra_costs is not None and len(extra_costs) != batch:
            raise ValueError(
                f"extra_costs: expected {batch} entries (one per image), got {len(extra_costs)}"
            )
        matches = []
        with torch.no_grad():
            for index, target in enumerate(targets):
                missing = {"labels", "boxes"} - set(target)
                if missing:
                    raise ValueError(f"targets[{index}]: missing key(s) {sorted(missing)}")
                cost = self.cost_matrix(
                    logits[index], boxes[index], target["labels"], target["boxes"]
                )
                if extra_costs is not None:
                    extra = extra_costs[index]
                    check_tensor(
                        extra, f"extra_costs[{index}]", shape=tuple(cost.shape), min_rows=0,
                        floating=True,
                    )
                    cost = cost + extra.to(cost.dtype)
                matches.append(hungarian_match(cost))
        return matches
