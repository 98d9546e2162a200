"""Axis-aligned IoU and GIoU against a plain loop and against MONAI."""

from __future__ import annotations

import pytest
import torch
from accord.boxes import box_giou, box_iou


def _random_boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    """xyxy boxes in a 10 x 10 image, sizes 0.5..5, so some overlap and some do not."""
    top_left = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 8
    size = 0.5 + torch.rand(count, 2, generator=generator, dtype=torch.float64) * 4.5
    return torch.cat([top_left, top_left + size], dim=1)


def _reference(box1: list[float], box2: list[float]) -> tuple[float, float]:
    """IoU and GIoU of two xyxy boxes, straight from the definitions."""
    ax1, ay1, ax2, ay2 = box1
    bx1, by1, bx2, by2 = box2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union, inter / union - (hull - union) / hull


def test_pairwise_and_aligned_match_the_loop_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    boxes1, boxes2 = _random_boxes(5, generator), _random_boxes(4, generator)
    iou, giou = box_iou(boxes1, boxes2), box_giou(boxes1, boxes2)
    assert iou.shape == giou.shape == (5, 4)
    for i, box1 in enumerate(boxes1.tolist()):
        for j, box2 in enumerate(boxes2.tolist()):
            want_iou, want_giou = _reference(box1, box2)
            assert iou[i, j].item() == pytest.approx(want_iou, abs=1e-12)
            assert giou[i, j].item() == pytest.approx(want_giou, abs=1e-12)
    assert 0 < int((iou > 0).sum()) < iou.numel()  # the case mixes overlapping and disjoint pairs
    torch.testing.assert_close(box_iou(boxes1[:4], boxes2, aligned=True), iou[:4].diagonal())
    torch.testing.assert_close(box_giou(boxes1[:4], boxes2, aligned=True), giou[:4].diagonal())


def test_aligned_accepts_leading_dims_and_empty_inputs() -> None:
    boxes = _random_boxes(6, torch.Generator().manual_seed(1)).reshape(2, 3, 4)
    assert box_giou(boxes, boxes.flip(0), aligned=True).shape == (2, 3)
    assert box_iou(torch.zeros(0, 4), boxes[0]).shape == (0, 3)
    assert box_giou(boxes[0], torch.zeros(0, 4)).shape == (3, 0)


def test_giou_equals_iou_for_identical_and_nested_boxes_and_is_negative_when_disjoint() -> None:
    outer = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    inner = torch.tensor([[1.0, 1.0, 2.0, 3.0]])
    far = torch.tensor([[6.0, 0.0, 8.0, 4.0]])
    torch.testing.assert_close(box_giou(outer, outer), torch.ones(1, 1))
    torch.testing.assert_close(box_giou(outer, inner), box_iou(outer, inner))
    torch.testing.assert_close(box_iou(outer, inner), torch.tensor([[2.0 / 16.0]]))
    # Disjoint: IoU 0, GIoU = -(hull - union) / hull = -(32 - 24) / 32.
    torch.testing.assert_close(box_giou(outer, far), torch.tensor([[-0.25]]))


def test_gradients_are_exact_and_finite_for_degenerate_boxes() -> None:
    generator = torch.Generator().manual_seed(2)
    boxes1 = _random_boxes(3, generator).requires_grad_()
    boxes2 = _random_boxes(3, generator).requires_grad_()
    assert torch.autograd.gradcheck(box_giou, (boxes1, boxes2))
    assert torch.autograd.gradcheck(lambda a, b: box_iou(a, b, aligned=True), (boxes1, boxes2))
    # Two identical zero-area boxes: IoU and GIoU are defined as 0, gradients stay finite.
    point = torch.tensor([[1.0, 1.0, 1.0, 3.0]], requires_grad=True)
    value = box_giou(point, point.detach()) + box_iou(point, point.detach())
    value.sum().backward()
    assert value.item() == 0.0 and torch.isfinite(point.grad).all()


@pytest.mark.slow  # importing monai.data takes seconds; the comparison itself is instant
def test_matches_monai_box_utils() -> None:
    box_utils = pytest.importorskip("monai.data.box_utils")
    generator = torch.Generator().manual_seed(3)
    boxes1, boxes2 = _random_boxes(6, generator).float(), _random_boxes(5, generator).float()
    # MONAI computes in float32 with an epsilon in the divisors, hence the tolerance.
    torch.testing.assert_close(
        box_iou(boxes1, boxes2), box_utils.box_iou(boxes1, boxes2), atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        box_giou(boxes1, boxes2), box_utils.box_giou(boxes1, boxes2), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("boxes1", "boxes2", "kwargs", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), {}, r"boxes1: expected shape \(\.\.\., 4\)"),
        (torch.zeros(2, 2, 4), torch.zeros(2, 4), {}, r"boxes1: expected shape \(N, 4\)"),
        (torch.zeros(2, 4), torch.zeros(3, 4), {"aligned": True}, "must have the same shape"),
        (torch.zeros(1, 4), torch.tensor([[2.0, 0.0, 1.0, 1.0]]), {}, "boxes2: expected xyxy"),
        (torch.full((1, 4), float("nan")), torch.zeros(1, 4), {}, "boxes1: .* 1 invalid or NaN"),
    ],
)
def test_bad_input_names_the_argument(boxes1, boxes2, kwargs, message: str) -> None:
    for function in (box_iou, box_giou):
        with pytest.raises(ValueError, match=message):
            function(boxes1, boxes2, **kwargs)
