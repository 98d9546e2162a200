"""TaCo against a plain loop transcription of the reference (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from accord_medrpg.taco import region_cells, taco_loss, taco_weight

NUM_TEXT, GRID, DIM = 4, 5, 6


def reference_cells(box, grid):
    """The reference's cell rounding, one box, Python scalars and slicing semantics."""
    cx, cy, w, h = box
    x1, y1 = max(0, math.floor((cx - w / 2) * grid)), max(0, math.floor((cy - h / 2) * grid))
    x2, y2 = math.floor((cx + w / 2) * grid), math.floor((cy + h / 2) * grid)
    if x1 == x2:
        x1, x2 = max(0, x1 - 1), min(grid, x2 + 1)
    if y1 == y2:
        y1, y2 = max(0, y1 - 1), min(grid, y2 + 1)
    return x1, y1, x2, y2


def reference_taco(tokens, attention, boxes, temperature, mode, text_pool, text_mask=None):
    losses = []
    for b in range(tokens.shape[0]):
        visual = tokens[b, 1 + NUM_TEXT:].reshape(GRID, GRID, -1)
        visual_attention = attention[b, 1 + NUM_TEXT:].reshape(GRID, GRID, -1)
        if text_pool == "cls":
            h_t, a_t = tokens[b, 1], attention[b, 1]
        elif text_pool == "reg":
            h_t, a_t = tokens[b, 0], attention[b, 0]
        elif text_pool == "all":
            h_t, a_t = tokens[b, 1:1 + NUM_TEXT].mean(0), attention[b, 1:1 + NUM_TEXT].mean(0)
        else:
            keep = [i for i in range(NUM_TEXT) if not text_mask[b, i]]
            h_t = torch.stack([tokens[b, 1 + i] for i in keep]).mean(0)
            a_t = torch.stack([attention[b, 1 + i] for i in keep]).mean(0)
        logits = []
        for k in range(boxes.shape[1]):
            x1, y1, x2, y2 = reference_cells(boxes[b, k].tolist(), GRID)
            h_k = visual[y1:y2, x1:x2].reshape(-1, tokens.shape[-1]).mean(0)
            t, v = h_t, h_k
            if mode != "max_image":
                a_k = visual_attention[y1:y2, x1:x2].reshape(-1, tokens.shape[1]).mean(0)
                q = a_t * a_k * (attention[b, 0] if mode == "max_image_lcpTriple" else 1)
                q = q / (q.sum() + 1e-5)
                c = sum(q[slot] * tokens[b, slot] for slot in range(tokens.shape[1]))
                t, v = h_t + c, h_k + c
            logits.append(torch.dot(t, v) / max(t.norm() * v.norm(), torch.tensor(1e-8)) / temperature)
        losses.append(F.cross_entropy(torch.stack(logits)[None], torch.zeros(1, dtype=torch.long)))
    return torch.stack(losses).mean()


def inputs(seed=0, batch=3):
    generator = torch.Generator().manual_seed(seed)
    n = 1 + NUM_TEXT + GRID * GRID
    tokens = torch.randn(batch, n, DIM, generator=generator, dtype=torch.float64)
    attention = torch.randn(batch, n, n, generator=generator, dtype=torch.float64).softmax(-1)
    boxes = torch.tensor([
        [[0.5, 0.5, 0.4, 0.3], [0.9, 0.9, 0.2, 0.2], [0.99, 0.99, 0.01, 0.01], [0.02, 0.5, 0.02, 0.9]],
        [[0.3, 0.7, 0.6, 0.5], [1.0, 0.05, 0.0, 0.1], [0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.05, 0.05]],
        [[0.6, 0.4, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0], [0.7, 0.95, 0.3, 0.1], [0.4, 0.4, 0.25, 0.05]],
    ], dtype=torch.float64)[:batch]
    text_mask = torch.tensor([[False, False, True, True], [False, False, False, False], [False, True, True, True]])
    return tokens, attention, boxes, text_mask[:batch]


