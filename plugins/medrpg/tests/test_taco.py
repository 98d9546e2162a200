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


def reference_text(tokens, attention, b, text_pool, text_mask, marker_ids):
    """``(h_t, a_t)`` of sample b; ``marker`` pools the text slots strictly between the first two markers
    (ids == MARKER_ID), features and attention rows of the same slots (the reference takes the attention
    rows one sequence slot earlier; the fix is listed in docs/medrpg.md)."""
    if text_pool == "cls":
        return tokens[b, 1], attention[b, 1]
    if text_pool == "reg":
        return tokens[b, 0], attention[b, 0]
    if text_pool == "all":
        return tokens[b, 1:1 + NUM_TEXT].mean(0), attention[b, 1:1 + NUM_TEXT].mean(0)
    if text_pool == "marker":
        markers = [i for i in range(NUM_TEXT) if marker_ids[b][i] == MARKER_ID]
        keep = list(range(markers[0] + 1, markers[1]))
    else:
        keep = [i for i in range(NUM_TEXT) if not text_mask[b, i]]
    return (torch.stack([tokens[b, 1 + i] for i in keep]).mean(0),
            torch.stack([attention[b, 1 + i] for i in keep]).mean(0))


def reference_region(tokens, b, box):
    visual = tokens[b, 1 + NUM_TEXT:].reshape(GRID, GRID, -1)
    x1, y1, x2, y2 = reference_cells(box, GRID)
    return visual[y1:y2, x1:x2].reshape(-1, tokens.shape[-1]).mean(0), (x1, y1, x2, y2)


def cosine(t, v):
    return torch.dot(t, v) / max(t.norm() * v.norm(), torch.tensor(1e-8))


def reference_batch_taco(tokens, attention, boxes, temperature, text_pool, text_mask=None, marker_ids=None):
    """The cross-batch mode as GLoRIA writes it, the temperature being the one passed in."""
    batch = tokens.shape[0]
    regions = [reference_region(tokens, b, boxes[b, 0].tolist())[0] for b in range(batch)]
    texts = [reference_text(tokens, attention, b, text_pool, text_mask, marker_ids)[0] for b in range(batch)]
    scores = [[cosine(regions[i], texts[j]) / temperature for j in range(batch)] for i in range(batch)]
    image_to_text = sum(torch.logsumexp(torch.stack(scores[i]), 0) - scores[i][i] for i in range(batch)) / batch
    text_to_image = sum(torch.logsumexp(torch.stack([scores[i][j] for i in range(batch)]), 0) - scores[j][j]
                        for j in range(batch)) / batch
    return image_to_text + text_to_image


def reference_taco(tokens, attention, boxes, temperature, mode, text_pool, text_mask=None, marker_ids=None):
    if mode == "batch":
        return reference_batch_taco(tokens, attention, boxes, temperature, text_pool, text_mask, marker_ids)
    losses = []
    for b in range(tokens.shape[0]):
        visual_attention = attention[b, 1 + NUM_TEXT:].reshape(GRID, GRID, -1)
        h_t, a_t = reference_text(tokens, attention, b, text_pool, text_mask, marker_ids)
        logits = []
        for k in range(boxes.shape[1]):
            h_k, (x1, y1, x2, y2) = reference_region(tokens, b, boxes[b, k].tolist())
            t, v = h_t, h_k
            if mode != "max_image":
                a_k = visual_attention[y1:y2, x1:x2].reshape(-1, tokens.shape[1]).mean(0)
                q = a_t * a_k * (attention[b, 0] if mode == "max_image_lcpTriple" else 1)
                q = q / (q.sum() + 1e-5)
                c = sum(q[slot] * tokens[b, slot] for slot in range(tokens.shape[1]))
                t, v = h_t + c, h_k + c
            logits.append(cosine(t, v) / temperature)
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


#: Token ids of the L text slots with markers (id 7): spans of 1 token at the end, 2 tokens, 1 token.
MARKER_ID = 7
MARKER_IDS = [[2, 7, 30, 7], [7, 31, 32, 7], [7, 41, 7, 3]]


def marker_span_of(ids):
    """The span mask as the tokenizer builds it (tested against real phrases below)."""
    is_marker = torch.tensor(ids) == MARKER_ID
    return (is_marker.cumsum(1) == 1) & ~is_marker


