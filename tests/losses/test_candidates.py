"""Per-row candidate sets in ``info_nce``: a plain loop reference, dense = tiled, padding, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accord.losses import InfoNCELoss, info_nce
from accord.losses.tiled import candidate_logsumexp


def loop_reference(query, key, positive_index, candidates, candidate_mask, temperature, negatives=None):
    """Row by row: the logits list [distinct positives, valid non-positive candidates, negatives]."""
    losses = []
    for row in range(len(query)):
        q = query[row] / query[row].norm()

        def logit(vector):
            return q @ (vector / vector.norm()) / temperature

        positives = [int(p) for p in positive_index[row].reshape(-1)]
        distinct = sorted(set(positives))
        listed = [int(c) for c, real in zip(candidates[row], candidate_mask[row]) if real and int(c) not in distinct]
        logits = [logit(key[p]) for p in distinct] + [logit(key[c]) for c in listed]
        if negatives is not None:
            logits += [logit(n.detach()) for n in negatives]
        target = torch.stack([logit(key[p]) for p in positives]).mean()
        losses.append(torch.logsumexp(torch.stack(logits), dim=0) - target)
    return torch.stack(losses)


def _inputs(n=6, m=9, k=5, dim=4, multi=False, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(n, dim, generator=gen, dtype=dtype)
    key = torch.randn(m, dim, generator=gen, dtype=dtype)
    positive_index = torch.randint(0, m, (n, 3) if multi else (n,), generator=gen)
    candidates = torch.randint(0, m, (n, k), generator=gen)
    mask = torch.rand(n, k, generator=gen) < 0.7
    # Padding may hold anything; -1 is the usual filler.
    candidates = torch.where(mask, candidates, -1)
    if n > 2:
        mask[2] = False  # an all-padded row
        candidates[0, 0] = positive_index[0].reshape(-1)[0]  # a candidate that is the positive
        mask[0, 0] = True
        candidates[1, :2] = 3  # a candidate listed twice
        mask[1, :2] = True
    return query, key, positive_index, candidates, mask


def _loss_and_grads(function, query, key):
    q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
    loss = function(q, k)
    loss.sum().backward()
    return loss.detach(), q.grad, k.grad


def _assert_same_loss_and_grads(function, reference, query, key) -> None:
    for actual, expected in zip(_loss_and_grads(function, query, key), _loss_and_grads(reference, query, key)):
        torch.testing.assert_close(actual, expected)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max error within ``rel`` of the largest magnitude."""
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual - expected).abs().max() / scale).item() <= rel


@pytest.mark.parametrize("multi", [False, True], ids=["one-positive", "multi-positive"])
@pytest.mark.parametrize("tiled, tile_size", [(False, 2048), (True, 1), (True, 5), (True, 64)])
def test_matches_the_loop_reference_in_values_and_gradients(multi: bool, tiled: bool, tile_size: int) -> None:
    query, key, positive_index, candidates, mask = _inputs(multi=multi)
    if multi:
        positive_index[3, 1] = positive_index[3, 0]  # a repeated positive counts once in the normaliser
    negatives = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for extra in ({}, {"negatives": negatives}):
        options = dict(positive_index=positive_index, candidates=candidates, candidate_mask=mask, temperature=0.3)
        _assert_same_loss_and_grads(
            lambda q, k: info_nce(q, k, reduction="none", tiled=tiled, tile_size=tile_size, **options, **extra),
            lambda q, k: loop_reference(q, k, positive_index, candidates, mask, 0.3, extra.get("negatives")),
            query,
            key,
        )


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
def test_gradcheck_float64(tiled: bool) -> None:
    query, key, positive_index, candidates, mask = _inputs(n=5, m=6, k=4)
    query.requires_grad_()
    key.requires_grad_()

    def loss(q, k):
        return info_nce(
            q, k, positive_index=positive_index, candidates=candidates, candidate_mask=mask,
            temperature=0.5, tiled=tiled, tile_size=3,
        )

    assert torch.autograd.gradcheck(loss, (query, key))


