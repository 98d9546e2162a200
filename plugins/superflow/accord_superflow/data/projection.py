"""LiDAR point -> camera pixel correspondences (the devkit / SLidR / SuperFlow projection chain).

``lidar -> ego (LiDAR time) -> global -> ego (camera time) -> camera -> image``, composed into one
``K @ [R | t]`` matrix per camera and projected by the core :func:`accord.matchers.project_points`,
with its in-image rule: pixel centres at integer coordinates, a point kept when it is more than
``min_depth`` in front of the camera and ``margin_px - 0.5 <= u < width - 0.5 - margin_px`` (same
for ``v``). The result is a list of (point index, camera slot, pixel) pairs computed on
un-augmented data at the stored image resolution; augmentations later move the pixel coordinates
and point coordinates, never the pairing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from accord.matchers import project_points
from accord_superflow.data.geometry import sensor_to_sensor
from accord_superflow.data.index import CameraFrame, SensorFrame

__all__ = ["PointPixelPairs", "pair_points_with_cameras"]


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
        """``(M, 2)`` int64 ``(row, col)`` of the pixel each point falls in, ``floor((v, u) + 0.5)``."""
        return np.floor(self.pixel_uv[:, ::-1] + 0.5).astype(np.int64)


def pair_points_with_cameras(points_lidar: np.ndarray, lidar: SensorFrame, cameras: Sequence[CameraFrame],
                             min_depth: float = 1.0, margin_px: float = 0.0) -> PointPixelPairs:
    """Project a LiDAR cloud into every camera of a keyframe.

    Args:
        points_lidar: ``(N, 3+)`` points in the LiDAR frame of ``lidar`` (extra columns ignored);
            sweeps must first be moved into the keyframe frame with ``sweep_to_keyframe``.
        lidar: the LiDAR scan's calibration and ego pose.
        cameras: the images to project into; ``camera_index`` refers to this order.
        min_depth: pairs need depth ``> min_depth`` (metres).
        margin_px: pixels dropped at every image border (0: the whole image).

    Returns:
        The pairs of all cameras, camera by camera, points in increasing index order within each.
    """
    xyz = torch.from_numpy(np.ascontiguousarray(np.asarray(points_lidar, dtype=np.float64)[:, :3]))
    if not cameras:
        return PointPixelPairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0))
    matrices = []
    for camera in cameras:
        lidar_to_camera = sensor_to_sensor(lidar.sensor_to_ego, lidar.ego_to_global,
                                           camera.sensor_to_ego, camera.ego_to_global)
        rigid = np.hstack([lidar_to_camera.rotation, lidar_to_camera.translation[:, None]])
        matrices.append(np.asarray(camera.intrinsic, dtype=np.float64) @ rigid)
    sizes = [(int(camera.height), int(camera.width)) for camera in cameras]
    parts: list[tuple[np.ndarray, ...]] = [()] * len(cameras)
    # One projection per image size (nuScenes: one for all six cameras): the input checks and the
    # point transform run once for the stack instead of once per camera.
    for size in dict.fromkeys(sizes):
        slots = [slot for slot, other in enumerate(sizes) if other == size]
        found = project_points(xyz, torch.from_numpy(np.stack([matrices[slot] for slot in slots])), size, min_depth,
                               margin_px)
        view, kept = torch.nonzero(found.valid, as_tuple=True)  # view-major, points increasing
        pixel, depth = found.pixel[view, kept].numpy(), found.depth[view, kept].numpy()
        bounds = torch.searchsorted(view, torch.arange(len(slots) + 1)).tolist()
        for position, slot in enumerate(slots):
            rows = slice(bounds[position], bounds[position + 1])
            parts[slot] = (kept[rows].numpy(), np.full(rows.stop - rows.start, slot, dtype=np.int64), pixel[rows],
                           depth[rows])
    return PointPixelPairs(*(np.concatenate(arrays) for arrays in zip(*parts)))
