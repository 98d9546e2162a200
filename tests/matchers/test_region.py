"""Box/region pooling membership."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from accord.matchers import MatchResult, RegionMatcher, pool_regions


def _reference_centre_membership(
    boxes: torch.Tensor, image: tuple[int, ...], grid: tuple[int, ...]
) -> tuple[dict[int, set[int]], set[int]]:
    """Loop over boxes and cells: centres inside the box, else the cell holding the box centre.

    Returns the members of each box and the boxes that needed the fallback.
    """
    ndim = len(grid)
    members: dict[int, set[int]] = {}
    fallback: set[int] = set()
    for k, box in enumerate(boxes.tolist()):
        low, high = box[:ndim][::-1], box[ndim:][::-1]  # x is the last array axis
        cells = set()
        for cell in itertools.product(*(range(s) for s in grid)):
            centre = [(c + 0.5) * i / g for c, i, g in zip(cell, image, grid)]  # image coordinates
            if all(lo <= x < hi for x, lo, hi in zip(centre, low, high)):
                cells.add(int(np.ravel_multi_index(cell, grid)))
        if not cells:
            middle = [
                int(np.floor((lo + hi) / 2 * g / i)) for lo, hi, i, g in zip(low, high, image, grid)
            ]
            if all(0 <= m < g for m, g in zip(middle, grid)):
                cells.add(int(np.ravel_multi_index(middle, grid)))
                fallback.add(k)
        members[k] = cells
    return members, fallback


def _random_boxes(count: int, image: tuple[int, ...], seed: int) -> torch.Tensor:
    """Boxes of all sizes, some tiny, some hanging off the image (x first)."""
    generator = torch.Generator().manual_seed(seed)
    extent = torch.tensor(image[::-1], dtype=torch.float32)
    corner = torch.rand(count, len(image), generator=generator) * extent * 1.2 - 0.1 * extent
    size = torch.rand(count, len(image), generator=generator) ** 3 * extent * 0.7
    return torch.cat([corner, corner + size], dim=1)


@pytest.mark.parametrize(
    "image, grid", [((32, 48), (8, 12)), ((32, 48), (32, 48)), ((16, 24, 20), (4, 6, 5))]
)
def test_centre_membership_matches_loop_reference(
    image: tuple[int, ...], grid: tuple[int, ...]
) -> None:
    boxes = _random_boxes(40, image, seed=len(grid))
    boxes[0] = torch.tensor([-30.0] * len(grid) + [-20.0] * len(grid))  # entirely off the image
    result = RegionMatcher()(boxes=boxes, image_size=image, feature_size=grid)
    reference, fallback = _reference_centre_membership(boxes, image, grid)
    got: dict[int, set[int]] = {k: set() for k in range(len(boxes))}
    for k, j in zip(result.index_a.tolist(), result.index_b.tolist()):
        got[k].add(j)
    assert got == reference and not got[0]
    assert fallback or grid == image  # at feature stride > 1, some boxes hold no cell centre
    counts = torch.bincount(result.index_a, minlength=len(boxes)).float()
    assert torch.allclose(result.weight, 1.0 / counts[result.index_a])


def test_pool_regions_averages_member_cells_per_image() -> None:
    boxes = torch.tensor([[0.0, 0.0, 8.0, 4.0], [4.0, 4.0, 8.0, 8.0]])
    result = RegionMatcher()(
        boxes=boxes, image_size=(8, 8), feature_size=(4, 4), box_batch=torch.tensor([1, 0])
    )
    assert result.batch is not None and result.batch.tolist() == [1] * 8 + [0] * 4
    features = torch.randn(2, 4, 4, 3)
    pooled = pool_regions(result, features.flatten(1, 2), num_regions=2)
    assert torch.allclose(pooled[0], features[1, :2, :].mean(dim=(0, 1)))
    assert torch.allclose(pooled[1], features[0, 2:, 2:].mean(dim=(0, 1)))


@pytest.mark.parametrize("image, grid", [((32, 48), (8, 12)), ((16, 24, 20), (8, 6, 10))])
def test_bilinear_pooling_of_a_linear_map_gives_the_box_centre_value(
    image: tuple[int, ...], grid: tuple[int, ...]
) -> None:
    ndim = len(grid)
    scale = torch.tensor(grid, dtype=torch.float64) / torch.tensor(image, dtype=torch.float64)
    # Boxes whose sample points stay between the first and last cell centres (no clamping).
    generator = torch.Generator().manual_seed(3)
    extent = torch.tensor(image[::-1], dtype=torch.float64)
    margin = (0.5 / scale).flip(0)
    low = margin + torch.rand(20, ndim, generator=generator, dtype=torch.float64) * (
        extent / 2 - margin
    )
    high = low + torch.rand(20, ndim, generator=generator, dtype=torch.float64) * (
        extent / 2 - margin
    )
    boxes = torch.cat([low, high], dim=1)
    result = RegionMatcher(mode="bilinear", samples_per_axis=3)(
        boxes=boxes, image_size=image, feature_size=grid
    )

    coefficients = torch.tensor([0.5, -2.0, 1.5][:ndim], dtype=torch.float64)
    cells = torch.stack(
        torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in grid), indexing="ij"), -1
    )
    ramp = (cells.reshape(-1, ndim) @ coefficients + 3).unsqueeze(-1)  # (N, 1)
    pooled = pool_regions(result, ramp, num_regions=20).squeeze(-1)
    centre_cells = (low + high).flip(-1) / 2 * scale - 0.5  # box centre in cell index coordinates
    assert torch.allclose(pooled, centre_cells @ coefficients + 3, atol=1e-5)
    assert torch.allclose(
        torch.bincount(result.index_a, weights=result.weight.double()),
        torch.ones(20, dtype=torch.float64),
    )
    assert len(set(zip(result.index_a.tolist(), result.index_b.tolist()))) == len(
        result
    )  # merged duplicates


def test_bilinear_clamps_boxes_hanging_off_the_map() -> None:
    result = RegionMatcher(mode="bilinear")(
        boxes=torch.tensor([[-20.0, -20.0, 2.0, 2.0]]), image_size=(8, 8)
    )
    assert result.index_b.tolist() == [0] and result.weight.tolist() == [1.0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"boxes": torch.zeros(3, 5)}, r"boxes: expected shape \(K, 4\) or \(K, 6\)"),
        ({"boxes": torch.zeros(0, 4)}, "boxes"),
        ({"boxes": torch.zeros(4)}, "boxes"),
        ({"boxes": torch.tensor([[0.0, 0.0, float("nan"), 1.0]])}, "boxes: contains"),
        ({"boxes": torch.tensor([[4.0, 0.0, 2.0, 1.0]])}, "boxes: expected x2 >= x1"),
        ({"boxes": torch.zeros(2, 6)}, "image_size"),
        ({"boxes": torch.zeros(2, 4), "feature_size": (4,)}, "feature_size"),
        ({"boxes": torch.zeros(2, 4), "box_batch": torch.zeros(3, dtype=torch.long)}, "box_batch"),
        ({"boxes": torch.zeros(2, 4), "box_batch": torch.zeros(2)}, "box_batch"),
        ({"boxes": torch.zeros(2, 4), "box_batch": torch.tensor([0, -1])}, "box_batch"),
    ],
)
def test_bad_input(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RegionMatcher()(**{"image_size": (8, 8), **kwargs})


def test_bad_options_and_pooling_input() -> None:
    with pytest.raises(ValueError, match="mode"):
        RegionMatcher(mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="samples_per_axis"):
        RegionMatcher(samples_per_axis=0)
    second_region = MatchResult(torch.tensor([1]), torch.tensor([0]), torch.ones(1))
    with pytest.raises(ValueError, match="match.index_a"):
        pool_regions(second_region, torch.randn(64, 2), num_regions=1)
    with pytest.raises(ValueError, match="num_regions"):
        pool_regions(second_region, torch.randn(64, 2), num_regions=0)
