"""Voxel <-> embedding-cell mapping and zero-padded crops.

An embedding map with (integer) stride ``s`` along an axis of ``S`` voxels has ``ceil(S / s)``
cells; cell ``j`` summarises voxels ``[j s, (j + 1) s)`` and its centre is at voxel coordinate
``j s + (s - 1) / 2`` (voxel ``i`` centred at ``i``, the convention of
:func:`accord.matchers.crop_affine`, which gives the same geometry as
``crop_affine(origin=0, size=s * grid, grid_size=grid)``). Hence:

- voxel ``p`` lies in cell ``floor(p / s)``;
- cell ``j`` maps back to the voxel containing its centre, ``j s + s // 2`` (clipped to the last
  voxel when the last cell overhangs the volume).

A stride-2 map built this way is the geometry of SAM's fine embedding, and the reference's
``(idx * 2 + 0.5)`` back-mapping is the same centre before rounding (medssl §1.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accord.utils.checks import check_tensor

__all__ = ["cell_to_voxel", "check_stride", "crop_with_zero_padding", "embedding_grid_shape", "voxel_to_cell"]


def check_stride(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """A positive int stride, or one per spatial axis, as a 3-tuple."""
    strides = (value,) * 3 if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(strides) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in strides):
        raise ValueError(f"{name}: expected a positive int or 3 positive ints, got {value!r}")
    return strides


def _check_shape(value: Sequence[int], name: str) -> tuple[int, int, int]:
    shape = tuple(value) if isinstance(value, Sequence) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{name}: expected 3 positive ints, got {value!r}")
    return shape


def embedding_grid_shape(volume_shape: Sequence[int], stride: int | Sequence[int]) -> tuple[int, int, int]:
    """Cells of an embedding map with ``stride`` over a volume: ``ceil(S / s)`` per axis."""
    shape = _check_shape(volume_shape, "volume_shape")
    strides = check_stride(stride, "stride")
    return tuple(-(-size // step) for size, step in zip(shape, strides))


def _check_indices(indices: torch.Tensor, name: str, upper: Sequence[int]) -> torch.Tensor:
    check_tensor(indices, name, floating=False)
    if indices.ndim == 0 or indices.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape (..., 3), got {tuple(indices.shape)}")
    bound = torch.tensor(upper, device=indices.device)
    if indices.numel() and (bool((indices < 0).any()) or bool((indices >= bound).any())):
        raise ValueError(f"{name}: expected indices in [0, {tuple(upper)}) per axis")
    return indices.long()


def voxel_to_cell(points: torch.Tensor, stride: int | Sequence[int], volume_shape: Sequence[int]) -> torch.Tensor:
    """The embedding cell containing each voxel.

    Args:
        points: integer voxel indices inside the volume.
        stride: the embedding's stride, per axis or one for all.
        volume_shape: the volume's spatial shape (to validate ``points``).

    Returns:
        Long cell indices, ``floor(points / stride)``.

    Shape:
        points: ``(..., 3)``; output: ``(..., 3)``.

    Raises:
        ValueError: non-integer points, a wrong last dim or points outside the volume.
    """
    voxels = _check_indices(points, "points", _check_shape(volume_shape, "volume_shape"))
    return torch.div(voxels, torch.tensor(check_stride(stride, "stride"), device=voxels.device), rounding_mode="floor")


def cell_to_voxel(cells: torch.Tensor, stride: int | Sequence[int], volume_shape: Sequence[int]) -> torch.Tensor:
    """The voxel containing each cell's centre, clipped to the volume.

    Args:
        cells: integer cell indices on the embedding grid of ``volume_shape`` and ``stride``.
        stride: the embedding's stride, per axis or one for all.
        volume_shape: the volume's spatial shape.

    Returns:
        Long voxel indices ``min(cells * stride + stride // 2, S - 1)``.

    Shape:
        cells: ``(..., 3)``; output: ``(..., 3)``.

    Raises:
        ValueError: non-integer cells, a wrong last dim or cells off the grid.
    """
    strides = check_stride(stride, "stride")
    shape = _check_shape(volume_shape, "volume_shape")
    indices = _check_indices(cells, "cells", embedding_grid_shape(shape, strides))
    step = torch.tensor(strides, device=indices.device)
    last_voxel = torch.tensor(shape, device=indices.device) - 1
    return torch.minimum(indices * step + step // 2, last_voxel)


def crop_with_zero_padding(volume: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The box ``[start, start + size)`` of a volume; voxels outside the volume are zero.

    Args:
        volume: ``(C, D, H, W)``.
        start: first voxel of the box per axis (may be negative or reach past the volume).
        size: box size per axis.

    Returns:
        ``(C, *size)``, same dtype and device as ``volume``.

    Raises:
        ValueError: a volume that is not 4-D, or bad ``start`` / ``size``.
    """
    check_tensor(volume, "volume", ndim=4)
    box_size = _check_shape(size, "size")
    box_start = tuple(int(s) for s in start) if isinstance(start, (Sequence, torch.Tensor)) else ()
    if len(box_start) != 3:
        raise ValueError(f"start: expected 3 ints, got {start!r}")
    crop = volume.new_zeros(volume.shape[0], *box_size)
    source, target = [], []
    for first, extent, limit in zip(box_start, box_size, volume.shape[1:]):
        low, high = max(first, 0), min(first + extent, limit)
        if low >= high:  # the box misses the volume along this axis: all zeros
            return crop
        source.append(slice(low, high))
        target.append(slice(low - first, high - first))
    crop[(slice(None), *target)] = volume[(slice(None), *source)]
    return crop
