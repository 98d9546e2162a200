"""Geometric matching of overlapping crops (PixPro-style), 2D and 3D, from recorded transforms."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from accord.utils.checks import check_finite, check_positive, check_tensor
from accord.matchers._grid import (
    cell_coordinates,
    check_grid_size,
    check_matrices,
    check_positive_int,
    nearest_cell,
    row_chunks,
    transform_points,
)
from accord.matchers.base import Matcher, MatchResult

OverlapMode = Literal["threshold", "nearest"]


def crop_affine(
    origin: Sequence[float] | torch.Tensor,
    size: Sequence[float] | torch.Tensor,
    grid_size: Sequence[int],
    flip: Sequence[int] | torch.Tensor = (),
) -> torch.Tensor:
    """The cell-to-source affine of a view made by crop, resize and flip.

    The view is the source box starting at voxel ``origin`` and spanning ``size`` voxels,
    resampled to ``grid_size`` cells (``align_corners=False`` geometry, as ``F.interpolate``,
    TorchIO's ``Resize`` and MONAI's ``Resize`` use), then flipped along the ``flip`` axes. All
    values are in array-axis order and in source index coordinates (voxel ``i`` centred at ``i``).

    TorchIO's ``Crop(cropping=(i0, i1, j0, j1, k0, k1))`` on a shape ``S`` gives ``origin=(i0, j0,
    k0)`` and ``size=S - (i0 + i1, j0 + j1, k0 + k1)``; a ``Resize`` gives ``grid_size``;
    ``Flip(axes)`` gives ``flip`` (TorchIO's flip does not update ``image.affine``, so it must
    be taken from the history). For torchvision's ``RandomResizedCrop`` parameters ``(i, j, h, w)``
    use ``origin=(i, j)``, ``size=(h, w)``.

    Args:
        origin: index of the first source voxel of the crop (may be fractional).
        size: crop extent in source voxels, positive.
        grid_size: the view's output grid (feature-map size, if the matcher works on features
            of that size).
        flip: axes flipped after resizing, or a boolean mask over axes.

    Returns:
        A float64 affine ``M`` with ``source = M @ [cell; 1]``.

    Shape:
        origin, size: ``(ndim,)`` or ``(B, ndim)``; flip: axes, or bool ``(ndim,)`` / ``(B, ndim)``;
        output: ``(ndim + 1, ndim + 1)`` or ``(B, ndim + 1, ndim + 1)``.

    Example:
        >>> crop_affine(origin=(2, 0), size=(4, 4), grid_size=(2, 2), flip=(1,))
        tensor([[ 2.0000,  0.0000,  2.5000],
                [ 0.0000, -2.0000,  2.5000],
                [ 0.0000,  0.0000,  1.0000]], dtype=torch.float64)
    """
    grid = check_grid_size(grid_size, "grid_size")
    ndim = len(grid)
    origin_t = _check_vectors(origin, "origin", ndim)
    size_t = _check_vectors(size, "size", ndim)
    if not (size_t > 0).all():
        raise ValueError(f"size: expected positive crop extents, got {size_t.tolist()}")
    if isinstance(flip, torch.Tensor):
        check_tensor(flip, "flip", ndim=(1, 2))
        if flip.dtype != torch.bool or flip.shape[-1] != ndim:
            raise ValueError(
                f"flip: expected a bool mask of shape ({ndim},) or (B, {ndim}), got "
                f"{flip.dtype} {tuple(flip.shape)}"
            )
        flip_mask = flip.to(origin_t.device)
    else:
        axes = tuple(flip)
        if not all(isinstance(a, int) and 0 <= a < ndim for a in axes):
            raise ValueError(f"flip: expected axes in [0, {ndim}), got {axes!r}")
        flip_mask = torch.zeros(ndim, dtype=torch.bool, device=origin_t.device)
        flip_mask[list(axes)] = True
    try:
        origin_t, size_t, flip_mask = torch.broadcast_tensors(origin_t, size_t, flip_mask)
    except RuntimeError:
        raise ValueError(
            f"origin, size, flip: batch sizes differ: {tuple(origin_t.shape)}, "
            f"{tuple(size_t.shape)}, {tuple(flip_mask.shape)}"
        ) from None
    scale = size_t / torch.tensor(grid, dtype=torch.float64, device=origin_t.device)
    # Cell i's centre sits (i + 0.5) * scale above the crop's lower border (origin - 0.5); a flip
    # counts cells down from the upper border instead.
    lower_border = origin_t - 0.5
    offset = lower_border + torch.where(flip_mask, size_t - 0.5 * scale, 0.5 * scale)
    affine = torch.zeros(
        *origin_t.shape[:-1], ndim + 1, ndim + 1, dtype=torch.float64, device=origin_t.device
    )
    affine[..., :ndim, :ndim] = torch.diag_embed(torch.where(flip_mask, -scale, scale))
    affine[..., :ndim, ndim] = offset
    affine[..., ndim, ndim] = 1.0
    return affine


def _check_vectors(value: Sequence[float] | torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """A finite float64 ``(ndim,)`` or ``(B, ndim)`` tensor."""
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.ndim not in (1, 2) or tensor.shape[-1] != ndim or tensor.numel() == 0:
        raise ValueError(
            f"{name}: expected shape ({ndim},) or (B, {ndim}), got {tuple(tensor.shape)}"
        )
    check_finite(tensor, name)
    return tensor


class CropOverlapMatcher(Matcher):
    """Match the cells of two crops of one source image or volume by their source positions.

    Each view is described by an affine from its cell index coordinates to a common source frame
    (build it with :func:`crop_affine`, or use the voxel-to-world affine TorchIO / MONAI keep
    after crops and resampling). Cell centres of view a are mapped into the source frame and:

    * ``mode="threshold"`` (PixPro): every pair of cells whose source centres are closer than
      ``pos_ratio`` times the larger cell diagonal of the two views is matched. A cell diagonal is
      the Frobenius norm of the affine's linear part (the true diagonal for scaled, flipped or
      rotated grids). A cell may match several cells, or none. On two equal 3D grids the
      default 0.7 also matches the 6 face neighbours (0.7 * sqrt(3) > 1); below
      ``1 / sqrt(ndim)`` equal grids match one to one.
    * ``mode="nearest"``: each cell of a is matched to the cell of b that contains its centre,
      if that lies on b's grid.

    Every pair has weight 1 (PixPro averages its loss over the positive pairs).

    Args:
        mode: ``"threshold"`` or ``"nearest"``.
        pos_ratio: distance threshold relative to the cell diagonal (PixPro uses 0.7).
        chunk_size: rows of view a per pairwise-distance block in threshold mode; bounds memory to
            ``chunk_size * Nb`` distances. Threshold mode still costs ``Na * Nb`` distances per
            sample: for full-resolution 3D grids use ``"nearest"``, which is linear.

    Reference:
        Xie et al., "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised
        Visual Representation Learning", CVPR 2021 (arXiv 2011.10043).
    """

    def __init__(
        self, mode: OverlapMode = "threshold", pos_ratio: float = 0.7, chunk_size: int = 1024
    ) -> None:
        if mode not in ("threshold", "nearest"):
            raise ValueError(f"mode: expected 'threshold' or 'nearest', got {mode!r}")
        self.mode = mode
        self.pos_ratio = check_positive(pos_ratio, "pos_ratio")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")

    def match(
        self,
        affine_a: torch.Tensor,
        affine_b: torch.Tensor,
        grid_size_a: Sequence[int],
        grid_size_b: Sequence[int] | None = None,
    ) -> MatchResult:
        """Match the cells of view a to the cells of view b.

        Args:
            affine_a: cell-to-source affine of view a; batched or shared by all samples.
            affine_b: cell-to-source affine of view b, in the same source frame.
            grid_size_a: view a's grid, ``ndim`` = 2 or 3 ints.
            grid_size_b: view b's grid; defaults to ``grid_size_a``.

        Returns:
            Pairs of flattened cells, weight 1; ``batch`` is set when an affine is batched.

        Shape:
            affine_a, affine_b: ``(ndim + 1, ndim + 1)`` or ``(B, ndim + 1, ndim + 1)``.
        """
        grid_a = check_grid_size(grid_size_a, "grid_size_a")
        ndim = len(grid_a)
        grid_b = (
            grid_a if grid_size_b is None else check_grid_size(grid_size_b, "grid_size_b", ndim)
        )
        matrices_a, batched_a = _check_affine(affine_a, "affine_a", ndim)
        matrices_b, batched_b = _check_affine(affine_b, "affine_b", ndim)
        if batched_a and batched_b and matrices_a.shape[0] != matrices_b.shape[0]:
            raise ValueError(
                f"affine_b: expected batch size {matrices_a.shape[0]} like affine_a, "
                f"got {matrices_b.shape[0]}"
            )
        matrices_a, matrices_b = torch.broadcast_tensors(matrices_a, matrices_b)
        results = [self._match_one(a, b, grid_a, grid_b) for a, b in zip(matrices_a, matrices_b)]
        return MatchResult.concat(results) if batched_a or batched_b else results[0]

    def _match_one(
        self,
        affine_a: torch.Tensor,
        affine_b: torch.Tensor,
        grid_a: tuple[int, ...],
        grid_b: tuple[int, ...],
    ) -> MatchResult:
        ndim = len(grid_a)
        cells_a = cell_coordinates(grid_a, torch.float64, affine_a.device)
        if self.mode == "nearest":
            a_to_b = torch.linalg.inv(affine_b) @ affine_a
            flat_b, inside = nearest_cell(transform_points(a_to_b[:ndim], cells_a), grid_b)
            index_a = inside.nonzero().squeeze(-1)
            index_b = flat_b[index_a]
        else:
            source_a = transform_points(affine_a[:ndim], cells_a)
            source_b = transform_points(
                affine_b[:ndim], cell_coordinates(grid_b, torch.float64, affine_b.device)
            )
            diagonal = torch.maximum(
                torch.linalg.matrix_norm(affine_a[:ndim, :ndim]),
                torch.linalg.matrix_norm(affine_b[:ndim, :ndim]),
            )
            threshold = self.pos_ratio * diagonal
            pairs = []
            for rows in row_chunks(source_a.shape[0], self.chunk_size):
                # The exact (non-matmul) distance keeps pairs at a known distance reproducible.
                distance = torch.cdist(
                    source_a[rows], source_b, compute_mode="donot_use_mm_for_euclid_dist"
                )
                close = (distance < threshold).nonzero()
                close[:, 0] += rows.start
                pairs.append(close)
            index_a, index_b = torch.cat(pairs).unbind(dim=1)
        weight = torch.ones(index_a.shape, device=affine_a.device)
        return MatchResult(index_a, index_b, weight)


def _check_affine(value: torch.Tensor, name: str, ndim: int) -> tuple[torch.Tensor, bool]:
    """A finite, invertible homogeneous ``(ndim + 1) x (ndim + 1)`` affine (optionally batched)."""
    matrices, batched = check_matrices(value, name, ndim + 1, ndim + 1)
    bottom = torch.zeros(ndim + 1, dtype=torch.float64, device=matrices.device)
    bottom[-1] = 1.0
    if not torch.equal(matrices[:, ndim], bottom.expand(matrices.shape[0], -1)):
        raise ValueError(f"{name}: expected a homogeneous affine with last row {bottom.tolist()}")
    if (torch.linalg.det(matrices[:, :ndim, :ndim]) == 0).any():
        raise ValueError(f"{name}: the affine is singular (a zero-size cell)")
    return matrices, batched
