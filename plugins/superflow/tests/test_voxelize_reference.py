"""The batched voxeliser gives exactly SuperFlow's per-cloud NumPy voxels (ravel hash + np.unique),
with per-voxel means of the points instead of the first point's features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord_superflow.benchmarks import reference_pairing, reference_voxelize
from accord_superflow.models.voxelize import cylindrical_voxelize


def clouds(sizes: list[int], seed: int, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Clouds of ``sizes`` points, duplicates included; ``interleaved``: in random order (ids mixed),
    else cloud after cloud (the grouped fast path)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    xyz = (torch.rand(total, 3, generator=generator) - 0.5) * torch.tensor([40.0, 40.0, 6.0])
    xyz[: total // 4] = xyz[total // 4 : 2 * (total // 4)]  # repeated points share voxels
    points = torch.cat([xyz, 255 * torch.rand(total, 1, generator=generator)], dim=1)
    cloud = torch.cat([torch.full((size,), index) for index, size in enumerate(sizes)])
    order = torch.randperm(total, generator=generator) if interleaved else torch.arange(total)
    return points[order], cloud[order]


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize(("sizes", "voxel_size"), [([500, 1, 300], (0.1, 1.0, 0.1)), ([800, 800], (2.0, 20.0, 1.0))])
def test_voxels_equal_the_reference_per_cloud(sizes: list[int], voxel_size: tuple[float, float, float],
                                              interleaved: bool) -> None:
    points, cloud = clouds(sizes, seed=len(sizes), interleaved=interleaved)
    voxels = cylindrical_voxelize(points, cloud, len(sizes), voxel_size)
    reference = reference_voxelize(points.numpy(), cloud.numpy(), len(sizes), voxel_size)
    offset = 0
    for index, (coords, _, inverse) in enumerate(reference):
        rows = slice(offset, offset + len(coords))
        in_cloud = (cloud == index).numpy()
        assert (voxels.coords[rows, 0] == index).all()
        np.testing.assert_array_equal(voxels.coords[rows, 1:].numpy(), coords)
        np.testing.assert_array_equal(voxels.point_to_voxel.numpy()[in_cloud], inverse + offset)
        cloud_points = points.numpy()[in_cloud].astype(np.float64)
        means = np.zeros((len(coords), points.shape[1]))
        np.add.at(means, inverse, cloud_points)
        means /= np.bincount(inverse, minlength=len(coords))[:, None]
        np.testing.assert_allclose(voxels.features[rows].numpy(), means, rtol=1e-6, atol=1e-5)
        offset += len(coords)
    assert offset == len(voxels) and voxels.coords.dtype == torch.int32


def test_int64_keys_when_the_grid_is_too_large_for_int32() -> None:
    # Points near voxel centres of a 20,000 x 36,000 x 40 cell grid per cloud, so float rounding
    # of rho and phi cannot move them across a cell boundary in either implementation.
    generator = torch.Generator().manual_seed(3)
    size = (0.1, 0.01, 0.1)
    cells = torch.stack([torch.randint(10, 20_000, (600,), generator=generator),
                         torch.randint(-17_999, 18_000, (600,), generator=generator),
                         torch.randint(-20, 20, (600,), generator=generator)], dim=1).double()
    polar = (cells + 0.4 * (torch.rand(600, 3, generator=generator, dtype=torch.float64) - 0.5)) * torch.tensor(size)
    phi = torch.deg2rad(polar[:, 1])
    points = torch.stack([polar[:, 0] * phi.cos(), polar[:, 0] * phi.sin(), polar[:, 2]], dim=1).float()
    cloud = torch.arange(600) % 2
    voxels = cylindrical_voxelize(points, cloud, 2, size)
    assert 2 * voxels.spatial_shape[0] * voxels.spatial_shape[1] * voxels.spatial_shape[2] > 2**31
    reference = reference_voxelize(points.numpy(), cloud.numpy(), 2, size)
    np.testing.assert_array_equal(voxels.coords[:, 1:].numpy(), np.concatenate([coords for coords, _, _ in reference]))


def test_reference_pairing_agrees_with_the_composed_projection(_tiny_template, tmp_path) -> None:
    from accord_superflow.data import load_info_index, pair_points_with_cameras
    from accord_superflow.pretrain import load_lidar_points

    index = load_info_index(_tiny_template, "v1.0-mini", "mini_train", max_sweeps=0, cache_dir=tmp_path)
    keyframe = index.keyframes[0]
    points = load_lidar_points(_tiny_template / keyframe.lidar.path)
    cameras = list(keyframe.cameras.values())
    ours = pair_points_with_cameras(points, keyframe.lidar, cameras, min_depth=1.0, margin_px=0.0)
    reference = reference_pairing(points, keyframe.lidar, cameras)
    # Same points per camera except where the two in-image rules differ by half a pixel at the border.
    ours_pairs = set(zip(ours.point_index.tolist(), ours.camera_index.tolist()))
    reference_pairs = set(zip(reference[:, 0].tolist(), reference[:, 1].tolist()))
    assert len(ours_pairs ^ reference_pairs) <= 0.05 * len(reference_pairs) and reference_pairs
