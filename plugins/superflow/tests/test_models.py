"""Cylindrical voxelisation, the spconv CPU patch, the frozen DINOv2 teacher and the heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accord_superflow.models import (
    DinoV2Teacher,
    PixelHead,
    PointHead,
    cylindrical_coordinates,
    cylindrical_voxelize,
    padded_spatial_shape,
    random_dinov2_config,
)


def _clouds(seed: int = 0, sizes=(300, 1, 500)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    parts, ids = [], []
    for cloud, size in enumerate(sizes):
        xyz = torch.randn(size, 3, generator=generator) * torch.tensor([15.0, 15.0, 1.5])
        intensity = torch.rand(size, 1, generator=generator) * 255
        parts.append(torch.cat([xyz, intensity], dim=1))
        ids.append(torch.full((size,), cloud))
    return torch.cat(parts), torch.cat(ids)


def test_cylindrical_coordinates_match_definition():
    xyz = torch.tensor([[1.0, 0.0, 2.0], [0.0, -3.0, -1.0], [-1.0, 1.0, 0.5]])
    expected = torch.tensor([[1.0, 0.0, 2.0], [3.0, -90.0, -1.0], [math.sqrt(2), 135.0, 0.5]])
    assert torch.allclose(cylindrical_coordinates(xyz), expected, atol=1e-5)


def test_voxelize_round_trips_points_to_voxels_and_back():
    points, cloud = _clouds()
    size = (0.1, 1.0, 0.1)
    voxels = cylindrical_voxelize(points, cloud, voxel_size=size)
    quantised = torch.round(cylindrical_coordinates(points[:, :3]) / torch.tensor(size)).long()

    # point -> voxel -> point: every point's voxel holds its own cloud and quantised coordinate.
    coords = voxels.to_points(voxels.coords).long()
    assert torch.equal(coords[:, 0], cloud)
    assert torch.equal(coords[:, 1:] + voxels.origins[cloud], quantised)
    # The voxel centre lies within half a voxel of the point in (rho, phi, z).
    offset = voxels.to_points(voxels.cylindrical_centres()) - cylindrical_coordinates(points[:, :3])
    assert bool((offset.abs() <= torch.tensor(size) / 2 + 1e-4).all())
    # Distinct voxels: no two voxel rows share (cloud, i, j, k); each voxel has a point.
    assert len(torch.unique(voxels.coords, dim=0)) == len(voxels)
    assert torch.equal(torch.unique(voxels.point_to_voxel), torch.arange(len(voxels)))
    # Per-cloud minimum is subtracted: every cloud starts at 0 along each axis.
    for c in range(3):
        assert voxels.coords[voxels.coords[:, 0] == c, 1:].min(0).values.tolist() == [0, 0, 0]


def test_voxel_features_are_point_means_and_cloud_sorted():
    points, cloud = _clouds(1)
    voxels = cylindrical_voxelize(points, cloud)
    for voxel in range(0, len(voxels), max(1, len(voxels) // 50)):
        members = points[voxels.point_to_voxel == voxel]
        assert torch.allclose(voxels.features[voxel], members.mean(0), atol=1e-4)
    assert bool((voxels.coords[1:, 0] >= voxels.coords[:-1, 0]).all()), "mmdet3d reads the batch size off the last row"
    assert voxels.coords.dtype == torch.int32


def test_spatial_shape_is_a_multiple_of_16_that_holds_every_voxel():
    points, cloud = _clouds(2)
    voxels = cylindrical_voxelize(points, cloud)
    shape = torch.tensor(voxels.spatial_shape)
    assert all(s % 16 == 0 for s in voxels.spatial_shape)
    assert bool((voxels.coords[:, 1:].long().max(0).values < shape).all())
    assert bool((voxels.coords[:, 1:].long().max(0).values >= shape - 16).all()), "no more padding than needed"
    assert padded_spatial_shape(torch.tensor([[0, 15, 16]])) == [16, 16, 32]


def test_voxelize_keeps_empty_clouds_and_rejects_bad_input():
    points, _ = _clouds(3, sizes=(50,))
    voxels = cylindrical_voxelize(points, torch.full((50,), 2), num_clouds=4)
    assert voxels.num_clouds == 4
    assert voxels.origins[[0, 1, 3]].abs().sum() == 0
    with pytest.raises(ValueError, match="cloud_index"):
        cylindrical_voxelize(points, torch.full((50,), 4), num_clouds=4)
    with pytest.raises(ValueError, match="voxel_size"):
        cylindrical_voxelize(points, torch.zeros(50, dtype=torch.long), voxel_size=(0.1, 0.0, 0.1))


def test_spconv_unet_pieces_train_on_the_cpu():
    """Forward and backward through SubM, strided and inverse sparse convs (needs the stream patch)."""
    from accord_superflow.models import spconv_compat  # noqa: F401

    import spconv.pytorch as spconv

    net = spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, indice_key="subm0", bias=False),
        spconv.SparseConv3d(8, 8, 2, 2, indice_key="down1", bias=False),
        spconv.SparseInverseConv3d(8, 8, 2, indice_key="down1", bias=False),
    )
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 4, 4, 4], [1, 2, 3, 2]], dtype=torch.int32)
    features = torch.randn(4, 4, requires_grad=True)
    out = net(spconv.SparseConvTensor(features, coords, padded_spatial_shape(coords[:, 1:]), 2))
    out.features.square().sum().backward()
    assert features.grad is not None and bool(features.grad.abs().sum() > 0)
    assert net[0].weight.grad is not None
    # The boundary voxel (index 4 of an odd extent 5) survives the stride-2 round trip.
    assert bool((out.features.abs().sum(1) > 0).all())


@pytest.fixture(scope="module")
def teacher() -> DinoV2Teacher:
    torch.manual_seed(0)
    return DinoV2Teacher.from_config(random_dinov2_config(hidden_size=32, num_layers=2, num_heads=2))


def test_teacher_is_frozen_and_stays_in_eval_mode(teacher):
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not teacher.vit.training
    assert all(not p.requires_grad for p in teacher.parameters())
    images = torch.randint(0, 256, (2, 3, 28, 56), dtype=torch.uint8)
    features = teacher(images)
    assert features.shape == (2, 32, 2, 4)
    assert not features.requires_grad


def test_teacher_returns_last_layer_tokens_before_the_final_layernorm(teacher):
    images = torch.rand(1, 3, 28, 42)
    features = teacher(images)
    pixels = (images - teacher.mean) / teacher.std
    output = teacher.vit(pixel_values=pixels)
    after_norm = output.last_hidden_state[:, 1:].transpose(1, 2).reshape(1, 32, 2, 3)
    assert torch.allclose(teacher.vit.layernorm(features.flatten(2).transpose(1, 2)),
                          output.last_hidden_state[:, 1:], atol=1e-5)
    assert not torch.allclose(features, after_norm, atol=1e-3)
    # uint8 input is scaled to [0, 1] first.
    as_bytes = (images * 255).round().to(torch.uint8)
    assert torch.allclose(teacher(as_bytes), teacher(as_bytes.float() / 255), atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 14"):
        teacher(torch.rand(1, 3, 28, 50))


def test_teacher_loads_a_local_save_pretrained_directory(teacher, tmp_path):
    teacher.vit.save_pretrained(tmp_path / "dinov2")
    loaded = DinoV2Teacher.from_pretrained(tmp_path / "dinov2")
    images = torch.rand(1, 3, 28, 28)
    assert torch.allclose(loaded(images), teacher(images), atol=1e-6)
    with pytest.raises(ValueError, match="not a local Dinov2Model"):
        DinoV2Teacher.from_pretrained(tmp_path / "missing")


def test_heads_project_to_unit_vectors():
    point_head, pixel_head = PointHead(16, 8), PixelHead(32, 8, scale=14)
    points = point_head(torch.randn(10, 16))
    pixels = pixel_head(torch.randn(2, 32, 2, 4))
    assert points.shape == (10, 8) and torch.allclose(points.norm(dim=1), torch.ones(10), atol=1e-5)
    assert pixels.shape == (2, 8, 28, 56)
    assert torch.allclose(pixels.norm(dim=1), torch.ones(2, 28, 56), atol=1e-5)
    # align_corners=True: the corner pixels carry the corner tokens exactly.
    projected = torch.nn.functional.normalize(pixel_head.projection(torch.ones(1, 32, 2, 4)), dim=1)
    assert torch.allclose(pixel_head(torch.ones(1, 32, 2, 4))[..., 0, 0], projected[..., 0, 0], atol=1e-6)
    assert np.isclose(float(pixel_head.scale), 14)
