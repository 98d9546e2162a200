"""Point-to-pixel projection (LiDAR/camera pretraining, SLidR style): one rule for every caller.

A point ``p`` is projected with a 3x4 matrix ``P``: ``(x, y, w) = P @ [p; 1]``, pixel
``(u, v) = (x / w, y / w)``; for ``P = K @ [R | t]`` with ``K[2] = (0, 0, 1)``, ``w`` is the point's
depth along the camera axis. The rule, used by :func:`project_points` and
:class:`PointProjectionMatcher` (and through them by the superflow plugin):

* **pixel centres at integer coordinates** (OpenCV, the nuScenes devkit's intrinsics, and the cell
  convention of every accord matcher): pixel ``(row, col)`` covers ``u`` in ``[col - 0.5, col + 0.5)``
  and ``v`` in ``[row - 0.5, row + 0.5)``, so a point lies in pixel
  ``(floor(v + 0.5), floor(u + 0.5))``;
* **in front**: ``w > min_depth``, strictly (default 1 m, the devkit's ``min_dist``; it also drops
  points on the ego vehicle);
* **on the image**: ``margin - 0.5 <= u < W - 0.5 - margin`` and ``margin - 0.5 <= v < H - 0.5 -
  margin``, lower bound inclusive, upper exclusive, so every kept point lies in exactly one pixel
  and, for an integer ``margin``, that pixel is at least ``margin`` pixels from the border
  (default 0: the whole image).

The devkit's ``map_pointcloud_to_image`` (and SLidR, which copies it) keeps ``1 < u < W - 1``
instead: with integer pixel centres that drops 1.5 pixels on the left and top and half a pixel on
the right and bottom, an artefact of a rendering margin rather than geometry.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from accord.utils.checks import check_finite, check_tensor
from accord.matchers._grid import (
    check_grid_size,
    check_matrices,
    nearest_cell,
    resize_scale,
)
from accord.matchers.base import Matcher, MatchResult

__all__ = ["PointProjection", "PointProjectionMatcher", "project_points"]


class PointProjection(NamedTuple):
    """Where points land in one image or a stack of ``V`` images (see :func:`project_points`).

    Attributes:
        pixel: ``(..., N, 2)`` float64 continuous pixel coordinates ``(u, v)`` = (column, row).
        depth: ``(..., N)`` float64 depth ``w`` along the camera axis.
        valid: ``(..., N)`` bool, in front of the camera and on the image (the module's rule).
    """

    pixel: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor


def _check_projection_options(min_depth: float, margin: float) -> None:
    for name, value in (("min_depth", min_depth), ("margin", margin)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


def project_points(
    points: torch.Tensor,
    projection: torch.Tensor,
    image_size: Sequence[int],
    min_depth: float = 1.0,
    margin: float = 0.0,
) -> PointProjection:
    """Project points into one image or a stack of ``V`` images, with the module's in-image rule.

    Geometry runs in float64 whatever the points' dtype (pixel coordinates of far points need it).

    Args:
        points: ``(N, 3)`` floating point coordinates, in the frame ``projection`` maps from.
        projection: ``(3, 4)`` or ``(V, 3, 4)`` point-to-pixel matrix ``K @ [R | t]``; image
            augmentations that move pixels are folded in by left-multiplying their 3x3 affine.
        image_size: ``(H, W)`` in pixels.
        min_depth: a point needs depth ``w > min_depth``, in the units of the points; ``>= 0``.
        margin: pixels dropped at every border of the image; ``>= 0``.

    Returns:
        ``(pixel, depth, valid)``: ``(N, 2)``, ``(N,)``, ``(N,)`` for one matrix, with a leading
        ``V`` for a stack. ``pixel`` of a point with ``w <= min_depth`` is its undivided ``(x, y)``
        (finite, meaningless); use ``valid``.

    Raises:
        ValueError: a bad shape, dtype, non-finite value or option, naming the argument.

    Shape:
        - points: :math:`(N, 3)`
        - projection: :math:`(3, 4)` or :math:`(V, 3, 4)`
        - output: :math:`([V,] N, 2)`, :math:`([V,] N)`, :math:`([V,] N)`

    Example:
        >>> K = torch.tensor([[100.0, 0, 50], [0, 100.0, 25], [0, 0, 1]], dtype=torch.float64)
        >>> P = K @ torch.eye(4, dtype=torch.float64)[:3]
        >>> found = project_points(torch.tensor([[0.0, 0.0, 10.0]]), P, image_size=(50, 100))
        >>> found.pixel.tolist(), found.valid.tolist()
        ([[50.0, 25.0]], [True])
    """
    check_tensor(points, "points", shape=(None, 3), floating=True)
    check_finite(points, "points")
    height, width = check_grid_size(image_size, "image_size", ndim=2)
    _check_projection_options(min_depth, margin)
    matrices, batched = check_matrices(projection, "projection", 3, 4)
    # Calibration often stays on the CPU while the points are on the accelerator.
    matrices = matrices.to(points.device)
    # Coordinate-major (V, 3, N): u w, v w and w are contiguous rows, about twice as fast on
    # a CPU as the point-major (V, N, 3) product (superflow's pairing benchmark).
    projected = matrices[..., :3] @ points.to(torch.float64).T + matrices[..., 3:]
    depth = projected[:, 2]
    in_front = depth > min_depth
    # Points not in front are dropped anyway; dividing them by 1 keeps their pixels finite.
    denominator = torch.where(in_front, depth, torch.ones_like(depth))
    column, row = projected[:, 0] / denominator, projected[:, 1] / denominator
    valid = in_front & (column >= margin - 0.5) & (column < width - 0.5 - margin)
    valid &= (row >= margin - 0.5) & (row < height - 0.5 - margin)
    found = PointProjection(torch.stack([column, row], dim=-1), depth, valid)
    return found if batched else PointProjection(*(value[0] for value in found))


class PointProjectionMatcher(Matcher):
    """Pair 3D points with the feature-map cells of the pixels they project to.

    Points are projected with :func:`project_points` (pixel centres at integer coordinates, kept
    when ``w > min_depth`` and on the image, see :mod:`accord.matchers.projection`); each kept
    pixel is mapped onto a feature map of ``feature_size`` covering the whole image (cells of
    ``H / h`` by ``W / w`` pixels) and the containing cell is matched. A point seen by several
    cameras yields one pair per camera.

    Args:
        min_depth: minimum depth ``w`` in front of the camera, in the units of the points.
        margin: pixels dropped at every border of the image.

    Reference:
        Sautier et al., "Image-to-Lidar Self-Supervised Distillation for Autonomous Driving
        Data" (SLidR), CVPR 2022 (arXiv 2203.16258).
    """

    def __init__(self, min_depth: float = 1.0, margin: float = 0.0) -> None:
        _check_projection_options(min_depth, margin)
        self.min_depth = float(min_depth)
        self.margin = float(margin)

    def match(
        self,
        points: torch.Tensor,
        image_size: Sequence[int],
        feature_size: Sequence[int] | None = None,
        projection: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        extrinsics: torch.Tensor | None = None,
    ) -> MatchResult:
        """Project points into one image or a stack of ``V`` images.

        Give either ``projection`` or both ``intrinsics`` and ``extrinsics``
        (``projection = intrinsics @ extrinsics[:3]``).

        Args:
            points: point coordinates (pass ``points[:, :3]`` of an ``(N, 4+)`` cloud).
            image_size: ``(H, W)`` in pixels.
            feature_size: ``(h, w)`` of the feature map covering the image; defaults to
                ``image_size`` (pixel-level matches). For a backbone of stride ``s`` this is
                its output size, e.g. ``(H // s, W // s)``.
            projection: LiDAR-to-pixel projection matrix per image.
            intrinsics: camera matrix ``K`` per image.
            extrinsics: LiDAR-to-camera rigid transform per image.

        Returns:
            Pairs (point index, flattened feature cell ``row * w + col``) with weight 1;
            ``batch`` (the image index) is set when the camera matrices are batched.

        Shape:
            points: ``(N, 3)``; projection: ``(3, 4)`` or ``(V, 3, 4)``; intrinsics: ``(3, 3)`` or
            ``(V, 3, 3)``; extrinsics: ``(4, 4)`` or ``(V, 4, 4)``.
        """
        matrices, batched = self._projection_matrices(projection, intrinsics, extrinsics)
        pixel, _, valid = project_points(points, matrices, image_size, self.min_depth, self.margin)
        image = tuple(image_size)
        features = (
            image if feature_size is None else check_grid_size(feature_size, "feature_size", ndim=2)
        )
        row_col = pixel.flip(-1)  # (u, v) = (column, row) -> array-axis order
        scale = resize_scale(features, image, points.device)
        # Pixel index coordinates to feature-cell index coordinates (align_corners=False).
        flat_cell, on_grid = nearest_cell((row_col + 0.5) * scale - 0.5, features)
        # on_grid only guards the rounding of the rescale at the image border.
        view, index_a = (valid & on_grid).nonzero().unbind(dim=1)
        weight = torch.ones(index_a.shape, device=points.device)
        return MatchResult(index_a, flat_cell[view, index_a], weight, view if batched else None)

    @staticmethod
    def _projection_matrices(
        projection: torch.Tensor | None,
        intrinsics: torch.Tensor | None,
        extrinsics: torch.Tensor | None,
    ) -> tuple[torch.Tensor, bool]:
        """The ``(V, 3, 4)`` float64 projection matrices and whether the input was batched."""
        if projection is not None:
            if intrinsics is not None or extrinsics is not None:
                raise ValueError(
                    "projection: give either projection or intrinsics + extrinsics, not both"
                )
            return check_matrices(projection, "projection", 3, 4)
        if intrinsics is None or extrinsics is None:
            raise ValueError(
                "projection: expected projection (3, 4), "
                "or both intrinsics (3, 3) and extrinsics (4, 4)"
            )
        camera, batched_k = check_matrices(intrinsics, "intrinsics", 3, 3)
        pose, batched_e = check_matrices(extrinsics, "extrinsics", 4, 4)
        if batched_k and batched_e and camera.shape[0] != pose.shape[0]:
            raise ValueError(
                f"extrinsics: expected {camera.shape[0]} matrices like intrinsics, "
                f"got {pose.shape[0]}"
            )
        return camera @ pose[:, :3], batched_k or batched_e
