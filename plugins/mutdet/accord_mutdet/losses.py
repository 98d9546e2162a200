"""ARS-DETR / MutDet losses and the Hungarian assigner, as public functions.

Every detection term follows ARS-DETR's head (spec §7), weights applied by the caller
(:data:`LOSS_WEIGHTS`): sigmoid focal classification (alpha 0.25, gamma 2, summed and divided by the
number of matched targets), L1 on normalised ``(cx, cy, w, h)``, GIoU of the *horizontal* box made from
``(cx, cy, w, h)`` (the angle is ignored there, as in ARS-DETR), and binary cross-entropy of the 180
angle logits against AR-CSL soft labels, weighted per box by ``2r / (r + 1)`` and divided by
``num_pos * 180``.

MutDet's alignment loss (:func:`alignment_loss`) is a symmetric InfoNCE over the matched (query,
object) pairs of the whole batch; its two directions are :func:`accord.losses.info_nce`.

Distributed training (DDP) reproduces the single process on the same global batch: the detection
terms divide by the matched-target count of the *global* batch per rank (:func:`rank_normaliser`,
DETR's all-reduced ``num_boxes``), and the alignment loss gathers every rank's matched pairs (with
gradients) so its negatives are the whole global batch's pairs, as on one process.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from accord import dist as adist
from accord.boxes import HungarianMatcher, box_giou, cxcywh_to_xyxy
from accord.losses import info_nce

from accord_mutdet.angle import ARCSLCoder, aspect_ratio_weight

__all__ = [
    "LOSS_WEIGHTS",
    "MATCH_WEIGHTS",
    "Alignment",
    "alignment_loss",
    "angle_bce_loss",
    "angle_cost",
    "box_l1_loss",
    "focal_loss",
    "hbb_giou_loss",
    "match_queries",
    "rank_normaliser",
]

#: ARS-DETR's loss weights: focal 2, L1 2, GIoU 5, angle BCE 2.
LOSS_WEIGHTS = {"cls": 2.0, "bbox": 2.0, "iou": 5.0, "angle": 2.0}
#: ARS-DETR's matching cost weights: focal 2, L1 2, GIoU 5, angle 2.
MATCH_WEIGHTS = {"cls": 2.0, "bbox": 2.0, "iou": 5.0, "angle": 2.0}


def rank_normaliser(count: float, device: torch.device | None = None) -> float:
    """The ``num_pos`` each rank divides its summed loss by so DDP's gradient mean is the global one.

    ``sum over ranks of count / world_size``: a rank's loss ``S_r / (N / W)``, averaged by DDP over
    ``W`` ranks, has the gradient of ``sum_r S_r / N``, the single-process loss of the global batch
    (Deformable DETR's all-reduced ``num_boxes``). ``count`` itself without a process group.
    """
    if not adist.is_distributed():
        return float(count)
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total) / adist.world_size()


def _normaliser(num_pos: float) -> float:
    # DETR-family heads divide by the matched-target count, at least 1 (an image without objects).
    return max(float(num_pos), 1.0)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_pos: float, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss summed over all queries and classes, divided by ``max(num_pos, 1)``.

    RetinaNet's form: ``alpha`` weights the positives, ``1 - alpha`` the negatives. Written here
    (a few lines) because it takes soft one-hot targets directly; torchvision is not a dependency
    and mmcv's compiled ``sigmoid_focal_loss`` has no CPU kernel.

    Args:
        logits: ``(..., C)`` class logits.
        targets: ``(..., C)`` one-hot (or soft) targets; unmatched queries are all zeros.
        num_pos: number of matched targets.
        alpha: positive-class weight.
        gamma: focusing exponent.

    Returns:
        Scalar loss.
    """
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * bce).sum() / _normaliser(num_pos)


def box_l1_loss(pred: torch.Tensor, target: torch.Tensor, num_pos: float) -> torch.Tensor:
    """L1 between matched normalised ``(cx, cy, w, h)`` boxes ``(P, 4)``: summed, divided by ``max(num_pos, 1)``."""
    return (pred - target).abs().sum() / _normaliser(num_pos)


def hbb_giou_loss(pred: torch.Tensor, target: torch.Tensor, num_pos: float) -> torch.Tensor:
    """``sum(1 - GIoU)`` of the horizontal boxes of matched ``(cx, cy, w, h)`` pairs ``(P, 4)``, / ``max(num_pos, 1)``.

    ARS-DETR's ``loss_piou``: the angle is ignored (the AR-CSL term carries it).
    """
    if pred.shape[0] == 0:
        return pred.sum() * 0
    giou = box_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), aligned=True)
    return (1 - giou).sum() / _normaliser(num_pos)


