"""Geometric crop-overlap matching from crop affines: exact recovery of hand-built geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from accord.matchers import CropOverlapMatcher, MatchResult, crop_affine


def _pairs(result: MatchResult) -> set[tuple[int, ...]]:
    columns = (
        [result.index_a, result.index_b]
        if result.batch is None
        else [result.batch, result.index_a, result.index_b]
    )
    return set(zip(*(column.tolist() for column in columns)))


def _flat(cell: tuple[int, ...], grid: tuple[int, ...]) -> int:
    return int(np.ravel_multi_index(cell, grid))


def _cells(grid: tuple[int, ...]) -> itertools.product:
    return itertools.product(*(range(size) for size in grid))


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_affine_maps_cell_centres_to_source_voxels(ndim: int) -> None:
    origin, size, grid = (3,) * ndim, (8,) * ndim, (4,) * ndim
    affine = crop_affine(origin, size, grid, flip=(ndim - 1,))
    assert affine.shape == (ndim + 1, ndim + 1) and affine.dtype == torch.float64
    # Coarse cell 0 averages source voxels 3 and 4; flipped, it is the last two voxels, 9 and 10.
    first = (affine @ torch.tensor([0.0] * ndim + [1.0], dtype=torch.float64))[:ndim]
    assert first.tolist() == [3.5] * (ndim - 1) + [9.5]
    batched = crop_affine(
        torch.tensor([origin, (0,) * ndim]), size, grid, flip=torch.tensor([[False] * ndim] * 2)
    )
    assert batched.shape == (2, ndim + 1, ndim + 1)
    assert torch.equal(batched[0], crop_affine(origin, size, grid))


@pytest.mark.parametrize("mode", ["nearest", "threshold"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_shifted_crops(mode: str, ndim: int) -> None:
    grid = (5, 6, 4)[:ndim]
    origin_a, origin_b = (2, 3, 1)[:ndim], (4, 1, 1)[:ndim]
    matcher = CropOverlapMatcher(mode=mode, pos_ratio=0.5)
    result = matcher(
        affine_a=crop_affine(origin_a, grid, grid),
        affine_b=crop_affine(origin_b, grid, grid),
        grid_size_a=grid,
    )
    expected = set()
    for cell in _cells(grid):
        other = tuple(c + oa - ob for c, oa, ob in zip(cell, origin_a, origin_b))
        if all(0 <= o < s for o, s in zip(other, grid)):
            expected.add((_flat(cell, grid), _flat(other, grid)))
    assert expected and _pairs(result) == expected
    assert result.batch is None and torch.equal(result.weight, torch.ones(len(result)))


@pytest.mark.parametrize("mode", ["nearest", "threshold"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_flipped_crop(mode: str, ndim: int) -> None:
    grid, origin, axis = (4, 5, 3)[:ndim], (1, 2, 0)[:ndim], 1
    # 0.5 diagonals stays under the distance 1 to a neighbouring cell in 2D and 3D.
    result = CropOverlapMatcher(mode=mode, pos_ratio=0.5)(
        affine_a=crop_affine(origin, grid, grid),
        affine_b=crop_affine(origin, grid, grid, flip=(axis,)),
        grid_size_a=grid,
    )
    expected = set()
    for cell in _cells(grid):
        mirrored = tuple(grid[axis] - 1 - c if i == axis else c for i, c in enumerate(cell))
        expected.add((_flat(cell, grid), _flat(mirrored, grid)))
    assert _pairs(result) == expected


@pytest.mark.parametrize("ndim", [2, 3])
def test_two_times_scaled_crop(ndim: int) -> None:
    origin, size = (2,) * ndim, (8,) * ndim
    fine, coarse = (8,) * ndim, (4,) * ndim
    affine_fine, affine_coarse = crop_affine(origin, size, fine), crop_affine(origin, size, coarse)

    nearest = CropOverlapMatcher(mode="nearest")(
        affine_a=affine_fine, affine_b=affine_coarse, grid_size_a=fine, grid_size_b=coarse
    )
    assert _pairs(nearest) == {
        (_flat(c, fine), _flat(tuple(x // 2 for x in c), coarse)) for c in _cells(fine)
    }

    # Each coarse cell centre is 0.5 * sqrt(ndim) from its 2**ndim children, and farther from
    # every other fine centre than 0.4 times the coarse diagonal 2 * sqrt(ndim).
    threshold = CropOverlapMatcher(mode="threshold", pos_ratio=0.4, chunk_size=5)(
        affine_a=affine_coarse, affine_b=affine_fine, grid_size_a=coarse, grid_size_b=fine
    )
    expected = {
        (_flat(c, coarse), _flat(tuple(2 * x + o for x, o in zip(c, offset)), fine))
        for c in _cells(coarse)
        for offset in itertools.product((0, 1), repeat=ndim)
    }
    assert _pairs(threshold) == expected


@pytest.mark.parametrize("mode", ["nearest", "threshold"])
def test_rotated_view_affine(mode: str) -> None:
    size = 5
    # View b is view a turned by 90 degrees: b cell (i, j) sits at source (j, size - 1 - i).
    rotated = torch.tensor(
        [[0.0, 1.0, 0.0], [-1.0, 0.0, size - 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    result = CropOverlapMatcher(mode=mode, pos_ratio=0.5)(
        affine_a=torch.eye(3), affine_b=rotated, grid_size_a=(size, size)
    )
    grid = (size, size)
    assert _pairs(result) == {
        (_flat((p, q), grid), _flat((size - 1 - q, p), grid)) for p, q in _cells(grid)
    }


def test_batched_affines_match_per_sample_and_broadcast() -> None:
    grid = (4, 4)
    affine_a = crop_affine(torch.tensor([[0.0, 0.0], [1.0, 2.0]]), (4, 4), grid)
    affine_b = crop_affine((1, 1), (4, 4), grid)  # shared by both samples
    matcher = CropOverlapMatcher(mode="nearest")
    result = matcher(affine_a=affine_a, affine_b=affine_b, grid_size_a=grid)
    expected = set()
    for sample in range(2):
        single = matcher(affine_a=affine_a[sample], affine_b=affine_b, grid_size_a=grid)
        expected |= {(sample, a, b) for a, b in _pairs(single)}
    assert _pairs(result) == expected


def test_disjoint_crops_give_no_pairs() -> None:
    grid = (3, 3)
    for mode in ("nearest", "threshold"):
        result = CropOverlapMatcher(mode=mode)(
            affine_a=crop_affine((0, 0), grid, grid),
            affine_b=crop_affine((10, 10), grid, grid),
            grid_size_a=grid,
        )
        assert len(result) == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (
            {"affine_a": torch.eye(3), "affine_b": torch.eye(4), "grid_size_a": (2, 2, 2)},
            r"affine_a: expected shape \(4, 4\)",
        ),
        (
            {"affine_a": torch.eye(4), "affine_b": torch.eye(3), "grid_size_a": (2, 2, 2)},
            r"affine_b: expected shape \(4, 4\)",
        ),
        (
            {"affine_a": torch.eye(3)[:2], "affine_b": torch.eye(3), "grid_size_a": (2, 2)},
            "affine_a",
        ),
        (
            {"affine_a": torch.ones(3, 3), "affine_b": torch.eye(3), "grid_size_a": (2, 2)},
            "affine_a: expected a homogeneous",
        ),
        (
            {
                "affine_a": torch.eye(3),
                "affine_b": torch.diag(torch.tensor([1.0, 0.0, 1.0])),
                "grid_size_a": (2, 2),
            },
            "affine_b: the affine is singular",
        ),
        (
            {
                "affine_a": torch.full((3, 3), float("nan")),
                "affine_b": torch.eye(3),
                "grid_size_a": (2, 2),
            },
            "affine_a: contains",
        ),
        (
            {
                "affine_a": torch.eye(3).expand(2, 3, 3),
                "affine_b": torch.eye(3).expand(3, 3, 3),
                "grid_size_a": (2, 2),
            },
            "affine_b: expected batch size 2",
        ),
        (
            {"affine_a": torch.zeros(0, 3, 3), "affine_b": torch.eye(3), "grid_size_a": (2, 2)},
            "affine_a",
        ),
        (
            {"affine_a": torch.eye(3), "affine_b": torch.eye(3), "grid_size_a": (2, 0)},
            "grid_size_a",
        ),
        ({"affine_a": torch.eye(2), "affine_b": torch.eye(2), "grid_size_a": (4,)}, "grid_size_a"),
        (
            {
                "affine_a": torch.eye(3),
                "affine_b": torch.eye(3),
                "grid_size_a": (2, 2),
                "grid_size_b": (2, 2, 2),
            },
            "grid_size_b",
        ),
    ],
)
def test_bad_geometry(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CropOverlapMatcher()(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (
            {"origin": (0, 0, 0), "size": (4, 4), "grid_size": (2, 2)},
            r"origin: expected shape \(2,\)",
        ),
        ({"origin": (0, 0), "size": (4, -1), "grid_size": (2, 2)}, "size"),
        ({"origin": (0, float("nan")), "size": (4, 4), "grid_size": (2, 2)}, "origin: contains"),
        ({"origin": (0, 0), "size": (4, 4), "grid_size": (2, 2), "flip": (2,)}, "flip"),
        (
            {
                "origin": (0, 0),
                "size": (4, 4),
                "grid_size": (2, 2),
                "flip": torch.ones(3, dtype=torch.bool),
            },
            "flip",
        ),
        (
            {"origin": torch.zeros(2, 2), "size": torch.ones(3, 2), "grid_size": (2, 2)},
            "batch sizes differ",
        ),
        ({"origin": (0, 0), "size": (4, 4), "grid_size": (2, 2.5)}, "grid_size"),
    ],
)
def test_crop_affine_bad_input(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        crop_affine(**kwargs)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="mode"):
        CropOverlapMatcher(mode="closest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pos_ratio"):
        CropOverlapMatcher(pos_ratio=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        CropOverlapMatcher(chunk_size=0)
