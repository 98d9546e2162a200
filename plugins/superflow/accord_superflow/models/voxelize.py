"""Cylindrical voxelisation of a batch of point clouds (SuperFlow's data preprocessor, vectorised).

Per point: ``(rho, phi, z) = (sqrt(x^2 + y^2), atan2(y, x) in degrees, z)``, divided by the voxel
size and **rounded** (as SuperFlow; SLidR floors), then shifted by the cloud's minimum so every
cloud starts at index 0. All clouds of a batch are quantised at once: one integer key per
``(cloud, rho, phi, z)`` and one sort give the voxels (sorted by cloud, so the batch index is
non-decreasing as mmdet3d's ``MinkUNetBackbone`` assumes) and the point -> voxel map. Voxel
features are the **mean** of their points' features (upstream keeps the first point's).

The result is identical to the reference's per-cloud NumPy formulation (ravel hash +
``np.unique``, then the mean): a test checks it. Speed (about 3x that formulation on one thread;
the SuperFlow speed benchmark times both) comes from contiguous 1-D columns, int32 keys where they
fit, keys decoded by truncating division and bincount sums.

The spatial shape is rounded up to a multiple of 16: a ``k=2, s=2`` spconv ``SparseConv3d`` drops
voxels on the upper edge of an odd dimension, and the four stride-2 stages of MinkUNet need every
level even (method spec §2.1, pitfall 12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from accord.utils.checks import check_tensor

__all__ = [
    "DEFAULT_VOXEL_SIZE",
    "SHAPE_MULTIPLE",
    "VoxelBatch",
    "cylindrical_coordinates",
    "cylindrical_voxelize",
    "padded_spatial_shape",
]

#: (rho metres, phi degrees, z metres), SuperFlow's cylindrical grid.
DEFAULT_VOXEL_SIZE = (0.1, 1.0, 0.1)
#: 2 ** (number of stride-2 stages of MinkUNet).
SHAPE_MULTIPLE = 16


@dataclass(frozen=True, eq=False)
class VoxelBatch:
    """Voxels of several point clouds in spconv / mmdet3d batch-first layout.

    Attributes:
        features: ``(V, C)`` mean feature of the points in each voxel.
        coords: ``(V, 4)`` int32 ``(cloud, rho_index, phi_index, z_index)``, sorted by cloud.
        point_to_voxel: ``(N,)`` int64 voxel row of every input point.
        origins: ``(B, 3)`` int64 integer cylindrical coordinate of index 0 in each cloud (the
            per-cloud minimum that was subtracted); zeros for a cloud without points.
        spatial_shape: grid size along (rho, phi, z), a multiple of ``shape_multiple``.
        num_clouds: ``B``, the batch size of the sparse tensor.
        voxel_size: ``(rho, phi, z)`` size in metres, degrees, metres.
    """

    features: torch.Tensor
    coords: torch.Tensor
    point_to_voxel: torch.Tensor
    origins: torch.Tensor
    spatial_shape: tuple[int, int, int]
    num_clouds: int
    voxel_size: tuple[float, float, float]

    def __len__(self) -> int:
        return self.features.shape[0]

    def to_points(self, voxel_values: torch.Tensor) -> torch.Tensor:
        """Per-voxel values ``(V, *)`` broadcast back to the points ``(N, *)``."""
        return voxel_values[self.point_to_voxel]

    def cylindrical_centres(self) -> torch.Tensor:
        """``(V, 3)`` voxel centres in ``(rho, phi_degrees, z)`` (the inverse of the quantisation)."""
        absolute = self.coords[:, 1:].long() + self.origins[self.coords[:, 0].long()]
        return absolute.to(self.features.dtype) * self.features.new_tensor(self.voxel_size)


def padded_spatial_shape(indices: torch.Tensor, multiple: int = SHAPE_MULTIPLE) -> list[int]:
    """Grid size that holds ``(V, 3)`` non-negative voxel indices, rounded up to ``multiple`` per axis."""
    extent = indices.max(dim=0).values + 1
    return [int(math.ceil(int(e) / multiple) * multiple) for e in extent]


def cylindrical_coordinates(xyz: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` Cartesian points -> ``(N, 3)`` ``(rho, phi in degrees in [-180, 180], z)``."""
    rho = torch.hypot(xyz[:, 0], xyz[:, 1])
    phi = torch.rad2deg(torch.atan2(xyz[:, 1], xyz[:, 0]))
    return torch.stack((rho, phi, xyz[:, 2]), dim=1)


