"""The LiDAR -> pixel chain equals the devkit's map_pointcloud_to_image and keeps the point pairing.

The in-image rule is the core's (``accord.matchers.project_points``: the whole image,
``-0.5 <= u < W - 0.5``); the devkit also drops a rendering border (``1 < u < W - 1``), so the
comparison applies that border to our pairs first.
"""

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


def _inside_devkit_border(pairs, camera: CameraFrame) -> np.ndarray:
    """The devkit's map_pointcloud_to_image keeps ``1 < u < W - 1`` and ``1 < v < H - 1``."""
    u, v = pairs.pixel_uv.T
    return (u > 1) & (u < camera.width - 1) & (v > 1) & (v < camera.height - 1)


def test_equals_devkit_map_pointcloud_to_image(nusc, nuscenes_root: Path, keyframes: list, devkit_in_float64) -> None:
    total = border = 0
    for keyframe in keyframes:
        points = np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
        for camera in keyframe.cameras.values():
            pairs = pair_points_with_cameras(points, keyframe.lidar, [camera])
            inside = _inside_devkit_border(pairs, camera)
            expected, depths, _ = nusc.explorer.map_pointcloud_to_image(keyframe.lidar.sample_data_token,
                                                                        camera.sample_data_token)
            # Same points kept (the devkit keeps them in cloud order), same pixel, same depth.
            assert inside.sum() == expected.shape[1]
            np.testing.assert_allclose(pairs.pixel_uv[inside], expected[:2].T, atol=1e-3, rtol=0)
            np.testing.assert_allclose(pairs.depth[inside], depths, atol=1e-6)
            total += len(pairs)
            border += int((~inside).sum())
    assert total > 20_000
    # The whole-image rule keeps the devkit's border pixels too, and nothing else.
    assert 0 < border < 0.05 * total


def test_float32_devkit_differs_only_by_rounding(nusc, nuscenes_root: Path, keyframes: list) -> None:
    keyframe = keyframes[1]
    points = np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
    camera = keyframe.cameras["CAM_FRONT"]
    pairs = pair_points_with_cameras(points, keyframe.lidar, [camera])
    inside = _inside_devkit_border(pairs, camera)
    expected, _, _ = nusc.explorer.map_pointcloud_to_image(keyframe.lidar.sample_data_token, camera.sample_data_token)
    assert inside.sum() == expected.shape[1]
    np.testing.assert_allclose(pairs.pixel_uv[inside], expected[:2].T, atol=0.02, rtol=0)


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
        [1.0, -0.4, 4.0],     # -> (75, 15)
        [0.0, 0.0, 0.9],      # too close (depth <= 1 m)
        [0.0, 0.0, -5.0],     # behind the camera
        [10.0, 0.0, 10.0],    # right of the image
        [-0.49, 0.0, 1.0],    # depth exactly 1 m: dropped
        [-0.4929, 0.0, 1.01],  # u = 1.198: column 1; a 2-pixel margin drops it
        [4.93, 0.0, 10.0],    # u = 99.3 < W - 0.5: the last column (the devkit drops u >= W - 1)
        [-5.03, 0.0, 10.0],   # u = -0.3 >= -0.5: the first column
    ])
    identity = RigidTransform(np.eye(3), np.zeros(3))
    lidar = SensorFrame(sample_data_token="l", path="l.bin", timestamp=0, sensor_to_ego=identity,
                        ego_to_global=identity)
    camera = _camera(intrinsic)
    pairs = pair_points_with_cameras(points, lidar, [camera])
    np.testing.assert_array_equal(pairs.point_index, [0, 1, 6, 7, 8])
    np.testing.assert_allclose(pairs.pixel_uv[:2], [[50.0, 25.0], [75.0, 15.0]])
    np.testing.assert_allclose(pairs.depth, [10.0, 4.0, 1.01, 10.0, 10.0])
    np.testing.assert_array_equal(pairs.pixel_rc[:, 1], [50, 75, 1, 99, 0])
    with_margin = pair_points_with_cameras(points, lidar, [camera], margin_px=2.0)
    np.testing.assert_array_equal(with_margin.point_index, [0, 1])

    # Through the full chain: a LiDAR frame rotated and shifted, ego moving between the two captures.
    yaw = RigidTransform([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0.5, 0.0, 0.0])
    lidar = SensorFrame(sample_data_token="l", path="l.bin", timestamp=0, sensor_to_ego=yaw,
                        ego_to_global=RigidTransform(np.eye(3), [2.0, 0.0, 0.0]))
    global_points = points[:2]
    lidar_points = (lidar.ego_to_global @ lidar.sensor_to_ego).inverse().apply(global_points)
    pairs = pair_points_with_cameras(lidar_points, lidar, [camera])
    np.testing.assert_array_equal(pairs.point_index, [0, 1])
    np.testing.assert_allclose(pairs.pixel_uv, [[50.0, 25.0], [75.0, 15.0]], atol=1e-9)
    np.testing.assert_array_equal(pairs.pixel_rc, [[25, 50], [15, 75]])  # (row, col) = floor((v, u) + 0.5)


def test_no_camera_gives_empty_pairs() -> None:
    lidar = SensorFrame(sample_data_token="l", path="l.bin", timestamp=0,
                        sensor_to_ego=RigidTransform(np.eye(3), np.zeros(3)),
                        ego_to_global=RigidTransform(np.eye(3), np.zeros(3)))
    pairs = pair_points_with_cameras(np.zeros((5, 4)), lidar, [])
    assert len(pairs) == 0 and pairs.pixel_rc.shape == (0, 2)
