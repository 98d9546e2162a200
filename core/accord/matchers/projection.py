"""Point-to-pixel matching by camera projection (LiDAR/camera pretraining, SLidR style)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from accord.checks import check_finite, check_tensor
from accord.matchers._grid import (
    check_grid_size,
    check_matrices,
    nearest_cell,
    resize_scale,
    transform_points,
)
from accord.matchers.base import Matcher, MatchResult


class PointProjectionMatcher(Matcher):
    """Pair 3D points with the feature-map cells of the pixels they project to.

    A point ``p`` (LiDAR frame) is projected with a 3x4 matrix ``P``: ``(x, y, w) = P @ [p; 1]``,
    pixel ``(u, v) = (x / w, y / w)``. For ``P = K @ [R | t]`` with ``K[2] = (0, 0, 1)``, ``w`` is
    the point's depth along the camera axis. A point is kept when ``w > min_depth`` (nuScenes'
    ``map_pointcloud_to_image`` uses 1 m, which also drops points on the ego vehicle) and the pixel
    lies on the image, ``u`` in ``[-0.5, W - 0.5)`` and ``v`` in ``[-0.5, H - 0.5)`` (pixel centres
    at integer coordinates, as in OpenCV and the nuScenes devkit; the devkit additionally drops a
    one-pixel border). The pixel is then mapped onto a feature map of ``feature_size`` covering the
    whole image (cells of ``H / h`` by ``W / w`` pixels) and the containing cell is matched.

    Image augmentations that move pixels (resize, flip, crop) are folded into ``P`` by
    left-multiplying it with their 3x3 pixel affine. A point seen by several cameras yields one
    pair per camera.

    Args:
        min_depth: minimum depth ``w`` in front of the camera, in the units of the points.

    Reference:
        Sautier et al., "Image-to-Lidar Self-Supervised Distillation for Autonomous Driving
        Data" (SLidR), CVPR 2022 (arXiv 2203.16258).
    """

    def __init__(self, min_depth: float = 1.0) -> None:
        if not (isinstance(min_depth, (int, float)) and 0 <= min_depth < math.inf):
            raise ValueError(f"min_depth: expected a finite number >= 0, got {min_depth!r}")
        self.min_depth = float(min_depth)

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
        check_tensor(points, "points", shape=(None, 3), floating=True)
        check_finite(points, "points")
        image = check_grid_size(image_size, "image_size", ndim=2)
        features = (
            image if feature_size is None else check_grid_size(feature_size, "feature_size", ndim=2)
        )
        matrices, batched = self._projection_matrices(projection, intrinsics, extrinsics)

        # Calibration often stays on the CPU while the points are on the accelerator.
        matrices = matrices.to(points.device)
        projected = transform_points(matrices, points.to(torch.float64))  # (V, N, 3)
        depth = projected[..., 2]
        in_front = depth > self.min_depth
        # Points behind the camera are discarded anyway; dividing by 1 keeps their values finite.
        safe_depth = torch.where(in_front, depth, torch.ones_like(depth))
        pixel = projected[..., :2] / safe_depth.unsqueeze(-1)
        row_col = pixel.flip(-1)  # (u, v) = (column, row) -> array-axis order
        scale = resize_scale(features, image, points.device)
        # Pixel index coordinates to feature-cell index coordinates (align_corners=False).
        flat_cell, on_image = nearest_cell((row_col + 0.5) * scale - 0.5, features)
        view, index_a = (in_front & on_image).nonzero().unbind(dim=1)
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
