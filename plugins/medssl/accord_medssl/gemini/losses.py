"""GEMINI's loss terms, exactly as the reference computes them (medssl §2.5).

Step 1 (correspondence / dense contrast), one backward:
``L1 = 0.4 * (smo(phi_AB) + smo(phi_BA)) + 0.8 * GSS + 1.0 * (NCC_M(warp(A, phi_AB), B) + NCC_M(warp(B, phi_BA), A))``
with the GSS stop-gradient routing of :func:`gss_loss`. Step 2 (task), a second backward:
``100 * MSE`` restoration (GEMINI-MIP) or ``100 * (CE + Dice)`` on labelled images (GEMINI-Semi).

Every function takes channel-first tensors ``(B, C, *spatial)`` with 2 or 3 spatial axes; flows are
``(B, d, *spatial)`` displacements in voxels (:mod:`accord_medssl.gemini.warp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from accord_medssl.gemini.warp import SampleMode, WarpConvention, validity_mask, warp

__all__ = [
    "GSS_WEIGHT",
    "NCC_EPS",
    "NCC_WEIGHT",
    "SMOOTH_WEIGHT",
    "TASK_WEIGHT",
    "binary_cross_entropy_loss",
    "box_sum",
    "correspondence_loss",
    "cross_entropy_loss",
    "gss_loss",
    "local_ncc_loss",
    "masked_cosine_loss",
    "restoration_loss",
    "segmentation_loss",
    "smoothness_loss",
    "soft_dice_loss",
]

SMOOTH_WEIGHT = 0.4
GSS_WEIGHT = 0.8
NCC_WEIGHT = 1.0
#: Weight of the step-2 task loss (restoration MSE or CE + Dice).
TASK_WEIGHT = 100.0
#: Added to ``var_I * var_J`` in the local NCC (VoxelMorph's value; smaller ones give NaN/inf).
NCC_EPS = 1e-5
#: The reference's ``smooth`` inside ``log(p + 1e-6)`` of its cross-entropies.
_LOG_EPS = 1e-6


def smoothness_loss(flow: torch.Tensor, penalty: Literal["l2", "l1"] = "l2") -> torch.Tensor:
    """First-order smoothness: ``(1/d) * sum_axes mean(|forward difference|^p)``.

    Args:
        flow: ``(B, d, *spatial)``.
        penalty: ``"l2"`` squares the differences (GEMINI), ``"l1"`` takes their absolute value.

    Returns:
        A scalar; 0 for a constant flow.
    """
    dims = flow.dim() - 2
    total = flow.new_zeros(())
    for axis in range(dims):
        difference = torch.diff(flow, dim=2 + axis)
        total = total + (difference.square() if penalty == "l2" else difference.abs()).mean()
    return total / dims


def box_sum(x: torch.Tensor, window: int, method: Literal["separable", "conv"] = "separable") -> torch.Tensor:
    """Sum of ``x`` over the ``window^d`` box centred on each voxel, zeros outside (``padding = window // 2``).

    ``"separable"`` sums along one axis at a time (``d * window`` additions per voxel instead of
    ``window^d``) with ``avg_pool`` over a ``window``-long line times ``window``: a pooling kernel
    rather than a depthwise convolution, which PyTorch runs far slower on CPU. ``"conv"`` is the
    reference's dense ``window^d`` grouped convolution, kept to show both give the same values
    (tests, the ``gemini_speed`` benchmark).

    Args:
        x: ``(B, C, *spatial)``, 2 or 3 spatial axes.
        window: odd box side.

    Returns:
        ``(B, C, *spatial)``.
    """
    dims = x.dim() - 2
    if method == "conv":
        conv = F.conv3d if dims == 3 else F.conv2d
        channels = x.shape[1]
        return conv(x, x.new_ones((channels, 1, *([window] * dims))), padding=window // 2, groups=channels)
    pool = F.avg_pool3d if dims == 3 else F.avg_pool2d
    for axis in range(dims):
        kernel, padding = [1] * dims, [0] * dims
        kernel[axis], padding[axis] = window, window // 2
        x = pool(x, tuple(kernel), stride=1, padding=tuple(padding), count_include_pad=True) * window
    return x


def local_ncc_loss(
    image: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    window: int = 9,
    eps: float = NCC_EPS,
    method: Literal["separable", "conv"] = "separable",
) -> torch.Tensor:
    """Squared local normalised cross-correlation loss (VoxelMorph's, as GEMINI's ``ncc_loss_mask``).

    The window sums of ``I, J, I^2, J^2, IJ`` are averaged over channels, then
    ``cc = cross^2 / (var_I * var_J + eps)`` per voxel, and the loss is ``1 - mean(cc)`` or, with a
    mask, ``1 - sum(M cc) / sum(M + 1e-6)`` in 3D and ``1 - sum(M cc) / (sum(M) + 1e-5)`` in 2D (the
    reference's two denominators). Computed in at least fp32, whatever the input dtype or autocast.

    Args:
        image, target: ``(B, C, *spatial)``.
        mask: ``(B, 1, *spatial)`` voxel weights (the validity mask), or None.
        window: odd box side (9 in GEMINI).
        eps: added to ``var_I * var_J``.
        method: how the box sums are computed (:func:`box_sum`); the values agree to rounding.

    Returns:
        A scalar; 0 for ``image == target`` wherever the local variance is well above ``eps``.
    """
    with torch.autocast(image.device.type, enabled=False):
        dtype = torch.promote_types(image.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
        image, target = image.to(dtype), target.to(dtype)
        # Channel mean first: the box sum is linear, so this equals averaging the channels' sums.
        stacked = torch.stack([image, target, image * image, target * target, image * target], dim=1).mean(dim=2)
        sums = box_sum(stacked, window, method)
        i_sum, j_sum, i2_sum, j2_sum, ij_sum = sums.unbind(dim=1)
        size = window ** (image.dim() - 2)
        i_mean, j_mean = i_sum / size, j_sum / size
        cross = ij_sum - j_mean * i_sum - i_mean * j_sum + i_mean * j_mean * size
        i_var = i2_sum - 2 * i_mean * i_sum + i_mean * i_mean * size
        j_var = j2_sum - 2 * j_mean * j_sum + j_mean * j_mean * size
        cc = (cross * cross / (i_var * j_var + eps)).unsqueeze(1)
        if mask is None:
            return 1 - cc.mean()
        mask = mask.to(dtype)
        denominator = (mask + 1e-6).sum() if image.dim() == 5 else mask.sum() + 1e-5
        return 1 - (cc * mask).sum() / denominator


def masked_cosine_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - sum_x M(x) <a^(x), b^(x)> / sum_x M(x)`` with channel-wise L2-normalised features.

    Args:
        a, b: ``(B, C, *spatial)`` features.
        mask: ``(B, 1, *spatial)``.

    Returns:
        A scalar; 0 for ``a == b``.
    """
    similarity = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1, keepdim=True)
    return 1 - (similarity * mask).sum() / mask.sum()


def gss_loss(
    features_moving: torch.Tensor,
    features_fixed: torch.Tensor,
    flow: torch.Tensor,
    mask: torch.Tensor,
    feature_weight: float = 0.1,
    flow_weight: float = 1.0,
    convention: WarpConvention = "correct",
) -> torch.Tensor:
    """One direction of GEMINI's geometric semantic similarity, with its two stop-gradient branches.

    ``feature_weight * cos_M(warp(f_mov, sg(phi)), f_fix) + flow_weight * cos_M(warp(sg(f_mov), phi), sg(f_fix))``:
    the first branch trains the features (both ``f_mov`` through the warp and ``f_fix``) and not the
    flow; the second trains the flow, and through it whatever computed the flow (the deformer and,
    since the flow is computed from the features, the backbone too).

    Args:
        features_moving: ``(B, C, *spatial)`` features of the moving image (A for ``phi_AB``).
        features_fixed: ``(B, C, *spatial)`` features of the fixed image (B).
        flow: ``(B, d, *spatial)`` ``phi_AB`` on the fixed grid.
        mask: ``(B, 1, *spatial)`` validity mask of ``flow``.
    """
    feature_branch = masked_cosine_loss(warp(features_moving, flow.detach(), convention=convention), features_fixed, mask)
    flow_branch = masked_cosine_loss(
        warp(features_moving.detach(), flow, convention=convention), features_fixed.detach(), mask
    )
    return feature_weight * feature_branch + flow_weight * flow_branch


def correspondence_loss(
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    flow_ab: torch.Tensor,
    flow_ba: torch.Tensor,
    *,
    weights: Sequence[float] = (SMOOTH_WEIGHT, GSS_WEIGHT, NCC_WEIGHT),
    window: int = 9,
    smoothness: Literal["l2", "l1"] = "l2",
    mask_mode: SampleMode = "nearest",
    convention: WarpConvention = "correct",
) -> dict[str, torch.Tensor]:
    """GEMINI's step-1 loss ``0.4 * SMO + 0.8 * GSS + 1.0 * NCC`` over both directions.

    Args:
        image_a, image_b: ``(B, C, *spatial)`` images.
        features_a, features_b: ``(B, F, *spatial)`` backbone features of the images.
        flow_ab: ``(B, d, *spatial)`` on B's grid (``warp(A, flow_ab)`` ~ B); ``flow_ba`` the reverse.
        weights: the smoothness, GSS and NCC weights.
        window: NCC box side.
        smoothness: ``"l2"`` or ``"l1"`` (:func:`smoothness_loss`).
        mask_mode: validity-mask sampling (``"bilinear"`` in the reference's 2D chest trainer).
        convention: the grid convention (:mod:`accord_medssl.gemini.warp`).

    Returns:
        ``{"loss", "smooth", "gss", "ncc"}`` scalars (the three terms unweighted).
    """
    mask_ab = validity_mask(flow_ab, mask_mode, convention)
    mask_ba = validity_mask(flow_ba, mask_mode, convention)
    smooth = smoothness_loss(flow_ab, smoothness) + smoothness_loss(flow_ba, smoothness)
    gss = gss_loss(features_a, features_b, flow_ab, mask_ab, convention=convention) + gss_loss(
        features_b, features_a, flow_ba, mask_ba, convention=convention
    )
    ncc = local_ncc_loss(warp(image_a, flow_ab, convention=convention), image_b, mask_ab, window) + local_ncc_loss(
        warp(image_b, flow_ba, convention=convention), image_a, mask_ba, window
    )
    smooth_weight, gss_weight, ncc_weight = weights
    return {"loss": smooth_weight * smooth + gss_weight * gss + ncc_weight * ncc, "smooth": smooth, "gss": gss,
            "ncc": ncc}


def restoration_loss(restored: torch.Tensor, target: torch.Tensor, weight: float = TASK_WEIGHT) -> torch.Tensor:
    """GEMINI-MIP's step 2: ``weight * MSE(restored, target)``, both ``(B, C, *spatial)``."""
    return weight * F.mse_loss(restored, target)


def soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean_{b,c} (2 sum yp + 1) / (sum y^2 + sum p^2 + 1)`` (the reference's ``dice_loss``).

    Args:
        probabilities, target: ``(B, K, *spatial)``; ``target`` one-hot (or binary masks).
    """
    axes = tuple(range(2, probabilities.dim()))
    overlap = (target * probabilities).sum(axes)
    dice = (2 * overlap + 1) / (target.square().sum(axes) + probabilities.square().sum(axes) + 1)
    return 1 - dice.mean()


def cross_entropy_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-mean(y log(p + 1e-6))`` over every voxel *and* channel (the reference's 3D ``crossentropy``).

    Args:
        probabilities: ``(B, K, *spatial)`` softmax outputs; ``target``: one-hot, same shape.
    """
    return -(target * torch.log(probabilities + _LOG_EPS)).mean()


def binary_cross_entropy_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-mean(y log(p + 1e-6) + (1 - y) log(1 - p + 1e-6))`` (the reference's 2D ``B_crossentropy``).

    Args:
        probabilities: ``(B, K, *spatial)`` sigmoid outputs; ``target``: binary masks, same shape.
    """
    return -(target * torch.log(probabilities + _LOG_EPS) + (1 - target) * torch.log(1 - probabilities + _LOG_EPS)).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: Literal["softmax", "sigmoid"] = "softmax",
    weight: float = TASK_WEIGHT,
) -> torch.Tensor:
    """GEMINI-Semi's step 2: ``weight * (CE + Dice)`` of a labelled image.

    Args:
        logits: ``(B, K, *spatial)``.
        target: ``(B, K, *spatial)`` one-hot classes (softmax, 3D: mutually exclusive structures) or
            binary masks per structure (sigmoid, 2D chest: overlapping heart, lungs, clavicles).
        activation: ``"softmax"`` with :func:`cross_entropy_loss` or ``"sigmoid"`` with
            :func:`binary_cross_entropy_loss`; :func:`soft_dice_loss` in both.
    """
    if activation == "softmax":
        probabilities = torch.softmax(logits, dim=1)
        ce = cross_entropy_loss(probabilities, target)
    else:
        probabilities = torch.sigmoid(logits)
        ce = binary_cross_entropy_loss(probabilities, target)
    return weight * (ce + soft_dice_loss(probabilities, target))

