"""MedRPG's box regression loss: L1 + generalised IoU on normalised ``cxcywh`` boxes (TransVG's)."""

from __future__ import annotations

import torch

from accord.boxes import box_giou, cxcywh_to_xyxy

__all__ = ["box_losses"]


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 and GIoU losses of one predicted box per sample, as the reference (both weight 1).

    Args:
        pred: ``(B, 4)`` predicted normalised ``cx, cy, w, h`` (``w, h >= 0``, e.g. after a sigmoid).
        target: ``(B, 4)`` ground truth, same format.

    Returns:
        ``{"l1": (1/B) sum_b ||pred_b - target_b||_1 (sum over the 4 coordinates),
        "giou": (1/B) sum_b (1 - GIoU(xyxy(pred_b), xyxy(target_b)))}``, scalars.
    """
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred and target must both be (B, 4) cxcywh, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    l1 = (pred - target).abs().sum(-1).mean()
    giou = (1 - box_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), aligned=True)).mean()
    return {"l1": l1, "giou": giou}
