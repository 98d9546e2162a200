"""Hungarian matching against brute force over all assignments, and the DETR-style matcher."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from accord.boxes import HungarianMatcher, hungarian_match


def _brute_force(cost: torch.Tensor) -> tuple[float, set[tuple[int, int]]]:
    """Smallest total cost over every one-to-one assignment of min(N, M) pairs, and the pairs."""
    rows, cols = cost.shape
    best_total, best_pairs = math.inf, set()
    if rows <= cols:  # every way to give each row its own column
        candidates = (list(enumerate(p)) for p in itertools.permutations(range(cols), rows))
    else:  # every way to give each column its own row
        candidates = (
            [(r, c) for c, r in enumerate(p)] for p in itertools.permutations(range(rows), cols)
        )
    for pairs in candidates:
        total = sum(float(cost[r, c]) for r, c in pairs)
        if total < best_total:
            best_total, best_pairs = total, set(pairs)
    return best_total, best_pairs


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (2, 5), (1, 1)])
def test_hungarian_match_is_the_brute_force_optimum(shape: tuple[int, int]) -> None:
    cost = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    rows, cols = hungarian_match(cost)
    assert rows.dtype == cols.dtype == torch.long and len(rows) == min(shape)
    assert rows.tolist() == sorted(rows.tolist())
    _, best_pairs = _brute_force(cost)
    assert set(zip(rows.tolist(), cols.tolist())) == best_pairs


def test_hungarian_match_on_a_hand_built_cost_and_empty_inputs() -> None:
    # Greedy (take the row minimum first) would pair 0-0 and 1-1 for a total of 1 + 10.
    cost = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    rows, cols = hungarian_match(cost)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]
    for shape in [(0, 3), (3, 0)]:
        rows, cols = hungarian_match(torch.zeros(shape))
        assert rows.shape == cols.shape == (0,) and rows.dtype == torch.long


@pytest.mark.parametrize(
    ("cost", "message"),
    [
        (torch.zeros(3), r"cost: expected a 2-D tensor"),
        (torch.zeros(2, 2, dtype=torch.long), "cost: expected a floating"),
        (torch.tensor([[0.0, float("nan")]]), "cost: contains 1 NaN/Inf"),
    ],
)
def test_hungarian_match_bad_input(cost: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hungarian_match(cost)


def _reference_cost(matcher, logits, boxes, labels, target_boxes) -> torch.Tensor:
    """The matching cost entry by entry, from the formulas in the docstring."""
    cost = torch.zeros(len(logits), len(labels), dtype=torch.float64)
    for q, t in itertools.product(range(len(logits)), range(len(labels))):
        logit = float(logits[q, labels[t]])
        if matcher.class_cost == "softmax":
            class_cost = -float(logits[q].softmax(-1)[labels[t]])
        else:
            p, alpha, gamma = 1 / (1 + math.exp(-logit)), matcher.focal_alpha, matcher.focal_gamma
            positive = alpha * (1 - p) ** gamma * -math.log(p)
            class_cost = positive - (1 - alpha) * p**gamma * -math.log(1 - p)
        l1 = sum(abs(float(a) - float(b)) for a, b in zip(boxes[q, :4], target_boxes[t, :4]))
        (ax, ay, aw, ah), (bx, by, bw, bh) = boxes[q, :4].tolist(), target_boxes[t, :4].tolist()
        a = (ax - aw / 2, ay - ah / 2, ax + aw / 2, ay + ah / 2)
        b = (bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2)
        inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        inter = inter_w * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        union = aw * ah + bw * bh - inter
        hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        giou = inter / union - (hull - union) / hull
        cost[q, t] = (
            matcher.class_weight * class_cost + matcher.l1_weight * l1 - matcher.iou_weight * giou
        )
    return cost


def _image(queries: int, targets: int, classes: int, generator: torch.Generator, box_dim: int = 4):
    """Logits, normalised cxcywh (+ angle) predictions and targets of one image."""
    def boxes(count: int) -> torch.Tensor:
        centre = 0.2 + 0.6 * torch.rand(count, 2, generator=generator, dtype=torch.float64)
        size = 0.05 + 0.3 * torch.rand(count, 2, generator=generator, dtype=torch.float64)
        angle = torch.rand(count, box_dim - 4, generator=generator, dtype=torch.float64)
        angle = (angle - 0.5) * math.pi
        return torch.cat([centre, size, angle], dim=1)

    logits = torch.randn(queries, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (targets,), generator=generator)
    return logits, boxes(queries), {"labels": labels, "boxes": boxes(targets)}


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
def test_cost_matrix_matches_the_formula(class_cost: str) -> None:
    matcher = HungarianMatcher(2.0, 5.0, 2.0, class_cost=class_cost)
    logits, boxes, target = _image(5, 3, 4, torch.Generator().manual_seed(0))
    cost = matcher.cost_matrix(logits, boxes, target["labels"], target["boxes"])
    expected = _reference_cost(matcher, logits, boxes, target["labels"], target["boxes"])
    torch.testing.assert_close(cost, expected)


def test_matcher_per_image_is_the_brute_force_optimum_with_zero_targets_and_extra_costs() -> None:
    generator = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(1.0, 5.0, 2.0)
    images = [_image(4, count, 3, generator) for count in (3, 0, 4)]
    logits = torch.stack([image[0] for image in images])  # (B=3, Q=4, C=3)
    boxes = torch.stack([image[1] for image in images])
    targets = [image[2] for image in images]
    extra = [torch.randn(4, len(t["labels"]), generator=generator).double() for t in targets]
    matches = matcher(logits, boxes, targets, extra_costs=extra)
    assert [len(query) for query, _ in matches] == [3, 0, 4]
    for index, (query, target_index) in enumerate(matches):
        cost = matcher.cost_matrix(logits[index], boxes[index], **_renamed(targets[index]))
        cost = cost + extra[index]
        if cost.shape[1]:
            assert set(zip(query.tolist(), target_index.tolist())) == _brute_force(cost)[1]
        assert query.dtype == target_index.dtype == torch.long


def _renamed(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"target_labels": target["labels"], "target_boxes": target["boxes"]}


def test_matcher_runs_without_gradient_and_skips_zero_weights() -> None:
    logits, boxes, target = _image(3, 2, 2, torch.Generator().manual_seed(2))
    logits.requires_grad_()
    cost = HungarianMatcher(1.0, 0.0, 0.0).cost_matrix(logits.detach(), boxes, **_renamed(target))
    torch.testing.assert_close(cost, -logits.detach().softmax(-1)[:, target["labels"]])
    (query, _), = HungarianMatcher()(logits[None], boxes[None], [target])
    assert not query.requires_grad and len(query) == 2


def test_rotated_boxes_l1_and_giou_ignore_the_angle_and_rotated_iou_uses_it() -> None:
    generator = torch.Generator().manual_seed(3)
    logits, boxes, target = _image(4, 3, 2, generator, box_dim=5)
    matcher = HungarianMatcher(1.0, 2.0, 5.0, class_cost="focal")
    cost = matcher.cost_matrix(logits, boxes, **_renamed(target))
    turned = boxes.clone()
    turned[:, 4] = turned[:, 4] + 0.3
    torch.testing.assert_close(matcher.cost_matrix(logits, turned, **_renamed(target)), cost)
    pytest.importorskip("mmcv.ops", reason="mmcv with compiled ops is not installed")
    from accord.boxes import box_iou_rotated

    rotated = HungarianMatcher(1.0, 2.0, 5.0, class_cost="focal", iou_cost="rotated_iou")
    no_iou = HungarianMatcher(1.0, 2.0, 0.0, class_cost="focal")
    torch.testing.assert_close(
        rotated.cost_matrix(logits, boxes, **_renamed(target)),
        no_iou.cost_matrix(logits, boxes, **_renamed(target))
        - 5.0 * box_iou_rotated(boxes, target["boxes"]),
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, l, b, t: m(l, b, t[:1]), "targets: expected 2 entries"),
        (lambda m, l, b, t: m(l, b[:, :, :3], t), r"boxes: expected shape \(\.\.\., 4\) or"),
        (lambda m, l, b, t: m(l, b, [{"labels": t[0]["labels"]}, t[1]]), r"targets\[0\]: missing"),
        (lambda m, l, b, t: m(l, b, t, extra_costs=[torch.zeros(3, 9)] * 2), r"extra_costs\[0\]"),
        (
            lambda m, l, b, t: m(l, b, [{**t[0], "labels": t[0]["labels"] + 5}, t[1]]),
            "target_labels: values",
        ),
        (lambda m, l, b, t: HungarianMatcher(iou_cost="rotated_iou")(l, b, t), "expects le90"),
        (lambda m, l, b, t: HungarianMatcher(class_weight=-1), "class_weight: expected a non-neg"),
        (lambda m, l, b, t: HungarianMatcher(class_cost="sigmoid"), "class_cost: expected"),
    ],
)
def test_bad_input_names_the_argument(call, message: str) -> None:
    generator = torch.Generator().manual_seed(4)
    images = [_image(3, 2, 2, generator) for _ in range(2)]
    logits = torch.stack([image[0] for image in images])
    boxes = torch.stack([image[1] for image in images])
    with pytest.raises(ValueError, match=message):
        call(HungarianMatcher(), logits, boxes, [image[2] for image in images])
