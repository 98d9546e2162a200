"""L1 + GIoU box loss against a per-sample transcription of TransVG's loss (values and gradients)."""

import pytest
import torch

from accord_medrpg.losses import box_losses


def reference_losses(pred, target):
    l1, giou = [], []
    for p, t in zip(pred, target):
        l1.append(sum(abs(p[i] - t[i]) for i in range(4)))
        px1, py1, px2, py2 = p[0] - p[2] / 2, p[1] - p[3] / 2, p[0] + p[2] / 2, p[1] + p[3] / 2
        tx1, ty1, tx2, ty2 = t[0] - t[2] / 2, t[1] - t[3] / 2, t[0] + t[2] / 2, t[1] + t[3] / 2
        inter = (torch.clamp(torch.minimum(px2, tx2) - torch.maximum(px1, tx1), min=0)
                 * torch.clamp(torch.minimum(py2, ty2) - torch.maximum(py1, ty1), min=0))
        union = p[2] * p[3] + t[2] * t[3] - inter
        hull = (torch.maximum(px2, tx2) - torch.minimum(px1, tx1)) * (torch.maximum(py2, ty2) - torch.minimum(py1, ty1))
        giou.append(1 - (inter / union - (hull - union) / hull))
    return torch.stack(l1).mean(), torch.stack(giou).mean()


def test_box_losses_match_reference_values_and_gradients():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.2
    target = torch.rand(6, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.2
    target[0] = pred[0]  # identical boxes: GIoU = 1
    target[1] = torch.tensor([0.9, 0.9, 0.05, 0.05])  # disjoint: GIoU < 0, gradient kept
    a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ours = box_losses(a, target)
    l1, giou = reference_losses(b, target)
    torch.testing.assert_close(ours["l1"], l1)
    torch.testing.assert_close(ours["giou"], giou)
    (ours["l1"] + ours["giou"]).backward()
    (l1 + giou).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_identical_boxes_cost_nothing_and_bad_shapes_are_refused():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]])
    losses = box_losses(boxes, boxes)
    assert losses["l1"] == 0 and losses["giou"].abs() < 1e-6
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        box_losses(boxes, boxes[0])