def test_tiled_path_saves_no_gathered_candidate_keys(saved_tensor_sizes: list[int]) -> None:
    n, m, k, dim = 64, 40, 16, 8
    query, key, positive_index, candidates, mask = _inputs(n=n, m=m, k=k, dim=dim, dtype=torch.float32, seed=2)
    query.requires_grad_()
    info_nce(
        query, key, positive_index=positive_index, candidates=candidates, candidate_mask=mask, tiled=True, tile_size=8
    ).backward()
    # Inputs, indices and per-row vectors only: nothing near the (N, K, D) gathered keys.
    assert max(saved_tensor_sizes) <= n * k < n * k * dim


def test_candidate_logsumexp_gradcheck_with_an_empty_row() -> None:
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    keys = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    candidates = torch.randint(0, 5, (4, 3), generator=gen)
    valid = torch.tensor([[True, True, False], [False, False, False], [True, True, True], [False, True, True]])
    lse = candidate_logsumexp(query, keys, 1.3, candidates, valid, tile_size=2)
    assert lse[1] == float("-inf") and torch.isfinite(lse[[0, 2, 3]]).all()
    assert torch.autograd.gradcheck(
        lambda q, k: candidate_logsumexp(q, k, 1.3, candidates, valid, tile_size=2)[[0, 2, 3]], (query, keys)
    )


@pytest.mark.parametrize("tile_size", [1, 4, 16])
def test_tiled_equals_dense_float32(tile_size: int) -> None:
    query, key, positive_index, candidates, mask = _inputs(n=37, m=50, k=7, dim=6, dtype=torch.float32, seed=1)
    options = dict(positive_index=positive_index, candidates=candidates, candidate_mask=mask, temperature=0.2)
    dense = _loss_and_grads(lambda q, k: info_nce(q, k, tiled=False, **options), query, key)
    tiled = _loss_and_grads(lambda q, k: info_nce(q, k, tiled=True, tile_size=tile_size, **options), query, key)
    for got, want in zip(tiled, dense):
        _assert_close(got, want)


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
def test_listing_every_key_equals_the_all_keys_loss(tiled: bool) -> None:
    """Batch-wide matched pairs (MutDet): candidates=None and every key listed are the same loss."""
    query, key, positive_index, _, _ = _inputs(n=6, m=9, multi=True)
    every_key = torch.arange(9).expand(6, 9)
    _assert_same_loss_and_grads(
        lambda q, k: info_nce(q, k, positive_index=positive_index, candidates=every_key, tiled=tiled, tile_size=3),
        lambda q, k: info_nce(q, k, positive_index=positive_index),
        query,
        key,
    )


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
def test_all_padded_rows_have_zero_loss_and_gradient(tiled: bool) -> None:
    query, key, _, _, _ = _inputs(n=4, m=5, k=3)
    candidates = torch.tensor([[1, 2, 3], [-1, -1, -1], [0, 0, 0], [7, 7, 7]])
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[0] = True
    loss, query_grad, _ = _loss_and_grads(
        lambda q, k: info_nce(q, k, candidates=candidates, candidate_mask=mask, reduction="none", tiled=tiled),
        query,
        key[:4],
    )
    assert loss[0] > 0 and torch.equal(loss[1:], torch.zeros(3, dtype=loss.dtype))
    assert torch.equal(query_grad[1:], torch.zeros_like(query_grad[1:])) and query_grad[0].abs().sum() > 0
    # With no candidate column at all (K = 0) every row is only its positive.
    none = info_nce(query, key, positive_index=torch.arange(4), candidates=torch.zeros(4, 0, dtype=torch.long))
    assert none == 0


def test_in_image_negatives_taco_style() -> None:
    """One positive region and the other regions of the phrase's image, padded to the largest image."""
    gen = torch.Generator().manual_seed(7)
    regions_per_image = [6, 4]
    image_of_region = torch.repeat_interleave(torch.arange(2), torch.tensor(regions_per_image))
    regions = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    phrases = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    positive = torch.tensor([1, 4, 7])  # phrases 0 and 1 ground in image 0, phrase 2 in image 1
    same_image = image_of_region[None, :] == image_of_region[positive][:, None]  # (3, 10)
    # Each row lists its image's regions first, then padding (index -1).
    order = torch.sort((~same_image).long(), dim=1, stable=True).indices[:, :6]
    mask = same_image.gather(1, order)
    candidates = torch.where(mask, order, -1)
    loss = info_nce(phrases, regions, positive_index=positive, candidates=candidates, candidate_mask=mask)
    expected = loop_reference(phrases, regions, positive, candidates, mask, 0.1).mean()
    torch.testing.assert_close(loss, expected)
    assert mask.sum(dim=1).tolist() == [6, 6, 4]


