"""AR-CSL: ARS-DETR's aspect-ratio-aware circular smooth label angle coder (le90, 180 bins).

An le90 angle ``theta`` in ``[-pi/2, pi/2)`` falls into the one-degree bin
``floor(degrees(theta) + 90)``. Plain CSL puts a fixed window (e.g. a Gaussian) around that bin; AR-CSL
instead gives bin offset ``d`` the IoU between the box and the same box rotated by ``d`` degrees,
min-max normalised to ``[0, 1]``. A square keeps a high target across many bins (its angle hardly
matters), a long thin box a sharp peak. The full 180-bin circle is smoothed (ARS-DETR's
``refine_range`` defaults to half the code length, i.e. everything).

ARS-DETR evaluates that IoU with a closed-form two-case formula; here it comes from mmcv's exact
rotated IoU (:func:`accord.boxes.box_iou_rotated`) of a unit box and its rotated copies, so there is
no formula of our own to get wrong, and the values depend only on the aspect ratio.

Decoding takes the arg-max bin and returns its centre, ``radians(bin + 0.5 - 90)``, so
``decode(encode(theta))`` is within half a degree of ``theta``.
"""

from __future__ import annotations

import math

import torch

from accord.boxes import box_iou_rotated, normalise_le90

__all__ = ["NUM_BINS", "ARCSLCoder", "aspect_ratio", "aspect_ratio_weight"]

#: one-degree bins over the le90 half-circle
NUM_BINS = 180


def aspect_ratio(boxes: torch.Tensor) -> torch.Tensor:
    """Long side over short side of rotated boxes, ``r >= 1``.

    Args:
        boxes: ``(N, 5)`` or ``(N, 4)`` boxes whose columns 2 and 3 are the side lengths (> 0).

    Returns:
        ``(N,)`` aspect ratios.
    """
    w, h = boxes[:, 2], boxes[:, 3]
    if (w <= 0).any() or (h <= 0).any():
        raise ValueError(f"boxes: side lengths must be > 0 to take an aspect ratio, got min w {float(w.min())}, "
                         f"min h {float(h.min())}")
    return torch.maximum(w / h, h / w)


def aspect_ratio_weight(boxes: torch.Tensor) -> torch.Tensor:
    """ARS-DETR's angle-loss and angle-cost weight ``2r / (r + 1)`` (1 for squares, towards 2 for thin boxes).

    Args:
        boxes: ``(N, 5)`` or ``(N, 4)`` boxes with positive sides in columns 2 and 3.

    Returns:
        ``(N,)`` weights in ``[1, 2)``.
    """
    r = aspect_ratio(boxes)
    return 2 * r / (r + 1)


class ARCSLCoder:
    """Encode le90 angles as 180-bin AR-CSL soft labels and decode bin scores back to angles.

    A plain class: it holds no parameters, only the bin layout.
    """

    num_bins = NUM_BINS

    def angle_to_bin(self, angles: torch.Tensor) -> torch.Tensor:
        """The bin of each le90 angle (radians, wrapped into ``[-pi/2, pi/2)`` first), ``long``."""
        wrapped = torch.remainder(angles + math.pi / 2, math.pi)
        bins = torch.floor(torch.rad2deg(wrapped)).long()
        return bins.clamp_(0, NUM_BINS - 1)

    def smoothing(self, ratios: torch.Tensor) -> torch.Tensor:
        """Soft-label value of each bin offset ``d = -90 .. 89`` for boxes of the given aspect ratios.

        Args:
            ratios: ``(N,)`` aspect ratios ``>= 1``.

        Returns:
            ``(N, 180)``: column ``d + 90`` is the normalised IoU of a box with its copy rotated by
            ``d`` degrees; column 90 (``d = 0``) is 1.
        """
        n = ratios.shape[0]
        offsets = torch.deg2rad(torch.arange(-90, 90, dtype=torch.float32, device=ratios.device))
        unit = torch.zeros(n, NUM_BINS, 5, device=ratios.device)
        unit[..., 2] = ratios.float()[:, None]
        unit[..., 3] = 1.0
        turned = unit.clone()
        turned[..., 4] = offsets
        iou = box_iou_rotated(unit.reshape(-1, 5), turned.reshape(-1, 5), aligned=True).reshape(n, NUM_BINS)
        iou[:, NUM_BINS // 2] = 1.0  # exactly 1 at d = 0 (the float32 kernel gives 1 - 1e-7)
        low = iou.min(dim=1, keepdim=True).values
        # A square's copy turned by 45 degrees is its least-overlapping one, so low < 1 always.
        return (iou - low) / (1 - low)

    def encode(self, angles: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
        """AR-CSL soft labels.

        Args:
            angles: ``(N,)`` le90 angles in radians.
            ratios: ``(N,)`` aspect ratios ``>= 1`` of the same boxes (:func:`aspect_ratio`).

        Returns:
            ``(N, 180)`` targets in ``[0, 1]``, 1 at the angle's bin, circular (bin 179 neighbours bin 0).
        """
        if angles.ndim != 1 or ratios.shape != angles.shape:
            raise ValueError(f"angles, ratios: expected two (N,) tensors, got {tuple(angles.shape)} and "
                             f"{tuple(ratios.shape)}")
        if angles.numel() == 0:
            return angles.new_zeros(0, NUM_BINS)
        centre = self.angle_to_bin(angles)
        values = self.smoothing(ratios)  # indexed by offset + 90
        offsets = torch.arange(-90, 90, device=angles.device)
        columns = torch.remainder(centre[:, None] + offsets, NUM_BINS)
        target = values.new_zeros(angles.shape[0], NUM_BINS)
        return target.scatter_(1, columns, values).to(angles.dtype)

    def encode_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """AR-CSL soft labels of le90 boxes ``(N, 5)``: the angle and aspect ratio of each box."""
        boxes = normalise_le90(boxes)
        return self.encode(boxes[:, 4], aspect_ratio(boxes))

    def decode(self, scores: torch.Tensor) -> torch.Tensor:
        """Angles (radians, in ``[-pi/2, pi/2)``) of the highest-scoring bin centres.

        Args:
            scores: ``(..., 180)`` bin logits or probabilities.

        Returns:
            ``(...)`` angles.
        """
        if scores.shape[-1] != NUM_BINS:
            raise ValueError(f"scores: expected {NUM_BINS} bins in the last dimension, got {tuple(scores.shape)}")
        bins = scores.argmax(dim=-1).to(scores.dtype if scores.is_floating_point() else torch.float32)
        return torch.deg2rad(bins + 0.5 - 90)
