"""LiDAR point -> camera pixel correspondences (the devkit / SLidR / SuperFlow projection chain).

``lidar -> ego (LiDAR time) -> global -> ego (camera time) -> camera -> image``, composed into one
rigid transform per camera and applied to all points at once. A point is kept when it is more than
``min_depth`` in front of the camera and strictly inside the image (``margin_px < u < width - 1``,
same for ``v``). The result is a list of (point index, camera slot, pixel) pairs computed on un-augmented data at
the stored image resolution; augmentations later move the pixel coordinates and point
coordinates, never the pairing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from accord_superflow.data.geometry import sensor_to_sensor
from accord_superflow.data.index import CameraFrame, SensorFrame

__all__ = ["PointPixelPairs", "project_to_image", "pair_points_with_cameras"]


@dataclass(frozen=True, eq=False)
class PointPixelPairs:
    """Correspondences between the points of one cloud and pixels of several camera images.

    Attributes:
        point_index: ``(M,)`` int64 row of the point in the cloud (a point seen by two cameras
            appears twice).
        camera_index: ``(M,)`` int64 position of the camera in the list given to
            :func:`pair_points_with_cameras`.
        pixel_uv: ``(M, 2)`` float64 continuous image coordinates ``(u, v)`` = (column, row).
        depth: ``(M,)`` float64 distance along the camera's optical axis, metres.
    """

    point_index: np.ndarray
    camera_index: np.ndarray
    pixel_uv: np.ndarray
    depth: np.ndarray

    def __len__(self) -> int:
        return len(self.point_index)

    @property
    def pixel_rc(self) -> np.ndarray:
        """``(M, 2)`` int64 ``(row, col)`` of the pixel each point falls in (rounded ``(v, u)``)."""
        return np.rint(self.pixel_uv[:, ::-1]).astype(np.int64)


def project_to_image(points_camera: np.ndarray, intrinsic: np.ndarray, width: int, height: int,
                     min_depth: float = 1.0, margin_px: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pinhole projection of points given in the camera frame.

    Args:
        points_camera: ``(N, 3)`` points (x right, y down, z forward).
        intrinsic: ``(3, 3)`` camera matrix.
        width: image width in pixels.
        height: image height in pixels.
        min_depth: points with ``z <= min_depth`` are dropped.
        margin_px: kept points satisfy ``margin_px < u < width - 1`` and
            ``margin_px < v < height - 1``; 1 matches the devkit's ``map_pointcloud_to_image``,
            0 matches SLidR / SuperFlow.

    Returns:
        ``kept`` ``(M,)`` int64 indices of the kept points, their ``uv`` ``(M, 2)`` and ``depth`` ``(M,)``.
    """
    depth = points_camera[:, 2]
    in_front = depth > min_depth
    # Divide only where the point is in front, so points at z = 0 produce no warnings.
    image = points_camera[in_front] @ np.asarray(intrinsic, dtype=np.float64).T
    uv_in_front = image[:, :2] / image[:, 2:3]
    u, v = uv_in_front[:, 0], uv_in_front[:, 1]
    inside = (u > margin_px) & (u < width - 1) & (v > margin_px) & (v < height - 1)
    kept = np.flatnonzero(in_front)[inside]
    return kept, uv_in_front[inside], depth[kept]


def pair_points_with_cameras(points_lidar: np.ndarray, lidar: SensorFrame, cameras: Sequence[CameraFrame],
                             min_depth: float = 1.0, margin_px: float = 1.0) -> PointPixelPairs:
    """Project a LiDAR cloud into every camera of a keyframe.

    Args:
        points_lidar: ``(N, 3+)`` points in the LiDAR frame of ``lidar`` (extra columns ignored);
            sweeps must first be moved into the keyframe frame with ``sweep_to_keyframe``.
        lidar: the LiDAR scan's calibration and ego pose.
        cameras: the images to project into; ``camera_index`` refers to this order.
        min_depth: see :func:`project_to_image`.
        margin_px: see :func:`project_to_image`.

    Returns:
        The pairs of all cameras, camera by camera, points in increasing index order within each.
    """
    xyz = np.asarray(points_lidar, dtype=np.float64)[:, :3]
    parts = []
    for slot, camera in enumerate(cameras):
        lidar_to_camera = sensor_to_sensor(lidar.sensor_to_ego, lidar.ego_to_global,
                                           camera.sensor_to_ego, camera.ego_to_global)
        kept, uv, depth = project_to_image(lidar_to_camera.apply(xyz), camera.intrinsic, camera.width,
                                           camera.height, min_depth, margin_px)
        parts.append((kept, np.full(len(kept), slot, dtype=np.int64), uv, depth))
    if not parts:
        return PointPixelPairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0))
    return PointPixelPairs(*(np.concatenate(arrays) for arrays in zip(*parts)))
