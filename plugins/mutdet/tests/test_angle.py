"""AR-CSL angle coder: round trip, peak, aspect-ratio shape, circularity."""

import math

import pytest
import torch

from accord_mutdet.angle import NUM_BINS, ARCSLCoder, aspect_ratio, aspect_ratio_weight


@pytest.fixture(scope="module")
def coder():
    return ARCSLCoder()


def test_round_trip_within_half_a_degree(coder):
    angles = torch.linspace(-math.pi / 2, math.pi / 2 - 1e-3, 37)
    ratios = torch.linspace(1.2, 6.0, 37)
    decoded = coder.decode(coder.encode(angles, ratios))
    assert (decoded - angles).abs().max() <= math.radians(0.5) + 1e-6


def test_soft_label_peaks_at_the_angle_bin_and_falls_off(coder):
    angles = torch.tensor([math.radians(-89.5), math.radians(10.2), math.radians(89.9)])
    target = coder.encode(angles, torch.tensor([3.0, 3.0, 3.0]))
    bins = torch.tensor([0, 100, 179])
    assert torch.equal(target.argmax(1), bins)
    assert torch.allclose(target[torch.arange(3), bins], torch.ones(3))
    assert target.min() >= 0 and target.max() <= 1
    # circular: bin 0's neighbours are bin 1 and bin 179, equal by symmetry
    assert torch.isclose(target[0, 1], target[0, 179])
    # monotone decrease over the first 30 degrees away from the peak (thin box: one clear mode)
    row = target[1, 100:130]
    assert (row[1:] < row[:-1]).all()


def test_smoothing_is_the_normalised_iou_of_rotated_copies(coder):
    from shapely.geometry import Polygon

    from accord.boxes import le90_to_corners

    ratio = 2.5
    values = coder.smoothing(torch.tensor([ratio]))[0]
    base = torch.tensor([0.0, 0.0, ratio, 1.0, 0.0])
    ious = []
    for d in range(-90, 90):
        turned = base.clone()
        turned[4] = math.radians(d)
        a, b = (Polygon(le90_to_corners(x).tolist()) for x in (base, turned))
        ious.append(a.intersection(b).area / a.union(b).area)
    ious = torch.tensor(ious)
    expected = (ious - ious.min()) / (1 - ious.min())
    assert torch.allclose(values, expected.float(), atol=1e-4)


def test_thin_boxes_have_sharper_labels(coder):
    values = coder.smoothing(torch.tensor([1.5, 8.0]))
    # ten degrees away the thin box's label has dropped further
    assert values[1, 80] < values[0, 80]


def test_aspect_ratio_weight_and_errors(coder):
    boxes = torch.tensor([[0.0, 0, 4, 2, 0], [0, 0, 1, 3, 0.3]])
    assert torch.allclose(aspect_ratio(boxes), torch.tensor([2.0, 3.0]))
    assert torch.allclose(aspect_ratio_weight(boxes), torch.tensor([4 / 3, 1.5]))
    with pytest.raises(ValueError, match="side lengths"):
        aspect_ratio(torch.tensor([[0.0, 0, 0, 2, 0]]))
    with pytest.raises(ValueError, match="bins"):
        coder.decode(torch.zeros(2, 10))
    assert coder.encode(torch.zeros(0), torch.zeros(0)).shape == (0, NUM_BINS)
