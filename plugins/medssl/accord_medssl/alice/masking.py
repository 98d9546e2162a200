"""Alice's masked-image-modelling masks: random in-plane blocks extended as tubes through depth.

Alice (medssl §1.7) masks 75 % of the 16 x 16 in-plane blocks of each view and repeats the 2D
block pattern along the whole depth axis. The reference draws one mask per *view* and broadcasts
it over the batch, which crashes for a per-GPU batch above 1 (§1.13, bug 2); here every sample
gets its own mask.

Masked voxels are set to zero (SimMIM-style pixel zeroing, as the reference does), not replaced by
a learned token: inputs are CT windowed to [0, 1], so 0 is "below the window" (air / fat), and
the backbone stays a plain SwinUNETR with no extra parameter to export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from accord.utils.checks import check_tensor

__all__ = ["random_block_mask", "token_mask"]


def _check_spatial_shape(value: Sequence[int], name: str) -> tuple[int, int, int]:
    shape = tuple(value) if isinstance(value, Sequence) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{name}: expected 3 positive ints (D, H, W), got {value!r}")
    return shape


def random_block_mask(
    batch_size: int,
    spatial_shape: Sequence[int],
    block_size: int = 16,
    mask_ratio: float = 0.75,
    depth_axis: int = -1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample random masks of in-plane blocks, constant along the depth axis.

    The two in-plane axes are tiled into ``block_size`` x ``block_size`` blocks; in every sample
    exactly ``ceil(mask_ratio * blocks)`` blocks, drawn independently per sample, are masked over
    the full depth.

    Args:
        batch_size: number of masks ``B``.
        spatial_shape: the volume's three spatial sizes.
        block_size: block edge in voxels; the in-plane sizes must be multiples of it.
        mask_ratio: fraction of blocks to mask, in ``(0, 1)``.
        depth_axis: the spatial axis the tubes run along (0, 1, 2 or -1). The default, the last
            axis, is the axial (superior-inferior) axis of the data layer's ``(X, Y, Z)`` RAS
            volumes and the axis the reference repeats its mask along.
        generator: random source (for reproducible masks).
        device: device of the mask.

    Returns:
        Bool mask ``(B, 1, *spatial_shape)``, True where a voxel is masked.

    Raises:
        ValueError: non-positive ``batch_size`` or ``block_size``, ``mask_ratio`` outside
            ``(0, 1)``, a bad ``depth_axis``, or in-plane sizes that are not multiples of
            ``block_size``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    shape = _check_spatial_shape(spatial_shape, "spatial_shape")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio: expected a value in (0, 1), got {mask_ratio!r}")
    if depth_axis not in (-3, -2, -1, 0, 1, 2):
        raise ValueError(f"depth_axis: expected a spatial axis in 0..2 (or -3..-1), got {depth_axis!r}")
    depth = depth_axis % 3
    plane_axes = [axis for axis in range(3) if axis != depth]
    if any(shape[axis] % block_size for axis in plane_axes):
        raise ValueError(
            f"spatial_shape: in-plane sizes {[shape[a] for a in plane_axes]} (axes {plane_axes}) must be "
            f"multiples of block_size={block_size}"
        )
    grid = [shape[axis] // block_size for axis in plane_axes]
    num_blocks = grid[0] * grid[1]
    # round() first so that e.g. 10 * 0.7 = 7.000000000000001 does not ceil to 8.
    num_masked = math.ceil(round(num_blocks * mask_ratio, 9))
    # A random permutation per sample: its first num_masked blocks are masked.
    order = torch.rand(batch_size, num_blocks, generator=generator, device=device).argsort(dim=1)
    blocks = torch.zeros(batch_size, num_blocks, dtype=torch.bool, device=order.device)
    blocks.scatter_(1, order[:, :num_masked], True)
    plane = blocks.view(batch_size, *grid).repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    # plane is (B, P0, P1) over the two in-plane axes in increasing order; insert the depth axis.
    tubes = plane.unsqueeze(1 + depth).expand(batch_size, *shape)
    return tubes.unsqueeze(1).contiguous()


def token_mask(voxel_mask: torch.Tensor, token_grid: Sequence[int], min_fraction: float = 0.5) -> torch.Tensor:
    """Which tokens of a strided feature grid count as masked.

    A token covers a ``stride``-voxel cube (``stride = spatial / token_grid`` per axis); it is
    masked when at least ``min_fraction`` of its voxels are. Alice's 16-voxel blocks do not align
    with SwinUNETR's stride-32 tokens, hence a fraction rather than iBOT's exact patch mask.

    Args:
        voxel_mask: bool ``(B, 1, D, H, W)`` from :func:`random_block_mask`.
        token_grid: the token grid ``(D', H', W')``; each spatial size must be a multiple of it.
        min_fraction: masked-voxel fraction from which a token counts as masked, in ``(0, 1]``.

    Returns:
        Bool ``(B, D' H' W')`` in the tokens' C-order flattening.

    Raises:
        ValueError: a bad rank or dtype, a grid that does not divide the volume, or a bad fraction.
    """
    check_tensor(voxel_mask, "voxel_mask", shape=(None, 1, None, None, None))
    if voxel_mask.dtype != torch.bool:
        raise ValueError(f"voxel_mask: expected a bool tensor, got {voxel_mask.dtype}")
    grid = _check_spatial_shape(token_grid, "token_grid")
    if any(size % cells for size, cells in zip(voxel_mask.shape[2:], grid)):
        raise ValueError(
            f"token_grid: {grid} does not divide the voxel_mask spatial shape {tuple(voxel_mask.shape[2:])}"
        )
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction: expected a value in (0, 1], got {min_fraction!r}")
    stride = tuple(size // cells for size, cells in zip(voxel_mask.shape[2:], grid))
    fraction = F.avg_pool3d(voxel_mask.float(), kernel_size=stride)
    return (fraction >= min_fraction).flatten(1)
