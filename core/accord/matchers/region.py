"""Box/region pooling membership: which feature-map cells make up each region, with what weight."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from accord.utils.checks import check_finite, check_index_range, check_tensor
from accord.matchers._grid import (
    cell_coordinates,
    check_grid_size,
    check_positive_int,
    multilinear_neighbours,
    nearest_cell,
    resize_scale,
)
from accord.matchers.base import Matcher, MatchResult

PoolingMode = Literal["centre", "bilinear"]


class RegionMatcher(Matcher):
    """Match regions (boxes) to the feature-map cells they pool, for region-level objectives.

    View a is the list of ``K`` regions, view b the feature map: pair ``(k, j)`` with weight
    ``w`` means "region ``k``'s pooled feature includes ``w`` times cell ``j``", so the weights of
    one region sum to 1 and :func:`pool_regions` gives its average feature.

    Boxes use the detection convention: continuous pixel coordinates in which the image spans
    ``[0, W] x [0, H]`` (``[0, W] x [0, H] x [0, D]`` in 3D), listed x first, where x is the *last*
    array axis: 2D ``(x1, y1, x2, y2)`` for an ``(H, W)`` image (torchvision / COCO-xyxy), 3D
    ``(x1, y1, z1, x2, y2, z2)`` for a ``(D, H, W)`` volume. The feature map covers the whole image.

    * ``mode="centre"``: a region pools, with uniform weight ``1 / count``, the cells whose centres
      lie inside the box (``x1 <= centre < x2`` on every axis). A box that contains no cell centre
      (smaller than a cell) pools the cell containing its own centre; a box entirely off the image
      pools nothing.
    * ``mode="bilinear"``: RoI-Align with one output bin: ``samples_per_axis`` evenly spaced sample
      points per axis inside the box, each bilinearly (trilinearly) interpolated, averaged. Samples
      off the feature map are clamped to its border, so weights always sum to 1; for boxes inside
      the image this equals ``torchvision.ops.roi_align(..., output_size=1, sampling_ratio=n,
      aligned=True)``.

    Args:
        mode: ``"centre"`` or ``"bilinear"``.
        samples_per_axis: sample points per axis in bilinear mode.
    """

    def __init__(self, mode: PoolingMode = "centre", samples_per_axis: int = 2) -> None:
        if mode not in ("centre", "bilinear"):
            raise ValueError(f"mode: expected 'centre' or 'bilinear', got {mode!r}")
        self.mode = mode
        self.samples_per_axis = check_positive_int(samples_per_axis, "samples_per_axis")

    def match(
        self,
        boxes: torch.Tensor,
        image_size: Sequence[int],
        feature_size: Sequence[int] | None = None,
        box_batch: torch.Tensor | None = None,
    ) -> MatchResult:
        """Pair each box with the cells it pools.

        Args:
            boxes: boxes in image coordinates (see the class docstring for the layout).
            image_size: ``(H, W)`` or ``(D, H, W)``, matching the box dimension.
            feature_size: the feature map's grid; defaults to ``image_size``.
            box_batch: the image each box belongs to (a region list over a batch of maps, like
                torchvision's ``(K, 5)`` RoI format); sets the result's ``batch``.

        Returns:
            Pairs (region ``k``, flattened cell) sorted by region, weights summing to 1 per
            region that pools anything.

        Shape:
            boxes: ``(K, 4)`` or ``(K, 6)``; box_batch: ``(K,)`` long.
        """
        check_tensor(boxes, "boxes", ndim=2, floating=True)
        if boxes.shape[1] not in (4, 6):
            raise ValueError(f"boxes: expected shape (K, 4) or (K, 6), got {tuple(boxes.shape)}")
        check_finite(boxes, "boxes")
        ndim = boxes.shape[1] // 2
        image = check_grid_size(image_size, "image_size", ndim)
        grid = (
            image if feature_size is None else check_grid_size(feature_size, "feature_size", ndim)
        )
        if box_batch is not None:
            check_tensor(box_batch, "box_batch", shape=(boxes.shape[0],), floating=False)
            if bool((box_batch < 0).any()):
                raise ValueError("box_batch: expected non-negative image indices")

        scale = resize_scale(grid, image, boxes.device)
        # To array-axis order (x is the last axis) and feature-map corner coordinates.
        low = boxes[:, :ndim].flip(-1).to(torch.float64) * scale
        high = boxes[:, ndim:].flip(-1).to(torch.float64) * scale
        if bool((high < low).any()):
            raise ValueError("boxes: expected x2 >= x1, y2 >= y1 (and z2 >= z1) in every box")

        if self.mode == "centre":
            region, location, weight = _centre_membership(low, high, grid)
        else:
            region, location, weight = _bilinear_membership(low, high, grid, self.samples_per_axis)
        batch = None if box_batch is None else box_batch[region]
        return MatchResult(region, location, weight.to(torch.get_default_dtype()), batch)


def _bilinear_membership(
    low: torch.Tensor, high: torch.Tensor, grid: tuple[int, ...], samples: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoI-Align sample points of each box, interpolated and merged per (box, cell)."""
    ndim = len(grid)
    # Sample t of n sits at (t + 0.5) / n of the box; -0.5 turns corner into index coordinates.
    fractions = (cell_coordinates((samples,) * ndim, torch.float64, low.device) + 0.5) / samples
    points = low.unsqueeze(1) + fractions * (high - low).unsqueeze(1) - 0.5  # (K, n**ndim, ndim)
    upper = torch.tensor(grid, dtype=torch.float64, device=low.device) - 1
    points = torch.minimum(points.clamp(min=0), upper)
    row, location, weight = multilinear_neighbours(points.reshape(-1, ndim), grid)
    merged = MatchResult(row // samples**ndim, location, weight / samples**ndim).coalesce()
    return merged.index_a, merged.index_b, merged.weight


def _centre_membership(
    low: torch.Tensor, high: torch.Tensor, grid: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells whose centres lie in each box, falling back to the cell holding the box centre."""
    num_regions, ndim = low.shape
    member = torch.ones(num_regions, dtype=torch.bool, device=low.device)
    for axis, size in enumerate(grid):
        centres = torch.arange(size, dtype=torch.float64, device=low.device) + 0.5
        inside = (centres >= low[:, axis, None]) & (centres < high[:, axis, None])  # (K, size)
        # Outer product with the axes so far: (K, S_0, ..., S_axis).
        member = member.unsqueeze(-1) & inside.view(num_regions, *([1] * axis), size)
    member = member.reshape(num_regions, -1)
    empty = ~member.any(dim=1)
    if bool(empty.any()):
        flat, on_grid = nearest_cell((low[empty] + high[empty]) / 2 - 0.5, grid)
        rows = empty.nonzero().squeeze(1)
        member[rows[on_grid], flat[on_grid]] = True
    region, location = member.nonzero().unbind(dim=1)
    return region, location, 1.0 / member.sum(dim=1)[region].to(torch.float64)


def pool_regions(match: MatchResult, features: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Weighted pooling of feature-map cells into region features.

    Args:
        match: a :class:`RegionMatcher` result (region ``k`` in ``index_a``, cell in ``index_b``).
        features: the feature map, flattened and channels last.
        num_regions: ``K``; regions without pairs pool to zero.

    Returns:
        Region features ``sum_j weight_kj * features[j]``.

    Shape:
        features: ``(N, C)`` or ``(B, N, C)``; output: ``(K, C)``.
    """
    check_positive_int(num_regions, "num_regions")
    check_index_range(match.index_a, "match.index_a", num_regions)
    values = match.gather_b(features)
    pooled = values.new_zeros(num_regions, values.shape[-1])
    return pooled.index_add_(0, match.index_a, values * match.weight.to(values.dtype).unsqueeze(-1))
