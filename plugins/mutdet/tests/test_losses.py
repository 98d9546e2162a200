"""Detection losses, the ARS-DETR assignment and MutDet's alignment loss against plain loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from accord_mutdet.angle import ARCSLCoder
from accord_mutdet.losses import (
    alignment_loss,
    angle_bce_loss,
    angle_cost,
    box_l1_loss,
    focal_loss,
    hbb_giou_loss,
    match_queries,
)


def test_focal_loss_matches_the_formula_with_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(3, 5, dtype=torch.float64)
    targets[0, 1] = targets[2, 4] = 1
    loss = focal_loss(logits, targets, num_pos=2)
    expected = 0.0
    for i in range(3):
        for c in range(5):
            p = torch.sigmoid(logits[i, c])
            if targets[i, c]:
                expected = expected - 0.25 * (1 - p) ** 2 * torch.log(p)
            else:
                expected = expected - 0.75 * p**2 * torch.log(1 - p)
    expected = expected / 2
    assert torch.allclose(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, grad_ref)
    # no positives: divided by 1
    none = torch.zeros_like(targets)
    assert torch.allclose(focal_loss(logits, none, 0), focal_loss(logits, none, 1))


def test_l1_and_giou_losses():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.35, 0.3, 0.1, 0.2]])
    assert torch.isclose(box_l1_loss(pred, target, 2), torch.tensor(0.05 / 2))
    loss = hbb_giou_loss(pred, target, 2)
    # second pair: two 0.1 x 0.2 boxes shifted by 0.05 in x -> IoU 1/3, enclosing = union, GIoU = 1/3
    assert torch.isclose(loss, torch.tensor((1 - 1 / 3) / 2), atol=1e-6)
    assert hbb_giou_loss(pred[:0], target[:0], 0) == 0


def test_angle_bce_loss_against_a_loop():
    torch.manual_seed(1)
    coder = ARCSLCoder()
    logits = torch.randn(2, 180, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[10.0, 10, 40, 10, 0.3], [5, 5, 12, 12, -1.0]], dtype=torch.float64)
    loss = angle_bce_loss(logits, boxes, num_pos=2, coder=coder)
    expected = 0.0
    for i in range(2):
        soft = coder.encode_boxes(boxes[i : i + 1])[0]
        r = max(boxes[i, 2] / boxes[i, 3], boxes[i, 3] / boxes[i, 2])
        for b in range(180):
            p = torch.sigmoid(logits[i, b])
            expected = expected - 2 * r / (r + 1) * (soft[b] * torch.log(p) + (1 - soft[b]) * torch.log(1 - p))
    expected = expected / (2 * 180)
    assert torch.allclose(loss, expected)
    assert torch.allclose(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])


def test_angle_cost_is_the_pairwise_weighted_bce():
    torch.manual_seed(2)
    coder = ARCSLCoder()
    logits = torch.randn(3, 180, dtype=torch.float64)
    boxes = torch.tensor([[10.0, 10, 40, 10, 0.3], [5, 5, 12, 6, -1.0]], dtype=torch.float64)
    cost = angle_cost(logits, boxes, coder)
    for q in range(3):
        for t in range(2):
            soft = coder.encode_boxes(boxes[t : t + 1])[0]
            bce = F.binary_cross_entropy_with_logits(logits[q], soft)
            r = boxes[t, 2] / boxes[t, 3]
            assert torch.isclose(cost[q, t], bce * 2 * r / (r + 1))


def test_match_queries_recovers_a_hand_built_assignment():
    # three queries, two targets: query 2 sits on target 0, query 0 on target 1 (box, class and angle)
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.1], [0.1, 0.9, 0.05, 0.05], [0.3, 0.3, 0.2, 0.1]]])
    logits = torch.full((1, 3, 2), -4.0)
    logits[0, 2, 0] = logits[0, 0, 1] = 4.0
    coder = ARCSLCoder()
    pixel = torch.tensor([[30.0, 30, 20, 10, 0.5], [70, 70, 20, 10, -0.7]])
    angles = torch.full((1, 3, 180), -4.0)
    angles[0, 2] = 8 * coder.encode_boxes(pixel[:1])[0] - 4
    angles[0, 0] = 8 * coder.encode_boxes(pixel[1:])[0] - 4
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.1], [0.7, 0.7, 0.2, 0.1]]),
                "pixel_boxes": pixel}]
    (rows, cols), = match_queries(logits, boxes, angles, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "pixel_boxes": torch.zeros(0, 5)}]
    (rows, cols), = match_queries(logits, boxes, angles, empty)
    assert rows.numel() == cols.numel() == 0


def _alignment_reference(preds, objects, qidx, tidx, tau):
    q = torch.cat([F.normalize(p[i], dim=1) for p, i in zip(preds, qidx)])
    k = torch.cat([F.normalize(o[i], dim=1) for o, i in zip(objects, tidx)])
    n = q.shape[0]
    ce_rows = ce_cols = 0.0
    for i in range(n):
        row = torch.stack([q[i] @ k[j] / tau for j in range(n)])
        col = torch.stack([k[i] @ q[j] / tau for j in range(n)])
        ce_rows = ce_rows - torch.log_softmax(row, 0)[i]
        ce_cols = ce_cols - torch.log_softmax(col, 0)[i]
    return 2 * tau * (ce_rows / n + ce_cols / n)


def test_alignment_loss_against_a_loop_values_gradients_symmetry():
    torch.manual_seed(3)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    preds = [leaf(6, 8), leaf(5, 8)]
    objects = [leaf(3, 8), leaf(2, 8)]
    qidx = [torch.tensor([4, 0, 2]), torch.tensor([1, 3])]
    tidx = [torch.tensor([0, 2, 1]), torch.tensor([1, 0])]
    result = alignment_loss(preds, objects, qidx, tidx, tau=0.2)
    expected = _alignment_reference(preds, objects, qidx, tidx, 0.2)
    assert result.num_pairs == 5
    assert torch.allclose(result.loss, expected)
    grads = torch.autograd.grad(result.loss, [*preds, *objects])
    grads_ref = torch.autograd.grad(expected, [*preds, *objects])
    for g, r in zip(grads, grads_ref):
        assert torch.allclose(g, r)
    # symmetric: swapping the roles of predictions and objects leaves the loss unchanged
    swapped = alignment_loss(objects, preds, tidx, qidx, tau=0.2)
    assert torch.allclose(swapped.loss, result.loss)
    # 0.4 x (CE + CE) at tau = 0.2
    q = torch.cat([F.normalize(p[i], dim=1) for p, i in zip(preds, qidx)])
    k = torch.cat([F.normalize(o[i], dim=1) for o, i in zip(objects, tidx)])
    logits = q @ k.T / 0.2
    target = torch.arange(5)
    assert torch.allclose(result.loss, 0.4 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)))
    cos = q @ k.T
    assert torch.isclose(result.pos_sim, cos.diagonal().mean().float())
    assert torch.isclose(result.neg_sim, (cos - torch.diag(cos.diagonal())).mean().float())


def test_alignment_loss_without_pairs_is_zero_not_nan():
    preds = [torch.randn(4, 8, requires_grad=True)]
    objects = [torch.randn(0, 8)]
    empty = [torch.zeros(0, dtype=torch.long)]
    result = alignment_loss(preds, objects, empty, empty)
    assert result.loss.item() == 0 and result.num_pairs == 0 and math.isnan(result.pos_sim.item())
    result.loss.backward()
    assert torch.equal(preds[0].grad, torch.zeros(4, 8))
    with pytest.raises(ValueError, match="one entry per image"):
        alignment_loss(preds, [], empty, empty)
    with pytest.raises(ValueError, match="tau"):
        alignment_loss(preds, objects, empty, empty, tau=0)