@pytest.mark.parametrize("mode", ["max_image_lcpTriple", "max_image_lcp", "max_image"])
@pytest.mark.parametrize("text_pool", ["cls", "mask", "all", "reg"])
def test_taco_matches_loop_reference_values_and_gradients(mode, text_pool):
    tokens, attention, boxes, text_mask = inputs()
    tokens_a, attention_a = tokens.clone().requires_grad_(), attention.clone().requires_grad_()
    tokens_b, attention_b = tokens.clone().requires_grad_(), attention.clone().requires_grad_()
    out = taco_loss(tokens_a, attention_a, boxes, num_text=NUM_TEXT, temperature=0.1, mode=mode,
                    text_pool=text_pool, text_mask=text_mask)
    expected = reference_taco(tokens_b, attention_b, boxes, 0.1, mode, text_pool, text_mask)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(tokens_a.grad, tokens_b.grad)
    torch.testing.assert_close(attention_a.grad, attention_b.grad)
    assert out.logits.shape == (3, 4) and out.region_features.shape == (3, 4, DIM)


def test_region_cells_rounding_and_degenerate_widening_at_the_edges():
    boxes = torch.tensor([
        [0.5, 0.5, 0.4, 0.4],     # [0.3, 0.7] -> cells 1..3 (floor 1.5 = 1, floor 3.5 = 3)
        [0.99, 0.99, 0.01, 0.01],  # one degenerate box at the far corner: widened to [3, 5)
        [0.0, 0.0, 0.0, 0.0],     # degenerate at the origin: [0, 1)
        [0.5, 0.5, 1.0, 1.0],     # the whole canvas
        [1.2, 0.5, 0.1, 0.1],     # beyond the canvas: the edge cell, not an empty region
    ])
    cells = region_cells(boxes, GRID).tolist()
    assert cells[0] == [1, 1, 3, 3]
    assert cells[1] == [3, 3, 5, 5]
    assert cells[2] == [0, 0, 1, 1]
    assert cells[3] == [0, 0, 5, 5]
    assert cells[4] == [4, 1, 5, 3]  # y is degenerate too: [1, 3)
    for box, cell in zip(boxes[:4].tolist(), cells[:4]):
        assert tuple(cell) == reference_cells(box, GRID)


def test_context_weights_sum_to_one_and_zero_context_is_plain_infonce():
    tokens, attention, boxes, _ = inputs()
    out = taco_loss(tokens, attention, boxes, num_text=NUM_TEXT)
    # q_k = p / (sum p + 1e-5): the sum is 1 up to the reference's epsilon (sum p is ~1e-3 here).
    sums = out.context_weights.sum(-1)
    assert ((sums > 0.95) & (sums < 1)).all()
    assert (out.context_weights >= 0).all()
    # Without context, TaCo is InfoNCE of the phrase feature against its own regions.
    plain = taco_loss(tokens, attention, boxes, num_text=NUM_TEXT, mode="max_image")
    cosine = F.cosine_similarity(plain.text_features[:, None], plain.region_features, dim=-1) / 0.1
    torch.testing.assert_close(plain.loss, F.cross_entropy(cosine, torch.zeros(3, dtype=torch.long)))


def test_bad_shapes_are_named():
    tokens, attention, boxes, _ = inputs()
    with pytest.raises(ValueError, match="square number"):
        taco_loss(tokens[:, :-1], attention, boxes, num_text=NUM_TEXT)
    with pytest.raises(ValueError, match="attention must be"):
        taco_loss(tokens, attention[:, 1:], boxes, num_text=NUM_TEXT)
    with pytest.raises(ValueError, match="boxes must be"):
        taco_loss(tokens, attention, boxes[0], num_text=NUM_TEXT)
    with pytest.raises(ValueError, match="mask"):
        taco_loss(tokens, attention, boxes, num_text=NUM_TEXT, text_pool="mask")


def test_taco_weight_ramp():
    assert taco_weight(0, 90) == 0.0
    assert taco_weight(45, 90) == pytest.approx(0.05 * 0.5 ** 0.9)
    assert taco_weight(89, 90) == pytest.approx(0.05 * (89 / 90) ** 0.9)
