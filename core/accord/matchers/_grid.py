"""Grid-coordinate helpers shared by the matchers.

Conventions used by every matcher:

* A grid of size ``(S_0, ..., S_{n-1})`` is listed in array-axis order (``(H, W)`` for an image,
  ``(D, H, W)`` or TorchIO's ``(W, H, D)`` for a volume: whatever the tensor's spatial dims are).
* A cell's *index coordinates* are its integer indices along the axes, so cell ``i`` has its centre
  at ``i`` and covers ``[i - 0.5, i + 0.5)``. This is the voxel convention of NIfTI / TorchIO /
  MONAI affines, so their voxel-to-world matrices can be used as they are.
* Flattened locations follow ``torch.flatten`` (C order): the last axis varies fastest.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from accord.utils.checks import check_finite, check_tensor

SPATIAL_RANKS = (2, 3)


def check_grid_size(value: Sequence[int], name: str, ndim: int | None = None) -> tuple[int, ...]:
    """Validate a grid size: 2 or 3 positive ints (exactly ``ndim`` if given)."""
    sizes = tuple(value) if isinstance(value, Sequence) else None
    allowed = (ndim,) if ndim is not None else SPATIAL_RANKS
    if (
        sizes is None
        or len(sizes) not in allowed
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
    ):
        want = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{name}: expected {want} positive ints, got {value!r}")
    return sizes


def check_positive_int(value: int, name: str) -> int:
    """Require a strictly positive ``int`` (chunk sizes, counts)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_matrices(value: object, name: str, rows: int, cols: int) -> tuple[torch.Tensor, bool]:
    """Validate a ``(rows, cols)`` or ``(V, rows, cols)`` finite float matrix argument.

    Returns:
        The matrices as a float64 ``(V, rows, cols)`` tensor and whether the input had the
        leading ``V`` dimension.
    """
    matrix = check_tensor(value, name)
    if matrix.ndim not in (2, 3) or tuple(matrix.shape[-2:]) != (rows, cols) or matrix.numel() == 0:
        raise ValueError(
            f"{name}: expected shape ({rows}, {cols}) or (V, {rows}, {cols}), "
            f"got {tuple(matrix.shape)}"
        )
    check_finite(matrix, name)
    batched = matrix.ndim == 3
    return (matrix if batched else matrix.unsqueeze(0)).to(torch.float64), batched


def cell_coordinates(
    grid_size: Sequence[int], dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """Index coordinates of every cell, in flattened order.

    Shape:
        Output: ``(prod(grid_size), len(grid_size))``.
    """
    axes = [torch.arange(size, dtype=dtype, device=device) for size in grid_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid_size))


def ravel_index(cells: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """Flattened (C-order) index of integer cell coordinates.

    Shape:
        cells: ``(..., ndim)`` integer; output: ``(...)`` long.
    """
    flat = torch.zeros(cells.shape[:-1], dtype=torch.long, device=cells.device)
    for axis, size in enumerate(grid_size):
        flat = flat * size + cells[..., axis].long()
    return flat


def nearest_cell(
    positions: torch.Tensor, grid_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell containing each position (ties at a cell border go to the upper cell).

    Args:
        positions: index coordinates.
        grid_size: the grid the positions are expressed in.

    Returns:
        ``(flat_index, inside)``: the flattened cell index (meaningless where ``inside`` is
        ``False``) and whether the position lies on the grid, i.e. in ``[-0.5, S - 0.5)`` on
        every axis.

    Shape:
        positions: ``(..., ndim)``; outputs: ``(...)``.
    """
    # floor(x + 0.5) rather than torch.round, which rounds half to even and would make the
    # cell of a point on a border depend on the parity of the index.
    cells = torch.floor(positions + 0.5)
    upper = torch.tensor(grid_size, dtype=positions.dtype, device=positions.device)
    inside = ((cells >= 0) & (cells < upper)).all(dim=-1)
    cells = torch.where(inside.unsqueeze(-1), cells, torch.zeros_like(cells))
    return ravel_index(cells, grid_size), inside


def multilinear_neighbours(
    positions: torch.Tensor, grid_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multilinear (bilinear / trilinear) interpolation weights of each position.

    Positions outside the hull of the cell centres (``[0, S - 1]`` on some axis) are dropped, and
    so are neighbours whose weight is exactly zero, so every returned index is on the grid.

    Args:
        positions: index coordinates.
        grid_size: the grid the positions are expressed in.

    Returns:
        ``(position_index, flat_index, weight)``: for every kept (position, neighbour) pair, the
        row of ``positions``, the flattened neighbour cell and its weight. The weights of one
        kept position sum to 1.

    Shape:
        positions: ``(M, ndim)``; outputs: ``(Q,)`` with ``Q <= M * 2**ndim``.
    """
    ndim = len(grid_size)
    upper = torch.tensor(grid_size, dtype=positions.dtype, device=positions.device) - 1
    kept = ((positions >= 0) & (positions <= upper)).all(dim=-1).nonzero().squeeze(-1)
    low = torch.floor(positions[kept])
    frac = positions[kept] - low
    corners = cell_coordinates((2,) * ndim, dtype=positions.dtype, device=positions.device)
    # (M, 2**ndim, ndim): per corner, the weight factor along each axis is frac or 1 - frac.
    factors = torch.where(corners.bool(), frac.unsqueeze(1), 1 - frac.unsqueeze(1))
    weight = factors.prod(dim=-1)
    cells = low.unsqueeze(1) + corners
    nonzero = weight > 0
    position_index = kept.unsqueeze(1).expand_as(weight)[nonzero]
    return position_index, ravel_index(cells[nonzero], grid_size), weight[nonzero]


def resize_scale(
    grid_size: Sequence[int], image_size: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Cells per pixel along each axis of a feature grid that covers a whole image.

    Shape:
        Output: ``(ndim,)`` float64.
    """
    grid = torch.tensor(grid_size, dtype=torch.float64, device=device)
    return grid / torch.tensor(image_size, dtype=torch.float64, device=device)


def transform_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply a homogeneous matrix to points: ``matrix @ [points; 1]`` (no perspective division).

    Shape:
        matrix: ``(..., R, ndim + 1)``; points: ``(..., N, ndim)``; output: ``(..., N, R)``.
    """
    linear, offset = matrix[..., :-1], matrix[..., -1]
    return points @ linear.transpose(-1, -2) + offset.unsqueeze(-2)


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_size`` rows, to bound pairwise-matrix memory."""
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))
