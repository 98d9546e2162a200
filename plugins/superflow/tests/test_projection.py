"""The LiDAR -> pixel chain equals the devkit's map_pointcloud_to_image and keeps the point pairing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from accord_superflow.data import (
    CameraFrame,
    RigidTransform,
    SensorFrame,
    load_info_index,
    pair_points_with_cameras,
    project_to_image,
)

VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def keyframes(nuscenes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    cache = tmp_path_factory.mktemp("cache")
    return [k for split in ("mini_train", "mini_val")
            for k in load_info_index(nuscenes_root, VERSION, split, max_sweeps=0, cache_dir=cache).keyframes]


@pytest.fixture
def devkit_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """The devkit keeps clouds in float32 and rounds after every transform step (about 1e-5 m at
    100 m from the global origin); our chain runs in float64. Feeding the devkit float64 points
    makes both compute the same chain at the same precision."""
    from nuscenes.utils.data_classes import LidarPointCloud

    original = LidarPointCloud.from_file.__func__

    def from_file_float64(cls, file_name: str) -> LidarPointCloud:
        cloud = original(cls, file_name)
        return cls(cloud.points.astype(np.float64))

    monkeypatch.setattr(LidarPointCloud, "from_file", classmethod(from_file_float64))


def test_equals_devkit_map_pointcloud_to_image(nusc, nuscenes_root: Path, keyframes: list, devkit_in_float64) -> None:
    total = 0
    for keyframe in keyframes:
        points = np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
        for camera in keyframe.cameras.values():
            pairs = pair_points_with_cameras(points, keyframe.lidar, [camera])
            expected, depths, _ = nusc.explorer.map_pointcloud_to_image(keyframe.lidar.sample_data_token,
                                                                        camera.sample_data_token)
            # Same points kept (the devkit keeps them in cloud order), same pixel, same depth.
            assert len(pairs) == expected.shape[1]
            np.testing.assert_allclose(pairs.pixel_uv, expected[:2].T, atol=1e-3, rtol=0)
            np.testing.assert_allclose(pairs.depth, depths, atol=1e-6)
            total += len(pairs)
    assert total > 20_000


def test_float32_devkit_differs_only_by_rounding(nusc, nuscenes_root: Path, keyframes: list) -> None:
    keyframe = keyframes[1]
    points = np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
    camera = keyframe.cameras["CAM_FRONT"]
    pairs = pair_points_with_cameras(points, keyframe.lidar, [camera])
    expected, _, _ = nusc.explorer.map_pointcloud_to_image(keyframe.lidar.sample_data_token, camera.sample_data_token)
    assert len(pairs) == expected.shape[1]
    np.testing.assert_allclose(pairs.pixel_uv, expected[:2].T, atol=0.02, rtol=0)


def test_pairs_over_cameras(nuscenes_root: Path, keyframes: list) -> None:
    keyframe = keyframes[0]
    points = np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
    cameras = list(keyframe.cameras.values())
    pairs = pair_points_with_cameras(points, keyframe.lidar, cameras, margin_px=0.0)
    assert set(np.unique(pairs.camera_index)) == set(range(6))
    for slot, camera in enumerate(cameras):
        single = pair_points_with_cameras(points, keyframe.lidar, [camera], margin_px=0.0)
        in_slot = pairs.camera_index == slot
        np.testing.assert_array_equal(pairs.point_index[in_slot], single.point_index)
        rows, cols = pairs.pixel_rc[in_slot].T
        assert rows.min() >= 0 and rows.max() < camera.height and cols.min() >= 0 and cols.max() < camera.width
    assert np.all(pairs.depth > 1.0)
    # Adjacent cameras overlap, so some points pair with two images.
    assert len(np.unique(pairs.point_index)) < len(pairs)


def _camera(intrinsic: np.ndarray, width: int = 100, height: int = 50) -> CameraFrame:
    # Optical frame == ego == global: the camera looks along +z.
    identity = RigidTransform(np.eye(3), np.zeros(3))
    return CameraFrame(sample_data_token="c", path="c.jpg", timestamp=0, sensor_to_ego=identity,
                       ego_to_global=identity, intrinsic=intrinsic, width=width, height=height)


def test_hand_computed_projection() -> None:
    intrinsic = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 25.0], [0.0, 0.0, 1.0]])
    points = np.array([
        [0.0, 0.0, 10.0],     # optical centre -> (50, 25)
        [1.0, -0.5, 4.0],     # -> (75, 12.5)
        [0.0, 0.0, 0.9],      # too close (depth <= 1 m)
        [0.0, 0.0, -5.0],     # behind the camera
        [10.0, 0.0, 10.0],    # right of the image
        [-0.49, 0.0, 1.0],    # depth exactly 1 m: dropped
        [-0.485, 0.0, 1.01],  # u = 1.98 inside; with margin 2 it is dropped
    ])
    kept, uv, depth = project_to_image(points, intrinsic, 100, 50)
    np.testing.assert_array_equal(kept, [0, 1, 6])
    np.testing.assert_allclose(uv[:2], [[50.0, 25.0], [75.0, 12.5]])
    np.testing.assert_allclose(depth, [10.0, 4.0, 1.01])
    kept_margin, _, _ = project_to_image(points, intrinsic, 100, 50, margin_px=2.0)
    np.testing.assert_array_equal(kept_margin, [0, 1])

    # Through the full chain: a LiDAR frame rotated and shifted, ego moving between the two captures.
    yaw = RigidTransform([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0.5, 0.0, 0.0])
    lidar = SensorFrame(sample_data_token="l", path="l.bin", timestamp=0, sensor_to_ego=yaw,
                        ego_to_global=RigidTransform(np.eye(3), [2.0, 0.0, 0.0]))
    camera = _camera(intrinsic)
    global_points = points[:2]
    lidar_points = (lidar.ego_to_global @ lidar.sensor_to_ego).inverse().apply(global_points)
    pairs = pair_points_with_cameras(lidar_points, lidar, [camera])
    np.testing.assert_array_equal(pairs.point_index, [0, 1])
    np.testing.assert_allclose(pairs.pixel_uv, [[50.0, 25.0], [75.0, 12.5]], atol=1e-9)
    np.testing.assert_array_equal(pairs.pixel_rc, [[25, 50], [12, 75]])  # (row, col) = round(v, u)


def test_no_camera_gives_empty_pairs() -> None:
    lidar = SensorFrame(sample_data_token="l", path="l.bin", timestamp=0,
                        sensor_to_ego=RigidTransform(np.eye(3), np.zeros(3)),
                        ego_to_global=RigidTransform(np.eye(3), np.zeros(3)))
    pairs = pair_points_with_cameras(np.zeros((5, 4)), lidar, [])
    assert len(pairs) == 0 and pairs.pixel_rc.shape == (0, 2)
