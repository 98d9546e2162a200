"""le90 rotated boxes: canonical form, corners, min-area rectangles, rotated IoU and NMS.

Rotated IoU and NMS (mmcv) are checked against plain references written here: Sutherland-Hodgman
clipping of the two corner polygons plus the shoelace area, and a greedy NMS loop over it.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from accord.boxes import (
    box_iou_rotated,
    corners_to_le90,
    le90_to_corners,
    le90_to_polygon,
    nms_rotated,
    normalise_le90,
    polygon_to_le90,
)

HALF_PI = math.pi / 2


def _random_le90(count: int, generator: torch.Generator, spread: float = 8.0) -> torch.Tensor:
    """Canonical boxes: centres in [0, spread]^2, long side 3..8, short side 1..3."""
    centre = torch.rand(count, 2, generator=generator, dtype=torch.float64) * spread
    long_side = 3 + 5 * torch.rand(count, 1, generator=generator, dtype=torch.float64)
    short_side = 1 + 2 * torch.rand(count, 1, generator=generator, dtype=torch.float64)
    theta = (torch.rand(count, 1, generator=generator, dtype=torch.float64) - 0.5) * math.pi
    return torch.cat([centre, long_side, short_side, theta], dim=1)


def _shoelace(polygon: list[tuple[float, float]]) -> float:
    """Signed area (positive when counter-clockwise in x-right, y-up axes)."""
    return 0.5 * sum(
        x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(polygon, polygon[1:] + polygon[:1])
    )


def _clip(subject: list[tuple[float, float]], clip: list[tuple[float, float]]):
    """Sutherland-Hodgman: the part of convex ``subject`` inside convex ``clip``."""
    orientation = 1.0 if _shoelace(clip) > 0 else -1.0
    output = subject
    for (ax, ay), (bx, by) in zip(clip, clip[1:] + clip[:1]):
        def inside(point, ax=ax, ay=ay, bx=bx, by=by):
            return orientation * ((bx - ax) * (point[1] - ay) - (by - ay) * (point[0] - ax)) >= 0

        def crossing(p, q, ax=ax, ay=ay, bx=bx, by=by):
            # Intersection of segment p-q with the infinite line a-b.
            side_p = (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax)
            side_q = (bx - ax) * (q[1] - ay) - (by - ay) * (q[0] - ax)
            t = side_p / (side_p - side_q)
            return (p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1]))

        points, output = output, []
        for index, current in enumerate(points):
            previous = points[index - 1]
            if inside(current):
                if not inside(previous):
                    output.append(crossing(previous, current))
                output.append(current)
            elif inside(previous):
                output.append(crossing(previous, current))
        if not output:
            break
    return output


def _reference_iou(box1: torch.Tensor, box2: torch.Tensor) -> float:
    polygon1 = [tuple(p) for p in le90_to_corners(box1).tolist()]
    polygon2 = [tuple(p) for p in le90_to_corners(box2).tolist()]
    overlap = _clip(polygon1, polygon2)
    inter = abs(_shoelace(overlap)) if len(overlap) >= 3 else 0.0
    union = abs(_shoelace(polygon1)) + abs(_shoelace(polygon2)) - inter
    return inter / union


def _reference_nms(boxes, scores, threshold, labels=None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep: list[int] = []
    for i in order:
        same_class = [k for k in keep if labels is None or int(labels[k]) == int(labels[i])]
        if all(_reference_iou(boxes[i], boxes[k]) <= threshold for k in same_class):
            keep.append(i)
    return keep


# --- conversions -------------------------------------------------------------------------------


def test_corners_follow_the_clockwise_le90_convention() -> None:
    # theta = +pi/6: the w side points along (cos, sin) = down-right on screen (y down).
    box = torch.tensor([10.0, 20.0, 4.0, 2.0, math.pi / 6], dtype=torch.float64)
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    frame = [(-2.0, -1.0), (2.0, -1.0), (2.0, 1.0), (-2.0, 1.0)]  # tl, tr, br, bl before rotation
    expected = torch.tensor(
        [[10.0 + c * dx - s * dy, 20.0 + s * dx + c * dy] for dx, dy in frame], dtype=torch.float64
    )
    torch.testing.assert_close(le90_to_corners(box), expected)
    torch.testing.assert_close(le90_to_polygon(box[None]), expected.reshape(1, 8))


def test_normalise_le90_gives_the_canonical_form_of_the_same_rectangle() -> None:
    generator = torch.Generator().manual_seed(0)
    boxes = _random_le90(16, generator)
    # Scramble: swap sides (+pi/2) for half of them, then add whole turns of pi.
    swap = torch.arange(16) % 2 == 0
    scrambled = boxes.clone()
    scrambled[swap, 2], scrambled[swap, 3] = boxes[swap, 3], boxes[swap, 2]
    scrambled[swap, 4] += HALF_PI
    scrambled[:, 4] += math.pi * torch.randint(-3, 4, (16,), generator=generator).double()
    canonical = normalise_le90(scrambled)
    torch.testing.assert_close(canonical, boxes)
    assert bool((canonical[:, 2] >= canonical[:, 3]).all())
    assert bool((canonical[:, 4] >= -HALF_PI).all() and (canonical[:, 4] < HALF_PI).all())


def test_normalise_le90_edges_of_the_angle_range() -> None:
    boxes = torch.tensor(
        [[0, 0, 4, 2, HALF_PI], [0, 0, 4, 2, -HALF_PI], [0, 0, 2, 4, 0.0], [0, 0, 3, 3, 1.0]],
        dtype=torch.float64,
    )
    theta = normalise_le90(boxes)[:, 4]
    torch.testing.assert_close(theta, torch.tensor([-HALF_PI, -HALF_PI, -HALF_PI, 1.0]).double())
    # One ulp below -pi/2: the remainder rounds up to pi, which must not give theta = +pi/2.
    minus_half_pi = torch.tensor(-HALF_PI, dtype=torch.float64)
    theta = torch.nextafter(minus_half_pi, minus_half_pi - 1)
    just_below = torch.tensor([[0.0, 0.0, 4.0, 2.0, theta]], dtype=torch.float64)
    assert normalise_le90(just_below)[0, 4] == pytest.approx(-HALF_PI)


def test_corners_to_le90_inverts_le90_to_corners_for_any_point_order() -> None:
    boxes = _random_le90(12, torch.Generator().manual_seed(1))
    corners = le90_to_corners(boxes)
    torch.testing.assert_close(corners_to_le90(corners), boxes)
    torch.testing.assert_close(corners_to_le90(corners.roll(1, dims=-2)), boxes)
    torch.testing.assert_close(corners_to_le90(corners[:, [0, 2, 1, 3]]), boxes)  # self-crossing
    torch.testing.assert_close(polygon_to_le90(le90_to_polygon(boxes)), boxes)
    assert corners_to_le90(corners.float().reshape(3, 4, 4, 2)).shape == (3, 4, 5)


def test_min_area_rectangle_of_a_quadrilateral_matches_an_angle_scan() -> None:
    generator = torch.Generator().manual_seed(2)
    quads = le90_to_corners(_random_le90(6, generator)) + torch.randn(
        6, 4, 2, generator=generator, dtype=torch.float64
    ) * 0.4  # a hand-labelled, only roughly rectangular quadrilateral
    boxes = corners_to_le90(quads)
    angles = torch.linspace(-HALF_PI, HALF_PI, 20001, dtype=torch.float64)
    direction = torch.stack([angles.cos(), angles.sin()], dim=1)  # (A, 2)
    normal = torch.stack([-angles.sin(), angles.cos()], dim=1)
    for quad, box in zip(quads, boxes):
        along, across = quad @ direction.T, quad @ normal.T  # (4, A)
        scan_area = (along.amax(0) - along.amin(0)) * (across.amax(0) - across.amin(0))
        assert box[2] * box[3] <= scan_area.min() + 1e-9
        assert box[2] * box[3] >= scan_area.min() - 1e-3  # the scan's angular resolution
        # Every point lies inside the returned rectangle.
        local = (quad - box[:2]) @ torch.stack(
            [torch.stack([box[4].cos(), box[4].sin()]), torch.stack([-box[4].sin(), box[4].cos()])]
        ).T
        assert bool((local.abs() <= box[2:4] / 2 + 1e-9).all())


def test_min_area_rectangle_agrees_with_opencv_when_installed() -> None:
    cv2 = pytest.importorskip("cv2")
    quads = le90_to_corners(_random_le90(5, torch.Generator().manual_seed(3), spread=100.0))
    quads = quads + torch.tensor([[0.3, -0.2], [0.0, 0.4], [-0.3, 0.1], [0.2, 0.0]]).double()
    for quad, box in zip(quads, corners_to_le90(quads)):
        # Areas only: two rectangles can be within float32 rounding of the minimum (seed 3 has
        # one), and OpenCV, in float32, may return the other.
        _, (w, h), _ = cv2.minAreaRect(quad.float().numpy())
        assert box[2] * box[3] == pytest.approx(w * h, rel=1e-5)


def test_degenerate_points() -> None:
    same = torch.tensor([[[2.0, 3.0]] * 4])
    torch.testing.assert_close(corners_to_le90(same), torch.tensor([[2.0, 3.0, 0.0, 0.0, 0.0]]))
    line = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    box = corners_to_le90(line)[0]
    torch.testing.assert_close(box, torch.tensor([1.5, 1.5, 3 * math.sqrt(2), 0.0, math.pi / 4]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: normalise_le90(torch.zeros(2, 4)), r"boxes: expected shape \(\.\.\., 5\)"),
        (lambda: corners_to_le90(torch.zeros(2, 8)), r"corners: expected shape \(\.\.\., 4, 2\)"),
        (lambda: polygon_to_le90(torch.zeros(2, 4, 2)), r"polygons: expected shape \(\.\.\., 8\)"),
        (lambda: le90_to_corners(torch.zeros(5, dtype=torch.long)), "boxes: expected a floating"),
    ],
)
def test_bad_input_names_the_argument(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- mmcv: rotated IoU and NMS -----------------------------------------------------------------


@pytest.fixture
def mmcv_ops():
    return pytest.importorskip("mmcv.ops", reason="mmcv with compiled ops is not installed")


def test_rotated_iou_matches_polygon_clipping(mmcv_ops) -> None:
    generator = torch.Generator().manual_seed(4)
    boxes1, boxes2 = _random_le90(5, generator), _random_le90(4, generator)
    iou = box_iou_rotated(boxes1, boxes2)
    assert iou.shape == (5, 4) and iou.dtype == torch.float64 and not iou.requires_grad
    expected = torch.tensor([[_reference_iou(a, b) for b in boxes2] for a in boxes1]).double()
    assert 0 < int((expected > 0).sum()) < expected.numel()
    torch.testing.assert_close(iou, expected, atol=2e-4, rtol=0)
    torch.testing.assert_close(
        box_iou_rotated(boxes1[:4], boxes2, aligned=True), expected[:4].diagonal(), atol=2e-4,
        rtol=0,
    )
    assert box_iou_rotated(boxes1, boxes2[:0]).shape == (5, 0)


def test_mmcv_angle_convention_is_our_le90(mmcv_ops) -> None:
    # A thin box along +30 degrees (clockwise on screen, y down) reaches a small box placed
    # down-right of it, but not its mirror image up-right: opposite conventions would swap them.
    thin = torch.tensor([[0.0, 0.0, 20.0, 1.0, math.pi / 6]])
    along = 8 * torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    down_right = torch.tensor([[along[0], along[1], 1.0, 1.0, 0.0]])
    up_right = torch.tensor([[along[0], -along[1], 1.0, 1.0, 0.0]])
    iou = box_iou_rotated(thin, torch.cat([down_right, up_right]))
    assert iou[0, 0] > 0.02 and iou[0, 1] == 0
    # Random boxes with different centres tell the two conventions apart as well.
    boxes = _random_le90(6, torch.Generator().manual_seed(5))
    mirrored = boxes * torch.tensor([1, 1, 1, 1, -1]).double()
    expected = torch.tensor([[_reference_iou(a, b) for b in boxes] for a in boxes]).double()
    torch.testing.assert_close(box_iou_rotated(boxes, boxes), expected, atol=2e-4, rtol=0)
    assert not torch.allclose(box_iou_rotated(mirrored, mirrored), expected, atol=1e-2)


@pytest.mark.parametrize("with_labels", [False, True])
def test_nms_rotated_matches_a_greedy_loop(mmcv_ops, with_labels: bool) -> None:
    generator = torch.Generator().manual_seed(6)
    boxes = _random_le90(12, generator, spread=10.0)
    scores = torch.rand(12, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (12,), generator=generator) if with_labels else None
    threshold = 0.2
    pairwise = torch.tensor([[_reference_iou(a, b) for b in boxes] for a in boxes])
    assert bool(((pairwise - threshold).abs() > 1e-3).all())  # no IoU on the knife's edge
    keep = nms_rotated(boxes, scores, threshold, labels=labels)
    assert keep.dtype == torch.long
    assert keep.tolist() == _reference_nms(boxes, scores, threshold, labels)
    assert 1 < len(keep) < 12  # the case suppresses something and keeps more than one box
    assert nms_rotated(boxes[:0], scores[:0], threshold).shape == (0,)


def test_missing_mmcv_raises_an_import_error_with_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mmcv", None)  # makes `import mmcv` raise ImportError
    boxes = torch.zeros(1, 5)
    with pytest.raises(ImportError, match="MMCV_WITH_OPS=1 pip install mmcv"):
        box_iou_rotated(boxes, boxes)
    with pytest.raises(ImportError, match="accord.boxes.nms_rotated needs mmcv"):
        nms_rotated(boxes, torch.ones(1), 0.5)