@pytest.mark.parametrize("mode", ["max_image_lcpTriple", "max_image_lcp", "max_image", "batch"])
@pytest.mark.parametrize("text_pool", ["cls", "mask", "all", "reg", "marker"])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_taco_matches_loop_reference_values_and_gradients(mode, text_pool, temperature):
    tokens, attention, boxes, text_mask = inputs()
    tokens_a, attention_a = tokens.clone().requires_grad_(), attention.clone().requires_grad_()
    tokens_b, attention_b = tokens.clone().requires_grad_(), attention.clone().requires_grad_()
    out = taco_loss(tokens_a, attention_a, boxes, num_text=NUM_TEXT, temperature=temperature, mode=mode,
                    text_pool=text_pool, text_mask=text_mask, marker_span=marker_span_of(MARKER_IDS))
    expected = reference_taco(tokens_b, attention_b, boxes, temperature, mode, text_pool, text_mask, MARKER_IDS)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(tokens_a.grad, tokens_b.grad)
    torch.testing.assert_close(attention_a.grad, attention_b.grad)
    assert out.logits.shape == ((3, 3) if mode == "batch" else (3, 4)) and out.region_features.shape == (3, 4, DIM)
    if mode == "batch":
        assert out.context is None and out.context_weights is None


def test_batch_mode_is_symmetric_infonce_of_gt_regions_and_phrases():
    from accord.losses import info_nce

    tokens, attention, boxes, _ = inputs()
    out = taco_loss(tokens, attention, boxes, num_text=NUM_TEXT, mode="batch", temperature=0.2)
    gt_regions = out.region_features[:, 0]
    expected = (info_nce(gt_regions, out.text_features, temperature=0.2)
                + info_nce(out.text_features, gt_regions, temperature=0.2))
    torch.testing.assert_close(out.loss, expected)
    # The negatives play no part; a batch of one has nothing to contrast.
    moved = boxes.clone()
    moved[:, 1:] = torch.rand_like(moved[:, 1:])
    torch.testing.assert_close(taco_loss(tokens, attention, moved, num_text=NUM_TEXT, mode="batch",
                                         temperature=0.2).loss, out.loss)
    assert taco_loss(tokens[:1], attention[:1], boxes[:1], num_text=NUM_TEXT, mode="batch").loss.item() == 0


def test_marker_span_from_phrases():
    from accord_medrpg.models import PhraseTokenizer, train_vocabulary

    phrases = ["there is a *large right pneumothorax* today", "*cardiomegaly*", "no markers here",
               "two ** adjacent", "*far " + "word " * 20 + "marker*"]
    vocabulary = train_vocabulary(phrases, 500)
    tokenizer = PhraseTokenizer(vocabulary, max_length=12)
    span = tokenizer.marker_span(phrases[:2])
    ids, _ = tokenizer(phrases[:2])
    assert [vocabulary[i] for i in ids[0][span[0]].tolist()] == ["large", "right", "pneumothorax"]
    assert [vocabulary[i] for i in ids[1][span[1]].tolist()] == ["cardiomegaly"]
    for bad, message in ((phrases[2], "fewer than two"), (phrases[3], "no token between"),
                         (phrases[4], "fewer than two")):  # the last one's closing marker is cut off
        with pytest.raises(ValueError, match=message) as error:
            tokenizer.marker_span([bad])
        assert repr(bad) in str(error.value) and "first 10 tokens" in str(error.value)
    with pytest.raises(ValueError, match="no '\\*' token"):
        PhraseTokenizer(train_vocabulary(["no markers"], 50), max_length=8).marker_span(["*a*"])


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
    with pytest.raises(ValueError, match="marker_span"):
        taco_loss(tokens, attention, boxes, num_text=NUM_TEXT, text_pool="marker")
    empty = marker_span_of(MARKER_IDS)
    empty[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] mark no token"):
        taco_loss(tokens, attention, boxes, num_text=NUM_TEXT, text_pool="marker", marker_span=empty)


def test_taco_weight_ramp():
    assert taco_weight(0, 90) == 0.0
    assert taco_weight(45, 90) == pytest.approx(0.05 * 0.5 ** 0.9)
    assert taco_weight(89, 90) == pytest.approx(0.05 * (89 / 90) ** 0.9)
