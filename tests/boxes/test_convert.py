"""Axis-aligned box formats and image-size normalisation."""

from __future__ import annotations

import itertools

import pytest
import torch
from accord.boxes import (
    box_convert,
    cxcywh_to_xyxy,
    denormalise_boxes,
    normalise_boxes,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)

# One box written in the three formats: x 10..30, y 20..60.
FORMS = {
    "xyxy": [10.0, 20.0, 30.0, 60.0],
    "xywh": [10.0, 20.0, 20.0, 40.0],
    "cxcywh": [20.0, 40.0, 20.0, 40.0],
}


@pytest.mark.parametrize(("in_fmt", "out_fmt"), list(itertools.product(FORMS, FORMS)))
def test_box_convert_between_every_pair_of_formats(in_fmt: str, out_fmt: str) -> None:
    boxes = torch.tensor([FORMS[in_fmt]] * 3).reshape(3, 1, 4)  # leading dims are kept
    expected = torch.tensor([FORMS[out_fmt]] * 3).reshape(3, 1, 4)
    torch.testing.assert_close(box_convert(boxes, in_fmt, out_fmt), expected)


def test_named_conversions_match_the_hand_written_box() -> None:
    xyxy, xywh, cxcywh = (torch.tensor(FORMS[f], dtype=torch.float64) for f in FORMS)
    torch.testing.assert_close(cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(xywh_to_xyxy(xywh), xyxy)
    torch.testing.assert_close(xyxy_to_xywh(xyxy), xywh)
    assert cxcywh_to_xyxy(cxcywh).dtype == torch.float64


def test_conversions_accept_zero_boxes_and_are_differentiable() -> None:
    assert cxcywh_to_xyxy(torch.zeros(0, 4)).shape == (0, 4)
    boxes = torch.rand(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: xyxy_to_cxcywh(cxcywh_to_xyxy(b)), (boxes,))


def test_normalise_divides_x_by_width_and_y_by_height() -> None:
    boxes = torch.tensor([[64.0, 32.0, 128.0, 96.0]])
    normalised = normalise_boxes(boxes, (128, 256))  # (H, W)
    torch.testing.assert_close(normalised, torch.tensor([[0.25, 0.25, 0.5, 0.75]]))
    torch.testing.assert_close(denormalise_boxes(normalised, (128, 256)), boxes)


def test_normalise_per_image_sizes_broadcast_and_rotated_angle_is_kept() -> None:
    boxes = torch.tensor([[[10.0, 10.0, 4.0, 2.0, 0.3]], [[10.0, 10.0, 4.0, 2.0, -0.3]]])  # (2,1,5)
    sizes = torch.tensor([[[20.0, 20.0]], [[40.0, 10.0]]])  # (B, 1, 2) of (H, W)
    normalised = normalise_boxes(boxes, sizes)
    expected = torch.tensor([[[0.5, 0.5, 0.2, 0.1, 0.3]], [[1.0, 0.25, 0.4, 0.05, -0.3]]])
    torch.testing.assert_close(normalised, expected)
    torch.testing.assert_close(denormalise_boxes(normalised, sizes), boxes)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cxcywh_to_xyxy(torch.zeros(3, 5)), r"boxes: expected shape \(\.\.\., 4\)"),
        (lambda: cxcywh_to_xyxy(torch.zeros(3, 4, dtype=torch.long)), "boxes: expected a floating"),
        (lambda: box_convert(torch.zeros(1, 4), "xyxy", "yxyx"), "out_fmt: expected one of"),
        (lambda: normalise_boxes(torch.zeros(1, 4), (0, 10)), "image_size: expected positive"),
        (lambda: normalise_boxes(torch.zeros(1, 4), (1, 2, 3)), r"image_size: expected \(H, W\)"),
    ],
)
def test_bad_input_names_the_argument(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
