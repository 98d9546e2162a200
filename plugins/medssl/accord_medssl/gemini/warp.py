"""Dense warping with a displacement field, validity masks and deformation quality measures.

Conventions (medssl §2.4): a flow ``phi`` is a ``(B, d, *spatial)`` displacement in **voxel units**
whose channel ``i`` displaces spatial axis ``i`` of the tensor (``(D, H, W)`` in 3D, ``(H, W)`` in
2D), and ``warp(I, phi)(x) = I(x + phi(x))`` with zero padding outside the image. ``phi_AB`` lives
on B's grid: ``warp(A, phi_AB)`` is compared with B.

Two grid conventions:

- ``"correct"`` (default): MONAI's :class:`~monai.networks.blocks.Warp`, which normalises voxel
  indices with ``2 p / (n - 1) - 1`` and samples with ``align_corners=True``, so a zero flow is
  exactly the identity (tested against a plain loop warp in ``test_gemini_warp.py``);
- ``"reference"``: the GEMINI code's ``SpatialTransformer``, which normalises the same way but
  samples with ``align_corners=False``: a zero flow then shrinks the image by half a voxel per side
  towards its centre. Kept so published settings can be reproduced.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

__all__ = [
    "WarpConvention",
    "folding_stats",
    "inverse_consistency_error",
    "jacobian_determinant",
    "validity_mask",
    "warp",
]

WarpConvention = Literal["correct", "reference"]
SampleMode = Literal["bilinear", "nearest"]


@functools.cache
def _monai_warp(mode: SampleMode) -> Warp:
    # MONAI warns on every construction that it uses torch's grid_sample; one layer per mode.
    # Its reference-grid cache is keyed on shape only, so the layer is only used through
    # ``_warp_correct``, which hands it flows of the image's dtype and device.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Warp(mode=mode, padding_mode="zeros")


def _warp_correct(image: torch.Tensor, flow: torch.Tensor, mode: SampleMode) -> torch.Tensor:
    layer = _monai_warp(mode)
    if layer.ref_grid is not None and (layer.ref_grid.device != flow.device or layer.ref_grid.dtype != flow.dtype):
        layer.ref_grid = None  # MONAI's cache would add a grid of another device or dtype
    return layer(image, flow)


def _warp_reference(image: torch.Tensor, flow: torch.Tensor, mode: SampleMode) -> torch.Tensor:
    spatial = flow.shape[2:]
    axes = torch.meshgrid(*[torch.arange(size, dtype=flow.dtype, device=flow.device) for size in spatial], indexing="ij")
    positions = torch.stack(axes)[None] + flow
    normalised = [2 * (positions[:, i] / (size - 1) - 0.5) for i, size in enumerate(spatial)]
    grid = torch.stack(normalised[::-1], dim=-1)  # grid_sample wants (x, y[, z]) = reversed axes
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp(
    image: torch.Tensor,
    flow: torch.Tensor,
    mode: SampleMode = "bilinear",
    convention: WarpConvention = "correct",
) -> torch.Tensor:
    """Sample ``image`` at ``x + flow(x)``: ``out(x) = image(x + flow(x))``, zeros outside.

    Args:
        image: ``(B, C, *spatial)`` with 2 or 3 spatial axes.
        flow: ``(B, d, *spatial)`` displacement in voxels, channel ``i`` along spatial axis ``i``.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (masks and labels).
        convention: ``"correct"`` (zero flow = identity) or ``"reference"`` (GEMINI's half-voxel
            mismatch), see the module docstring.

    Returns:
        ``(B, C, *spatial)``, the dtype of ``image``.

    Raises:
        ValueError: ``flow`` does not match ``image``'s batch and spatial shape.
    """
    dims = image.dim() - 2
    if dims not in (2, 3) or flow.shape != (image.shape[0], dims, *image.shape[2:]):
        raise ValueError(
            f"flow: expected shape {(image.shape[0], dims, *image.shape[2:])} for image {tuple(image.shape)}, "
            f"got {tuple(flow.shape)}"
        )
    flow = flow.to(image.dtype)
    if convention == "correct":
        return _warp_correct(image, flow, mode)
    if convention == "reference":
        return _warp_reference(image, flow, mode)
    raise ValueError(f"convention: expected 'correct' or 'reference', got {convention!r}")


def validity_mask(
    flow: torch.Tensor, mode: SampleMode = "nearest", convention: WarpConvention = "correct"
) -> torch.Tensor:
    """``M = stop_gradient(warp(1, flow))``: 1 where ``x + flow(x)`` lands inside the image.

    GEMINI samples the mask with ``nearest``; its 2D chest trainer uses ``bilinear``, which gives
    fractional weights at the border.

    Args:
        flow: ``(B, d, *spatial)`` in voxels.

    Returns:
        ``(B, 1, *spatial)``, detached.
    """
    ones = torch.ones((flow.shape[0], 1, *flow.shape[2:]), dtype=flow.dtype, device=flow.device)
    with torch.no_grad():
        return warp(ones, flow.detach(), mode, convention)


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + flow(x)`` by central differences.

    Args:
        flow: ``(B, d, *spatial)`` in voxels, d = 2 or 3.

    Returns:
        ``(B, *(s - 2 for s in spatial))``: the interior voxels (the border has no central difference).
    """
    dims = flow.dim() - 2
    columns = []  # column j: d(phi) / d(x_j) on the interior, (B, d, *interior)
    for axis in range(dims):
        size = flow.shape[2 + axis]
        difference = (flow.narrow(2 + axis, 2, size - 2) - flow.narrow(2 + axis, 0, size - 2)) / 2
        for other in range(dims):
            if other != axis:
                difference = difference.narrow(2 + other, 1, flow.shape[2 + other] - 2)
        columns.append(difference)
    jacobian = torch.stack(columns, dim=-1).movedim(1, -2)  # (B, *interior, d, d): [..., i, j]
    jacobian = jacobian + torch.eye(dims, dtype=flow.dtype, device=flow.device)
    return torch.linalg.det(jacobian)


def folding_stats(flow: torch.Tensor) -> dict[str, float]:
    """``{"folding_percent": % of interior voxels with det J <= 0, "min_jacobian": min det J}``."""
    determinant = jacobian_determinant(flow.detach().float())
    return {
        "folding_percent": float((determinant <= 0).float().mean() * 100),
        "min_jacobian": float(determinant.min()),
    }


def inverse_consistency_error(
    flow_ab: torch.Tensor, flow_ba: torch.Tensor, convention: WarpConvention = "correct"
) -> torch.Tensor:
    """Mean distance (voxels) by which the round trip A -> B -> A misses its start.

    ``phi_BA`` lives on A's grid and sends ``x`` to ``y = x + phi_BA(x)`` on B's grid; ``phi_AB``
    sends ``y`` back to ``y + phi_AB(y)``. Inverse flows give ``phi_BA(x) + phi_AB(x + phi_BA(x)) =
    0``; the error averages the norm of that residual over the voxels whose ``y`` is inside the image.

    Args:
        flow_ab, flow_ba: ``(B, d, *spatial)`` in voxels.

    Returns:
        A scalar tensor (voxels).
    """
    residual = flow_ba + warp(flow_ab, flow_ba, "bilinear", convention)
    inside = validity_mask(flow_ba, "nearest", convention)
    distance = residual.norm(dim=1, keepdim=True)
    return (distance * inside).sum() / inside.sum().clamp_min(1)
