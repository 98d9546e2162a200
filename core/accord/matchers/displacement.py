"""Correspondences from a dense displacement field (deformable registration, GEMINI), 2D and 3D."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from accord.utils.checks import check_finite, check_tensor
from accord.matchers._grid import (
    cell_coordinates,
    check_grid_size,
    multilinear_neighbours,
    nearest_cell,
)
from accord.matchers.base import Matcher, MatchResult

WarpMode = Literal["nearest", "linear"]


class DisplacementFieldMatcher(Matcher):
    """Pair each location of view a with where a displacement field sends it in view b.

    Convention: the field lives on a's grid, in voxel units, channel ``i`` displacing array axis
    ``i``; location ``x`` of a corresponds to position ``x + u(x)`` of b (index coordinates,
    voxel ``i`` centred at ``i``). GEMINI's ``phi_AB`` lives on B's grid and warps A by sampling
    ``A(x + phi_AB(x))``, so it is passed with view a = B and view b = A. Check the channel order of
    a field from elsewhere: MONAI's ``Warp`` / ``DVF2DDF`` use this order; ``F.grid_sample`` grids
    use the reverse (x = last axis) and normalised units.

    * ``mode="nearest"``: the b-cell containing ``x + u(x)``, weight 1. Locations warped off b's
      grid (outside ``[-0.5, S - 0.5)`` on some axis) are dropped.
    * ``mode="linear"``: the ``2**ndim`` neighbouring b-cells with bilinear / trilinear weights
      summing to 1 per location (zero-weight neighbours omitted). Locations warped outside the
      hull of b's cell centres (``[0, S - 1]``) are dropped, since interpolation is undefined there.

    Args:
        mode: ``"nearest"`` or ``"linear"``.

    Reference:
        He et al., GEMINI (T-PAMI 2025, arXiv 2502.05282), the successor of GVSL (CVPR 2023).
    """

    def __init__(self, mode: WarpMode = "nearest") -> None:
        if mode not in ("nearest", "linear"):
            raise ValueError(f"mode: expected 'nearest' or 'linear', got {mode!r}")
        self.mode = mode

    def match(
        self, displacement: torch.Tensor, grid_size_b: Sequence[int] | None = None
    ) -> MatchResult:
        """Warp a's grid into b's.

        Args:
            displacement: the field ``u`` on a's grid, voxel units.
            grid_size_b: view b's grid; defaults to a's spatial size.

        Returns:
            Pairs (a location, b location) with ``batch`` set; weights as described above.

        Shape:
            displacement: ``(B, 2, H, W)`` or ``(B, 3, D, H, W)`` (generally
            ``(B, ndim, *spatial)`` with ``len(spatial) == ndim``).
        """
        check_tensor(displacement, "displacement", ndim=(4, 5), floating=True)
        grid_a = tuple(displacement.shape[2:])
        ndim = len(grid_a)
        if displacement.shape[1] != ndim or displacement.numel() == 0:
            raise ValueError(
                f"displacement: expected shape (B, {ndim}, {', '.join(map(str, grid_a))}): one "
                f"channel per spatial axis and a non-empty grid, got {tuple(displacement.shape)}"
            )
        check_finite(displacement, "displacement")
        grid_b = (
            grid_a if grid_size_b is None else check_grid_size(grid_size_b, "grid_size_b", ndim)
        )

        dtype = torch.promote_types(displacement.dtype, torch.float32)
        cells = cell_coordinates(grid_a, dtype, displacement.device)
        positions = cells + displacement.to(dtype).flatten(2).transpose(1, 2)  # (B, Na, ndim)
        num_a = cells.shape[0]
        if self.mode == "nearest":
            flat_b, inside = nearest_cell(positions, grid_b)
            batch, index_a = inside.nonzero().unbind(dim=1)
            index_b = flat_b[batch, index_a]
            weight = torch.ones(index_a.shape, device=displacement.device)
        else:
            row, index_b, weight = multilinear_neighbours(positions.reshape(-1, ndim), grid_b)
            batch, index_a = row // num_a, row % num_a
        return MatchResult(index_a, index_b, weight.to(torch.get_default_dtype()), batch)