def test_module_forwards_candidates() -> None:
    query, key, positive_index, candidates, mask = _inputs()
    module = InfoNCELoss(temperature=0.3)
    functional = info_nce(
        query, key, positive_index=positive_index, candidates=candidates, candidate_mask=mask, temperature=0.3
    )
    from_module = module(query, key, positive_index, candidates=candidates, candidate_mask=mask)
    torch.testing.assert_close(from_module, functional)
    with pytest.raises(ValueError, match="candidates: symmetric=True"):
        InfoNCELoss(symmetric=True)(query, key[:6], candidates=candidates)


def test_features_are_normalised_like_the_all_keys_path() -> None:
    query, key, positive_index, candidates, mask = _inputs()
    options = dict(positive_index=positive_index, candidates=candidates, candidate_mask=mask)
    scaled = info_nce(3.0 * query, 0.5 * key, **options)
    plain = info_nce(F.normalize(query, dim=1), key, **options)
    torch.testing.assert_close(scaled, plain)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"candidates": torch.zeros(6, 2)}, "candidates: expected an integer tensor"),
        ({"candidates": torch.zeros(6, 2, dtype=torch.bool)}, "candidates: expected an integer tensor"),
        ({"candidates": torch.zeros(5, 2, dtype=torch.long)}, r"candidates: expected shape \(6, K\)"),
        ({"candidates": torch.zeros(6, dtype=torch.long)}, "candidates: expected a 2-D tensor"),
        ({"candidates": torch.full((6, 2), 9)}, r"candidates: values must be in \[0, 9\)"),
        ({"candidates": torch.full((6, 2), -1)}, r"candidates: values must be in \[0, 9\)"),
        ({"candidate_mask": torch.ones(6, 2, dtype=torch.long)}, "candidate_mask: expected a bool tensor"),
        ({"candidate_mask": torch.ones(6, 3, dtype=torch.bool)}, r"candidate_mask: expected shape \(6, 2\)"),
        ({"candidates": None}, "candidate_mask: given without candidates"),
        ({"positive_index": None, "query_labels": torch.zeros(6, dtype=torch.long),
          "key_labels": torch.zeros(9, dtype=torch.long)}, "candidates: per-row candidates need"),
        ({"in_batch_negatives": False}, "in_batch_negatives: False cannot be combined"),
    ],
)
def test_bad_inputs_name_the_argument(change: dict, message: str) -> None:
    query, key = torch.randn(6, 4), torch.randn(9, 4)
    arguments = dict(
        positive_index=torch.arange(6), candidates=torch.zeros(6, 2, dtype=torch.long),
        candidate_mask=torch.ones(6, 2, dtype=torch.bool),
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        info_nce(query, key, **arguments)


def test_padding_values_are_not_range_checked_and_exclude_self_is_refused() -> None:
    query = torch.randn(4, 3)
    candidates = torch.tensor([[1, 99], [2, -5], [3, 0], [0, 1]])
    mask = torch.tensor([[True, False], [True, False], [True, True], [True, True]])
    assert torch.isfinite(info_nce(query, query, candidates=candidates, candidate_mask=mask))
    with pytest.raises(ValueError, match="exclude_self: cannot be combined with candidates"):
        info_nce(query, query, candidates=candidates, candidate_mask=mask, exclude_self=True)


def test_engine_doc_examples_run() -> None:
    """The three uses in docs/engine.md ("Per-row candidates") run and give finite losses."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    section = doc.split("### Per-row candidates", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    scope: dict = {}
    exec(compile(code, "docs/engine.md", "exec"), scope)
    assert all(torch.isfinite(scope[name]) for name in ("loss_a", "loss_b", "loss_c"))
    assert (scope["in_image"] >= 0).sum(dim=1).tolist() == [6, 6, 4]
