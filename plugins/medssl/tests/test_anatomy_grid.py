"""Voxel <-> embedding-cell mapping and zero-padded crops."""

from __future__ import annotations

import itertools

import pytest
import torch

from accord.matchers import crop_affine
from accord_medssl.anatomy import cell_to_voxel, crop_with_zero_padding, embedding_grid_shape, voxel_to_cell


def all_indices(shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(list(itertools.product(*(range(size) for size in shape))))


@pytest.mark.parametrize(("volume_shape", "stride"), [((9, 8, 7), 2), ((17, 12, 9), (2, 4, 3)), ((5, 6, 7), 1)])
def test_round_trips(volume_shape: tuple[int, int, int], stride: int | tuple[int, int, int]) -> None:
    grid = embedding_grid_shape(volume_shape, stride)
    strides = torch.tensor(stride if isinstance(stride, tuple) else (stride,) * 3)
    assert grid == tuple((-(-torch.tensor(volume_shape) // strides)).tolist())
    cells = all_indices(grid)
    # cell -> voxel -> cell is the identity, including an overhanging last cell.
    assert torch.equal(voxel_to_cell(cell_to_voxel(cells, stride, volume_shape), stride, volume_shape), cells)
    # voxel -> cell -> voxel lands in the same cell, less than one stride away.
    voxels = all_indices(volume_shape)
    back = cell_to_voxel(voxel_to_cell(voxels, stride, volume_shape), stride, volume_shape)
    same_cell = torch.div(back, strides, rounding_mode="floor") == torch.div(voxels, strides, rounding_mode="floor")
    assert same_cell.all()
    assert ((back - voxels).abs() < strides).all()


def test_stride_two_values_and_agreement_with_crop_affine() -> None:
    points = torch.tensor([[0, 1, 2], [3, 4, 5], [7, 6, 0]])
    assert voxel_to_cell(points, 2, (8, 8, 8)).tolist() == [[0, 0, 1], [1, 2, 2], [3, 3, 0]]
    assert cell_to_voxel(torch.tensor([[0, 1, 3]]), 2, (8, 8, 8)).tolist() == [[1, 3, 7]]
    # The cell centre of crop_affine's geometry (stride 4 over a 4-cell grid) rounds to cell_to_voxel.
    affine = crop_affine(origin=(0, 0, 0), size=(16, 16, 16), grid_size=(4, 4, 4))
    cells = all_indices((4, 4, 4))
    centres = cells.double() @ affine[:3, :3].T + affine[:3, 3]
    assert torch.equal(torch.floor(centres + 0.5).long(), cell_to_voxel(cells, 4, (16, 16, 16)))


def test_bad_points_and_cells_raise() -> None:
    with pytest.raises(ValueError, match="points"):
        voxel_to_cell(torch.tensor([[8, 0, 0]]), 2, (8, 8, 8))
    with pytest.raises(ValueError, match="points"):
        voxel_to_cell(torch.tensor([[1.0, 0.0, 0.0]]), 2, (8, 8, 8))
    with pytest.raises(ValueError, match="points"):
        voxel_to_cell(torch.tensor([1, 2]), 2, (8, 8, 8))
    with pytest.raises(ValueError, match="cells"):
        cell_to_voxel(torch.tensor([[4, 0, 0]]), 2, (8, 8, 8))
    with pytest.raises(ValueError, match="stride"):
        voxel_to_cell(torch.tensor([[1, 0, 0]]), 0, (8, 8, 8))


def test_crop_is_zero_padded_at_the_borders() -> None:
    volume = torch.arange(1, 1 + 2 * 6 * 5 * 4, dtype=torch.float32).view(2, 6, 5, 4)
    inside = crop_with_zero_padding(volume, (1, 1, 1), (3, 3, 3))
    assert torch.equal(inside, volume[:, 1:4, 1:4, 1:4])
    border = crop_with_zero_padding(volume, (-2, 3, 2), (4, 4, 4))
    assert border.shape == (2, 4, 4, 4)
    assert torch.equal(border[:, 2:, :2, :2], volume[:, :2, 3:, 2:])
    assert border[:, :2].eq(0).all() and border[:, :, 2:].eq(0).all() and border[:, :, :, 2:].eq(0).all()
    assert crop_with_zero_padding(volume, (10, 0, 0), (3, 3, 3)).eq(0).all()
    with pytest.raises(ValueError, match="volume"):
        crop_with_zero_padding(volume[0], (0, 0, 0), (2, 2, 2))
