"""DINO-style contrastive denoising queries for rotated boxes (ARS-DETR's ``DnQueryGenerator``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DenoisingQueries", "make_denoising_queries"]


@dataclass
class DenoisingQueries:
    """Noised ground truth fed to the decoder beside the matching queries.

    Query ``g * 2 * T + j`` is group ``g``'s positive copy of target slot ``j`` (``T`` = most targets
    of an image in the batch) and ``g * 2 * T + T + j`` its negative copy; slots past an image's
    own target count are padding.

    Attributes:
        labels: ``(B, S)`` long, noised labels (padding: 0).
        boxes: ``(B, S, 5)`` noised normalised ``(cx, cy, w, h, theta)``.
        valid: ``(B, S)`` bool, a real (non-padding) query.
        positive: ``(B, S)`` bool, a positive copy (trained to reconstruct its target).
        target_index: ``(B, S)`` long, the target a query copies (padding: 0).
        group: ``(B, S)`` long, the query's group.
        attn_mask: ``(S + Q, S + Q)`` bool, True = may not attend: matching queries do not see the
            noised ones, groups do not see each other.
        num_groups: ``G``.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor
    positive: torch.Tensor
    target_index: torch.Tensor
    group: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int

    @property
    def size(self) -> int:
        return self.labels.shape[1]


def make_denoising_queries(labels: list[torch.Tensor], boxes: list[torch.Tensor], num_queries: int,
                           num_classes: int, num_dn: int = 100, label_noise: float = 0.5,
                           box_noise: float = 0.4, angle_noise: float = 0.02,
                           most: int | None = None) -> DenoisingQueries | None:
    """Build ``G = max(1, num_dn // T)`` groups of positive and negative noised copies of the targets.

    * labels: each copy's label is replaced by a random class with probability ``label_noise / 2``
      (DINO);
    * boxes: centre moved by up to ``box_noise * (w, h) / 2`` and sides scaled by ``1 +- box_noise``
      (positives, noise magnitude < 1 in DINO's units); negatives get a magnitude in ``[1, 2)``;
    * angle: ``theta + U(-1, 1) * angle_noise * pi`` (ARS-DETR's 0.02; its unit is read as a
      fraction of pi **[inferred]**).

    Args:
        labels: per image ``(T_b,)`` long.
        boxes: per image ``(T_b, 5)`` normalised ``(cx, cy, w, h, theta)``.
        num_queries: matching queries that follow the noised ones (for the attention mask).
        num_classes: number of classes.
        most: ``T``, the most targets of one image; default: of these images. Under DDP the
            detector passes the global batch's (all ranks then build the same groups and size).

    Returns:
        The queries, or ``None`` when no image has a target (nothing to denoise).
    """
    local_most = max(int(t.shape[0]) for t in labels)
    if most is None:
        most = local_most
    elif most < local_most:
        raise ValueError(f"most={most}: an image here has {local_most} targets")
    if most == 0 or num_dn <= 0:
        return None
    device = boxes[0].device
    groups = max(1, num_dn // most)
    batch = len(labels)
    size = 2 * most * groups
    out_labels = torch.zeros(batch, size, dtype=torch.long, device=device)
    out_boxes = torch.zeros(batch, size, 5, device=device)
    out_boxes[..., 2:4] = 0.1
    valid = torch.zeros(batch, size, dtype=torch.bool, device=device)
    positive = torch.zeros_like(valid)
    target_index = torch.zeros(batch, size, dtype=torch.long, device=device)
    slot = torch.arange(size, device=device)
    group = slot // (2 * most)
    is_positive_slot = (slot % (2 * most)) < most
    for b, (lab, box) in enumerate(zip(labels, boxes)):
        n = lab.shape[0]
        if n == 0:
            continue
        j = slot % most
        rows = (j < n).nonzero()[:, 0]
        copies = j[rows]
        noised_labels = lab[copies].clone()
        flip = torch.rand(rows.shape[0], device=device) < label_noise * 0.5
        noised_labels[flip] = torch.randint(0, num_classes, (int(flip.sum()),), device=device)
        source = box[copies].float()
        sign = torch.randint(0, 2, (rows.shape[0], 4), device=device) * 2.0 - 1.0
        magnitude = torch.rand(rows.shape[0], 4, device=device)
        magnitude = magnitude + (~is_positive_slot[rows]).float()[:, None]  # negatives: [1, 2)
        span = torch.cat([source[:, 2:4] / 2, source[:, 2:4]], dim=1)
        noised = source.clone()
        noised[:, :4] = source[:, :4] + sign * magnitude * span * box_noise
        noised[:, :2] = noised[:, :2].clamp(0.0, 1.0)
        noised[:, 2:4] = noised[:, 2:4].clamp(1e-3, 1.0)
        noised[:, 4] = source[:, 4] + (torch.rand(rows.shape[0], device=device) * 2 - 1) * angle_noise * math.pi
        noised[:, 4] = torch.remainder(noised[:, 4] + math.pi / 2, math.pi) - math.pi / 2
        out_labels[b, rows] = noised_labels
        out_boxes[b, rows] = noised
        valid[b, rows] = True
        positive[b, rows] = is_positive_slot[rows]
        target_index[b, rows] = copies
    total = size + num_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[size:, :size] = True  # matching queries never see the ground-truth copies
    same_group = group[:, None] == group[None, :]
    attn_mask[:size, :size] = ~same_group
    return DenoisingQueries(out_labels, out_boxes, valid, positive, target_index, group.expand(batch, size),
                            attn_mask, groups)