def angle_bce_loss(angle_logits: torch.Tensor, target_boxes: torch.Tensor, num_pos: float,
                   coder: ARCSLCoder | None = None, soft_labels: torch.Tensor | None = None) -> torch.Tensor:
    """AR-CSL angle classification loss of matched queries.

    ``sum_{p, bin} w_p * BCE(logit[p, bin], csl[p, bin]) / (max(num_pos, 1) * 180)`` with
    ``csl = AR-CSL(target_boxes)`` and ``w_p = 2 r_p / (r_p + 1)``.

    Args:
        angle_logits: ``(P, 180)`` logits of the matched queries.
        target_boxes: ``(P, 5)`` le90 target boxes (pixel or normalised: only the angle and the
            aspect ratio are used, and normalisation by a non-square image changes the ratio, so
            pass pixel boxes).
        num_pos: number of matched targets.
        coder: the angle coder (a default one when ``None``).
        soft_labels: ``(P, 180)`` the targets' AR-CSL labels when already computed
            (``coder.encode_boxes(target_boxes)``).

    Returns:
        Scalar loss.
    """
    coder = coder or ARCSLCoder()
    if angle_logits.shape[0] == 0:
        return angle_logits.sum() * 0
    soft = (coder.encode_boxes(target_boxes) if soft_labels is None else soft_labels).to(angle_logits.dtype)
    weight = aspect_ratio_weight(target_boxes).to(angle_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(angle_logits, soft, reduction="none").sum(dim=1)
    return (weight * bce).sum() / (_normaliser(num_pos) * coder.num_bins)


def angle_cost(angle_logits: torch.Tensor, target_boxes: torch.Tensor, coder: ARCSLCoder | None = None,
               soft_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Matching cost of every query's angle logits against every target's AR-CSL label, ``(Q, T)``.

    mmdet's sigmoid ``CrossEntropyLossCost`` form, the mean binary cross-entropy over the 180 bins
    of query ``q`` against target ``t``'s soft label, times ``2 r_t / (r_t + 1)`` as in ARS-DETR's
    assigner (unweighted: multiply by :data:`MATCH_WEIGHTS` ``["angle"]``).

    Args:
        angle_logits: ``(Q, 180)``.
        target_boxes: ``(T, 5)`` le90 pixel boxes.
        soft_labels: ``(T, 180)`` their AR-CSL labels when already computed.
    """
    coder = coder or ARCSLCoder()
    soft = (coder.encode_boxes(target_boxes) if soft_labels is None else soft_labels).to(angle_logits.dtype)
    positive = F.softplus(-angle_logits)  # -log sigmoid(x)
    negative = F.softplus(angle_logits)  # -log(1 - sigmoid(x))
    cost = (positive @ soft.T + negative @ (1 - soft).T) / coder.num_bins
    return cost * aspect_ratio_weight(target_boxes).to(cost.dtype)[None, :]


def match_queries(logits: torch.Tensor, boxes: torch.Tensor, angle_logits: torch.Tensor,
                  targets: Sequence[Mapping[str, torch.Tensor]], coder: ARCSLCoder | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ARS-DETR's Hungarian assignment: costs focal 2, L1 2, horizontal GIoU 5, angle 2 (scipy).

    Args:
        logits: ``(B, Q, C)`` class logits.
        boxes: ``(B, Q, 4)`` predicted normalised ``(cx, cy, w, h)``.
        angle_logits: ``(B, Q, 180)``.
        targets: per image ``{"labels": (T,), "boxes": (T, 4) normalised cxcywh, "pixel_boxes":
            (T, 5) le90 pixels}`` and optionally ``"csl"``: ``(T, 180)`` their AR-CSL labels.

    Returns:
        Per image ``(query_index, target_index)``.
    """
    matcher = HungarianMatcher(class_weight=MATCH_WEIGHTS["cls"], l1_weight=MATCH_WEIGHTS["bbox"],
                               iou_weight=MATCH_WEIGHTS["iou"], class_cost="focal", iou_cost="giou")
    with torch.no_grad():
        extra = [MATCH_WEIGHTS["angle"] * angle_cost(angle_logits[b].float(), t["pixel_boxes"].float(), coder,
                                                     t.get("csl"))
                 if t["pixel_boxes"].shape[0] else angle_logits.new_zeros(angle_logits.shape[1], 0)
                 for b, t in enumerate(targets)]
    return matcher(logits.float(), boxes.float(), targets, extra_costs=extra)


class Alignment(NamedTuple):
    """Result of :func:`alignment_loss`.

    Attributes:
        loss: scalar; exactly 0 (with a zero gradient) when there are fewer than one matched pair.
        pos_sim: mean cosine of the matched pairs (NaN when there are none).
        neg_sim: mean cosine over the ``P x P`` matrix with the diagonal set to 0 (the reference's
            logging), NaN when there are none.
        num_pairs: ``P``.
    """

    loss: torch.Tensor
    pos_sim: torch.Tensor
    neg_sim: torch.Tensor
    num_pairs: int


def alignment_loss(pred_features: Sequence[torch.Tensor], object_embeddings: Sequence[torch.Tensor],
                   query_index: Sequence[torch.Tensor], target_index: Sequence[torch.Tensor],
                   tau: float = 0.2) -> Alignment:
    """MutDet's contrastive alignment loss L_ca over the matched pairs of a whole batch.

    With ``q = normalise(pred_features[b][query_index[b]])`` and
    ``k = normalise(object_embeddings[b][target_index[b]])`` concatenated over images (``P`` pairs),
    ``logits = q k^T / tau`` and::

        L_ca = 2 tau * [ CE(logits, arange(P)) + CE(logits^T, arange(P)) ]

    (``= 0.4 (CE + CE)`` at ``tau = 0.2``): every other matched pair of the batch, from any image, is a
    negative. Each direction is :func:`accord.losses.info_nce`. With no pair at all the reference
    takes the cross-entropy of an empty batch (NaN); here the loss is 0 with zero gradients.

    Under a process group (DDP) the batch is the global one: each rank's pairs are gathered with
    gradients (the reference ran on one GPU, so its negatives were its whole batch), this rank's rows
    are contrasted against all ranks' pairs, and the row sum is divided by ``P_global / world_size``
    so DDP's gradient mean equals the single-process gradient. ``pos_sim`` / ``neg_sim`` are this
    rank's pairs only. Every rank must call it (collectives), also with no pairs of its own.

    Args:
        pred_features: per image ``(Q_b, D)`` predicted embeddings (queries or encoder tokens).
        object_embeddings: per image ``(N_b, D)`` target embeddings (MutDet: the enhanced ``O_enh``).
        query_index: per image ``(P_b,)`` long, matched rows of ``pred_features[b]``.
        target_index: per image ``(P_b,)`` long, matched rows of ``object_embeddings[b]``.
        tau: temperature (MutDet 0.2); the outer factor is ``2 tau``.

    Returns:
        :class:`Alignment` (loss, pos_sim, neg_sim, num_pairs).
    """
    if not (len(pred_features) == len(object_embeddings) == len(query_index) == len(target_index)):
        raise ValueError("alignment_loss: pred_features, object_embeddings, query_index and target_index need one "
                         f"entry per image, got {len(pred_features)}, {len(object_embeddings)}, "
                         f"{len(query_index)}, {len(target_index)}")
    if not tau > 0:
        raise ValueError(f"tau: expected > 0, got {tau!r}")
    for b, (qi, ti) in enumerate(zip(query_index, target_index)):
        if qi.shape != ti.shape or qi.ndim != 1:
            raise ValueError(f"query_index[{b}], target_index[{b}]: expected two (P,) tensors, got "
                             f"{tuple(qi.shape)} and {tuple(ti.shape)}")
    q = torch.cat([f[i] for f, i in zip(pred_features, query_index)])
    k = torch.cat([e[i] for e, i in zip(object_embeddings, target_index)])
    pairs = q.shape[0]
    sizes = [int(n) for n in adist.gather_no_grad(torch.tensor([pairs], device=q.device)).tolist()]
    total = sum(sizes)
    if total == 0:
        zero = sum(f.sum() * 0 for f in pred_features) + sum(e.sum() * 0 for e in object_embeddings)
        nan = torch.tensor(float("nan"))
        return Alignment(zero, nan, nan, 0)
    # Every rank's pairs (with gradients) are the columns: negatives span the global batch.
    (all_q, _), (all_k, _) = (adist.gather_rows(rows, with_grad=True, counts=sizes) for rows in (q, k))
    if pairs == 0:  # nothing to contrast here, but the gathers' backward must run on every rank
        nan = torch.tensor(float("nan"))
        return Alignment((all_q.sum() + all_k.sum()) * 0, nan, nan, 0)
    own = torch.arange(pairs, device=q.device) + sum(sizes[: adist.rank()])
    forward = info_nce(q, all_k, temperature=tau, positive_index=own, reduction="sum")
    backward = info_nce(k, all_q, temperature=tau, positive_index=own, reduction="sum")
    # sum over this rank's rows / (global pairs / world size): DDP's mean gives the global mean
    loss = 2 * tau * (forward + backward) / (total / adist.world_size())
    with torch.no_grad():
        cos = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T
        pos_sim = cos.diagonal().mean()
        neg_sim = (cos - torch.diag_embed(cos.diagonal())).mean()
    return Alignment(loss, pos_sim, neg_sim, pairs)