def cylindrical_voxelize(
    points: torch.Tensor,
    cloud_index: torch.Tensor,
    num_clouds: int | None = None,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
    shape_multiple: int = SHAPE_MULTIPLE,
) -> VoxelBatch:
    """Quantise a batch of clouds into cylindrical voxels.

    Args:
        points: ``(N, C)`` with ``C >= 3``; columns 0..2 are Cartesian ``x, y, z`` and every column
            (including ``x, y, z``) is averaged into the voxel features.
        cloud_index: ``(N,)`` integer cloud of every point, in ``[0, num_clouds)``.
        num_clouds: batch size; ``None`` uses ``max(cloud_index) + 1``.
        voxel_size: ``(rho, phi, z)`` in metres, degrees, metres.
        shape_multiple: the spatial shape is rounded up to a multiple of this.

    Returns:
        The voxels (see :class:`VoxelBatch`).

    Raises:
        ValueError: bad shapes or dtypes, an empty input, a non-positive voxel size, cloud ids out
            of range.
    """
    check_tensor(points, "points", ndim=2, floating=True)
    check_tensor(cloud_index, "cloud_index", shape=(points.shape[0],), floating=False)
    if points.shape[0] == 0 or points.shape[1] < 3:
        raise ValueError(f"points: expected (N >= 1, C >= 3), got shape {tuple(points.shape)}")
    if len(voxel_size) != 3 or min(voxel_size) <= 0:
        raise ValueError(f"voxel_size: expected three positive sizes (rho, phi, z), got {tuple(voxel_size)}")
    cloud_index = cloud_index.long()
    if num_clouds is None:
        num_clouds = int(cloud_index.max()) + 1
    if int(cloud_index.min()) < 0 or int(cloud_index.max()) >= num_clouds:
        raise ValueError(f"cloud_index: ids must lie in [0, {num_clouds}), "
                         f"got {int(cloud_index.min())}..{int(cloud_index.max())}")

    # Everything runs on contiguous 1-D columns: on the CPU, torch's elementwise kernels over strided
    # (N, C) columns are several times slower (atan2 over a column view was the single largest cost),
    # index_select on a 1-D tensor is an order of magnitude faster than on a 2-D one, and copying
    # columns one by one beats both .T.contiguous() and torch.stack(dim=1) (measured, torch 2.13).
    columns = [points[:, column].contiguous() for column in range(points.shape[1])]
    x, y, z = columns[:3]
    # In place on fresh rows (z itself stays: its column is averaged into the features below).
    polar = (torch.hypot(x, y).div_(voxel_size[0]), torch.atan2(y, x).rad2deg_().div_(voxel_size[1]),
             z / voxel_size[2])
    quantised = [row.round_().long() for row in polar]
    # Per-cloud minimum; clouds without points keep the sentinel and get origin 0.
    sentinel = torch.iinfo(torch.int64).max
    origin_rows = [
        row.new_full((num_clouds,), sentinel).scatter_reduce(0, cloud_index, row, reduce="amin") for row in quantised
    ]
    origin_rows = [torch.where(row == sentinel, torch.zeros_like(row), row) for row in origin_rows]
    local = [row - origin.index_select(0, cloud_index) for row, origin in zip(quantised, origin_rows)]

    shape = [int(math.ceil((int(row.max()) + 1) / shape_multiple) * shape_multiple) for row in local]
    # One integer key per (cloud, rho, phi, z): cloud-major, so sorted keys give cloud-sorted voxels.
    # int32 keys when they fit: sorting them is several times faster than int64.
    key_dtype = torch.int32 if num_clouds * math.prod(shape) <= torch.iinfo(torch.int32).max else torch.int64
    key = cloud_index.to(key_dtype)
    for row, extent in zip(local, shape):
        key = key * extent + row.to(key_dtype)
    sorted_keys, order = torch.sort(key)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    point_to_voxel = torch.empty_like(order)
    point_to_voxel[order] = torch.cumsum(starts, 0) - 1
    # Decode the voxel keys (non-negative, so truncating division is floor division; torch's
    # "trunc" division is several times faster than // and % and than gathering from the points).
    remainder = sorted_keys.masked_select(starts)
    num_voxels = len(remainder)
    coords = torch.empty(num_voxels, 4, dtype=torch.int32, device=points.device)
    for column, extent in ((3, shape[2]), (2, shape[1]), (1, shape[0])):
        quotient = torch.div(remainder, extent, rounding_mode="trunc")
        coords[:, column] = remainder - quotient * extent
        remainder = quotient
    coords[:, 0] = remainder

    # Per-voxel means by bincount over contiguous rows (summed in float64): far faster than
    # index_add_ over (N, C) rows.
    counts = torch.bincount(point_to_voxel, minlength=num_voxels)
    features = points.new_empty(num_voxels, points.shape[1])
    for index, column in enumerate(columns):
        features[:, index] = torch.bincount(point_to_voxel, weights=column, minlength=num_voxels) / counts
    return VoxelBatch(features=features, coords=coords, point_to_voxel=point_to_voxel,
                      origins=torch.stack(origin_rows, dim=1), spatial_shape=(shape[0], shape[1], shape[2]),
                      num_clouds=num_clouds,
                      voxel_size=(float(voxel_size[0]), float(voxel_size[1]), float(voxel_size[2])))
