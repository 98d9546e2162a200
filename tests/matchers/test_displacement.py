"""Displacement-field (deformable registration) matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from accord.matchers import DisplacementFieldMatcher, MatchResult


def _pairs(result: MatchResult) -> set[tuple[int, int, int]]:
    assert result.batch is not None
    return set(zip(result.batch.tolist(), result.index_a.tolist(), result.index_b.tolist()))


def _constant_field(
    shift: tuple[float, ...], grid: tuple[int, ...], batch: int = 1
) -> torch.Tensor:
    return (
        torch.tensor(shift, dtype=torch.float32)
        .view(1, -1, *([1] * len(grid)))
        .expand(batch, -1, *grid)
        .clone()
    )


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("grid, shift", [((5, 6), (1, -2)), ((4, 5, 3), (-1, 0, 2))])
def test_constant_integer_shift(mode: str, grid: tuple[int, ...], shift: tuple[int, ...]) -> None:
    result = DisplacementFieldMatcher(mode=mode)(displacement=_constant_field(shift, grid))
    expected = set()
    for cell in itertools.product(*(range(s) for s in grid)):
        target = tuple(c + d for c, d in zip(cell, shift))
        if all(0 <= t < s for t, s in zip(target, grid)):
            expected.add(
                (0, int(np.ravel_multi_index(cell, grid)), int(np.ravel_multi_index(target, grid)))
            )
    assert _pairs(result) == expected
    assert torch.equal(result.weight, torch.ones(len(result)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_non_constant_mirror_field(ndim: int) -> None:
    grid = (4, 5, 3)[:ndim]
    width = grid[-1]
    # u(x) = (W - 1 - 2x) along the last axis sends x to W - 1 - x: a mirror.
    field = torch.zeros(2, ndim, *grid)
    field[:, -1] = (width - 1 - 2 * torch.arange(width, dtype=torch.float32)).expand(*grid)
    field[1, 0] = 1.0  # the second sample also moves one cell down axis 0
    result = DisplacementFieldMatcher()(displacement=field)
    expected = set()
    for sample in range(2):
        for cell in itertools.product(*(range(s) for s in grid)):
            target = (cell[0] + sample, *cell[1:-1], width - 1 - cell[-1])
            if target[0] < grid[0]:
                expected.add(
                    (
                        sample,
                        int(np.ravel_multi_index(cell, grid)),
                        int(np.ravel_multi_index(target, grid)),
                    )
                )
    assert _pairs(result) == expected


def test_nearest_rounds_to_the_containing_cell_and_drops_off_grid() -> None:
    field = _constant_field((0.0, 0.4), (1, 4))
    field[0, 1, 0, 3] = 0.5  # 3.5 is past the last cell's upper border (3.5 excluded)
    field[0, 1, 0, 0] = -0.5  # -0.5 is the first cell's lower border (included)
    result = DisplacementFieldMatcher()(displacement=field, grid_size_b=(1, 4))
    assert list(zip(result.index_a.tolist(), result.index_b.tolist())) == [(0, 0), (1, 1), (2, 2)]


def test_linear_half_voxel_shift_splits_weight() -> None:
    result = DisplacementFieldMatcher(mode="linear")(
        displacement=_constant_field((0.0, 0.5), (2, 3))
    )
    # Cells at column 2 land on 2.5, outside the hull [0, 2] of b's centres, and are dropped.
    assert sorted(
        zip(result.index_a.tolist(), result.index_b.tolist(), result.weight.tolist())
    ) == [
        (0, 0, 0.5),
        (0, 1, 0.5),
        (1, 1, 0.5),
        (1, 2, 0.5),
        (3, 3, 0.5),
        (3, 4, 0.5),
        (4, 4, 0.5),
        (4, 5, 0.5),
    ]


@pytest.mark.parametrize("grid", [(6, 7), (5, 4, 6)])
def test_linear_weights_interpolate_a_linear_function_exactly(grid: tuple[int, ...]) -> None:
    ndim = len(grid)
    field = (
        torch.rand(2, ndim, *grid, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        * 4
        - 2
    )
    result = DisplacementFieldMatcher(mode="linear")(displacement=field, grid_size_b=grid)
    # Multilinear interpolation reproduces f(p) = c . p + 1 at p = x + u(x).
    coefficients = torch.tensor([0.7, -1.3, 2.1][:ndim], dtype=torch.float64)
    cells = torch.stack(
        torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in grid), indexing="ij"), -1
    )
    f_b = (cells.reshape(-1, ndim) @ coefficients) + 1
    warped = cells.reshape(-1, ndim) + field.flatten(2).transpose(1, 2)  # (B, N, ndim)
    assert result.batch is not None
    interpolated = torch.zeros(2, cells.reshape(-1, ndim).shape[0], dtype=torch.float64)
    interpolated.index_put_(
        (result.batch, result.index_a),
        result.weight.double() * f_b[result.index_b],
        accumulate=True,
    )
    total = torch.zeros_like(interpolated).index_put_(
        (result.batch, result.index_a), result.weight.double(), accumulate=True
    )
    upper = torch.tensor(grid, dtype=torch.float64) - 1
    kept = ((warped >= 0) & (warped <= upper)).all(-1)
    assert torch.equal(total > 0, kept)
    assert torch.allclose(total[kept], torch.ones(int(kept.sum()), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(interpolated[kept], (warped @ coefficients + 1)[kept], atol=1e-5)


@pytest.mark.parametrize(
    "displacement, grid_size_b, name",
    [
        (torch.zeros(1, 3, 4, 4), None, r"displacement: expected shape \(B, 2, 4, 4\)"),
        (torch.zeros(1, 2, 4, 4, 4), None, r"displacement: expected shape \(B, 3, 4, 4, 4\)"),
        (torch.zeros(2, 4, 4), None, "displacement: expected a 4-D or 5-D"),
        (torch.zeros(0, 2, 4, 4), None, "displacement"),
        (torch.zeros(1, 2, 0, 4), None, "displacement"),
        (torch.full((1, 2, 3, 3), float("nan")), None, "displacement: contains"),
        (torch.zeros(1, 2, 3, 3, dtype=torch.long), None, "displacement"),
        (torch.zeros(1, 2, 3, 3), (3, 3, 3), "grid_size_b"),
    ],
)
def test_bad_input(
    displacement: torch.Tensor, grid_size_b: tuple[int, ...] | None, name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        DisplacementFieldMatcher()(displacement=displacement, grid_size_b=grid_size_b)


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        DisplacementFieldMatcher(mode="cubic")  # type: ignore[arg-type]
