"""InfoNCE family vs plain-python references written from the papers, analytic values, invariants
and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accord.losses.infonce import (
    InfoNCELoss,
    NTXentLoss,
    SoftTargetContrastiveLoss,
    SupConLoss,
    info_nce,
)


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.detach().double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(values: list[float]) -> float:
    peak = max(values)
    return peak + math.log(sum(math.exp(v - peak) for v in values))


def ntxent_reference(out0: torch.Tensor, out1: torch.Tensor, temperature: float) -> float:
    """SimCLR Algorithm 1: views 2k-1, 2k of sample k; l(i,j) = -log softmax over k != i."""
    a, b = _unit(out0), _unit(out1)
    n = len(a)
    z = [v for pair in zip(a, b) for v in pair]  # z[2k] and z[2k+1] are the two views of sample k
    sim = [[float(z[i] @ z[j]) for j in range(2 * n)] for i in range(2 * n)]

    def l(i: int, j: int) -> float:
        return -sim[i][j] / temperature + _logsumexp([sim[i][k] / temperature for k in range(2 * n) if k != i])

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def supcon_reference(features: torch.Tensor, labels: list[int], temperature: float) -> float:
    """SupCon eq. 2 (L_out), averaged over anchors: -1/|P(i)| sum_p log(exp(z_i.z_p/T) / sum_a ...)."""
    z = _unit(features)
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        log_denominator = _logsumexp([float(z[i] @ z[a]) / temperature for a in others])
        total += -sum(float(z[i] @ z[p]) / temperature - log_denominator for p in positives) / len(positives)
    return total / len(z)


def cross_entropy_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: float,
    targets: list[list[float]],
    exclude_self: bool = False,
    negatives: torch.Tensor | None = None,
) -> list[float]:
    """Per-row -sum_j t_ij log softmax_j(s_ij) over keys (+ negatives with target 0), own column dropped."""
    q, k = _unit(query), _unit(key)
    negs = _unit(negatives) if negatives is not None else np.zeros((0, q.shape[1]))
    losses = []
    for i in range(len(q)):
        columns = [j for j in range(len(k)) if not (exclude_self and j == i)]
        logits = [float(q[i] @ k[j]) / temperature for j in columns]
        lse = _logsumexp(logits + [float(q[i] @ v) / temperature for v in negs])
        losses.append(-sum(targets[i][j] * (s - lse) for j, s in zip(columns, logits)))
    return losses


def one_hot_targets(index: list[list[int]], n_keys: int) -> list[list[float]]:
    return [[sum(1.0 / len(row) for p in row if p == j) for j in range(n_keys)] for row in index]


def label_targets(query_labels: list[int], key_labels: list[int], exclude_self: bool) -> list[list[float]]:
    rows = []
    for i, label in enumerate(query_labels):
        mask = [float(kl == label and not (exclude_self and j == i)) for j, kl in enumerate(key_labels)]
        rows.append([m / max(sum(mask), 1.0) for m in mask])
    return rows


def soft_targets(
    teacher_query: torch.Tensor, teacher_key: torch.Tensor, temperature: float, exclude_self: bool
) -> list[list[float]]:
    tq, tk = _unit(teacher_query), _unit(teacher_key)
    rows = []
    for i in range(len(tq)):
        logits = [float(tq[i] @ tk[j]) / temperature for j in range(len(tk))]
        columns = [j for j in range(len(tk)) if not (exclude_self and j == i)]
        lse = _logsumexp([logits[j] for j in columns])
        rows.append([math.exp(logits[j] - lse) if j in columns else 0.0 for j in range(len(tk))])
    return rows


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("n, dim", [(1, 3), (4, 8), (9, 5)])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_ntxent_matches_simclr_algorithm_1(n: int, dim: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(n * 100 + dim)
    out0, out1 = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
    loss = NTXentLoss(temperature=temperature)(out0, out1)
    assert loss.item() == pytest.approx(ntxent_reference(out0, out1, temperature), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("temperature", [0.1, 0.7])
def test_supcon_matches_paper_eq_2(views: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(views)
    labels = [0, 1, 0, 2, 1, 2, 0] if views > 1 else [0, 1, 0, 1, 1, 0]
    features = torch.randn(len(labels), views, 6, generator=gen)
    loss = SupConLoss(temperature=temperature)(features if views > 1 else features[:, 0], torch.tensor(labels))
    flat = features.transpose(0, 1).reshape(-1, 6)
    expected = supcon_reference(flat, labels * views, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n, m, positives", [(5, 5, 1), (4, 7, 1), (6, 3, 2), (3, 8, 4)])
@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_info_nce_positive_index_matches_reference(n: int, m: int, positives: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(n * m + positives)
    query, key = torch.randn(n, 4, generator=gen), torch.randn(m, 4, generator=gen)
    index = torch.randint(0, m, (n, positives), generator=gen)
    per_row = info_nce(
        query, key, temperature=temperature, positive_index=index if positives > 1 else index[:, 0], reduction="none"
    )
    expected = cross_entropy_reference(query, key, temperature, one_hot_targets(index.tolist(), m))
    np.testing.assert_allclose(per_row.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_info_nce_labels_matches_reference(exclude_self: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    query_labels = [0, 1, 1, 2, 0, 2]
    key_labels = query_labels if exclude_self else [2, 0, 1, 1, 0, 2, 2, 1]
    query = torch.randn(len(query_labels), 5, generator=gen)
    key = query if exclude_self else torch.randn(len(key_labels), 5, generator=gen)
    per_row = info_nce(
        query,
        key,
        temperature=0.2,
        query_labels=torch.tensor(query_labels),
        key_labels=torch.tensor(key_labels),
        exclude_self=exclude_self,
        reduction="none",
    )
    targets = label_targets(query_labels, key_labels, exclude_self)
    expected = cross_entropy_reference(query, key, 0.2, targets, exclude_self=exclude_self)
    np.testing.assert_allclose(per_row.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("teacher_temperature", [0.05, 1.0])
def test_soft_targets_match_reference(exclude_self: bool, teacher_temperature: float) -> None:
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(6, 4, generator=gen)
    key = query if exclude_self else torch.randn(6, 4, generator=gen)
    teacher_query = torch.randn(6, 9, generator=gen)
    teacher_key = teacher_query if exclude_self else torch.randn(6, 9, generator=gen)
    loss = SoftTargetContrastiveLoss(
        temperature=0.3, teacher_temperature=teacher_temperature, exclude_self=exclude_self
    )(query, key, teacher_query, teacher_key)
    targets = soft_targets(teacher_query, teacher_key, teacher_temperature, exclude_self)
    expected = cross_entropy_reference(query, key, 0.3, targets, exclude_self=exclude_self)
    assert loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-5)


def test_soft_targets_equal_to_hard_targets_when_teacher_is_sharp() -> None:
    gen = torch.Generator().manual_seed(6)
    query, key = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    # Teacher features that are exactly the one-hot pairing: its softmax at a tiny temperature is the identity.
    soft = info_nce(query, key, teacher_query=torch.eye(5), teacher_key=torch.eye(5), teacher_temperature=1e-3)
    assert soft.item() == pytest.approx(info_nce(query, key).item(), rel=1e-6)


def test_symmetric_info_nce_is_the_mean_of_both_directions_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    loss_fn = InfoNCELoss(temperature=0.1, symmetric=True)
    forward = np.mean(cross_entropy_reference(a, b, 0.1, one_hot_targets([[i] for i in range(6)], 6)))
    backward = np.mean(cross_entropy_reference(b, a, 0.1, one_hot_targets([[i] for i in range(6)], 6)))
    assert loss_fn(a, b).item() == pytest.approx((forward + backward) / 2, rel=1e-5)
    assert loss_fn(a, b).item() == pytest.approx(loss_fn(b, a).item(), rel=1e-6)


def test_symmetric_with_labels_swaps_the_label_sets() -> None:
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(4, 3, generator=gen), torch.randn(6, 3, generator=gen)
    la, lb = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 1, 0, 0, 1, 2])
    loss = InfoNCELoss(temperature=0.5, symmetric=True)(a, b, query_labels=la, key_labels=lb)
    forward = info_nce(a, b, temperature=0.5, query_labels=la, key_labels=lb)
    backward = info_nce(b, a, temperature=0.5, query_labels=lb, key_labels=la)
    assert loss.item() == pytest.approx(0.5 * (forward + backward).item(), rel=1e-6)


# --------------------------------------------------------------------------- analytic values and invariants


@pytest.mark.parametrize("n", [1, 3, 8])
def test_ntxent_with_equal_similarities_is_log_of_candidate_count(n: int) -> None:
    same = torch.ones(n, 4)
    loss = NTXentLoss(temperature=0.3)(same, same)
    assert loss.item() == pytest.approx(-math.log(1 / (2 * n - 1)), abs=1e-6)


def test_info_nce_and_supcon_with_equal_similarities() -> None:
    same = torch.ones(5, 3)
    assert info_nce(same, torch.ones(7, 3), positive_index=torch.zeros(5, dtype=torch.long)).item() == pytest.approx(
        math.log(7), abs=1e-6
    )
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert SupConLoss()(same, labels).item() == pytest.approx(math.log(4), abs=1e-6)


def test_ntxent_is_symmetric_in_its_views() -> None:
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    loss_fn = NTXentLoss(temperature=0.2)
    assert loss_fn(a, b).item() == pytest.approx(loss_fn(b, a).item(), rel=1e-6)


def test_ntxent_is_permutation_invariant_and_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(10)
    a, b = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    perm = torch.randperm(6, generator=gen)
    loss_fn = NTXentLoss()
    assert loss_fn(a[perm], b[perm]).item() == pytest.approx(loss_fn(a, b).item(), rel=1e-6)
    assert loss_fn(3 * a, 0.5 * b).item() == pytest.approx(loss_fn(a, b).item(), rel=1e-6)


def test_no_positive_exclude_averages_over_rows_with_positives() -> None:
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(6, 4, generator=gen)
    labels = [0, 1, 0, 2, 1, 3]  # labels 2 and 3 occur once: rows 3 and 5 have no positive
    loss = SupConLoss(temperature=0.5, no_positive="exclude")(features, torch.tensor(labels))
    targets = label_targets(labels, labels, exclude_self=True)
    valid = [i for i in range(6) if labels.count(labels[i]) > 1]
    per_row = cross_entropy_reference(features, features, 0.5, targets, exclude_self=True)
    assert loss.item() == pytest.approx(sum(per_row[i] for i in valid) / len(valid), rel=1e-5)
    rows = info_nce(
        features,
        features,
        temperature=0.5,
        query_labels=torch.tensor(labels),
        exclude_self=True,
        no_positive="exclude",
        reduction="none",
    )
    assert rows[3].item() == 0.0 and rows[5].item() == 0.0


def test_no_positive_anywhere_gives_a_zero_loss_with_a_graph() -> None:
    features = torch.randn(3, 4, requires_grad=True)
    loss = SupConLoss(no_positive="exclude")(features, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and features.grad is not None


def test_reductions() -> None:
    gen = torch.Generator().manual_seed(12)
    q, k = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    rows = info_nce(q, k, reduction="none")
    assert rows.shape == (4,)
    assert info_nce(q, k, reduction="sum").item() == pytest.approx(rows.sum().item(), rel=1e-6)
    assert info_nce(q, k).item() == pytest.approx(rows.mean().item(), rel=1e-6)


# --------------------------------------------------------------------------- gradients and precision


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"positive_index": torch.tensor([[1, 2], [0, 0], [3, 1], [2, 2], [0, 4]])},
        {"query_labels": torch.tensor([0, 1, 0, 1, 1]), "exclude_self": True, "same": True},
        {"teacher_query": torch.randn(5, 3, dtype=torch.float64), "teacher_key": torch.randn(5, 3, dtype=torch.float64)},
        {"negatives": torch.randn(4, 4, dtype=torch.float64)},
        {"negatives": torch.randn(4, 4, dtype=torch.float64), "in_batch_negatives": False},
    ],
    ids=["pairs", "multi-positive", "labels-self", "soft", "negatives", "moco"],
)
@pytest.mark.parametrize("tiled", [False, True])
def test_info_nce_gradcheck(options: dict, tiled: bool) -> None:
    options = dict(options)
    same = options.pop("same", False)
    gen = torch.Generator().manual_seed(13)
    query = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    key = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)

    def loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return info_nce(q, q if same else k, temperature=0.4, tiled=tiled, tile_size=2, **options)

    assert torch.autograd.gradcheck(loss, (query, key))


def test_bf16_autocast_accumulates_in_fp32() -> None:
    gen = torch.Generator().manual_seed(14)
    q, k = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    reference = info_nce(q, k, temperature=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = info_nce(q, k, temperature=0.05)
        tiled = info_nce(q, k, temperature=0.05, tiled=True, tile_size=5)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-6)
    assert tiled.item() == pytest.approx(reference.item(), rel=1e-5)
    half = q.bfloat16().requires_grad_()
    loss = info_nce(half, k.bfloat16(), temperature=0.05)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(info_nce(half.float(), k.bfloat16().float(), temperature=0.05).item(), rel=1e-6)
    loss.backward()
    assert half.grad.dtype == torch.bfloat16


def test_low_temperature_is_finite() -> None:
    gen = torch.Generator().manual_seed(15)
    q, k = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    for tiled in (False, True):
        assert torch.isfinite(info_nce(q, k, temperature=1e-4, tiled=tiled, tile_size=3))


# --------------------------------------------------------------------------- bad input


def _q(n: int = 4, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: info_nce(_q(4, 3), _q(4, 5)), r"key: expected shape \('\*', 3\)"),
        (lambda: info_nce(_q(4, 3), _q(5, 3)), "key: .*equal counts"),
        (lambda: info_nce(torch.randn(3), _q()), "query: expected a 2-D tensor"),
        (lambda: info_nce(_q(0, 3), _q(0, 3)), "query: expected at least 1 row"),
        (lambda: info_nce(_q().long(), _q()), "query: expected a floating-point"),
        (lambda: info_nce(_q().index_fill(0, torch.tensor([1]), float("nan")), _q()), "query: contains 3 NaN"),
        (lambda: info_nce(_q(), _q().index_fill(0, torch.tensor([0]), float("inf"))), "key: contains"),
        (lambda: info_nce(_q(), _q(), temperature=0.0), "temperature: expected a positive"),
        (lambda: info_nce(_q(), _q(), temperature=-1.0), "temperature"),
        (lambda: info_nce(_q(), _q(), teacher_temperature=0.0), "teacher_temperature"),
        (lambda: info_nce(_q(), _q(), positive_index=torch.tensor([0, 1, 2, 4])), r"positive_index: values must be in \[0, 4\)"),
        (lambda: info_nce(_q(), _q(), positive_index=torch.tensor([0, -1, 2, 3])), "positive_index: values"),
        (lambda: info_nce(_q(), _q(), positive_index=torch.tensor([0, 1])), r"positive_index: expected shape \(4,\) or \(4, P\)"),
        (lambda: info_nce(_q(), _q(), positive_index=torch.zeros(4, 0, dtype=torch.long)), "positive_index: expected shape"),
        (lambda: info_nce(_q(), _q(), positive_index=torch.zeros(4)), "positive_index: expected an integer"),
        (lambda: info_nce(_q(), _q(), positive_index=torch.tensor([1, 1, 2, 0]), exclude_self=True), "positive_index: a row points at its own"),
        (lambda: info_nce(_q(), _q(3, 3), exclude_self=True, positive_index=torch.zeros(4, dtype=torch.long)), "exclude_self: .*N == M"),
        (lambda: info_nce(_q(1), _q(1), exclude_self=True, query_labels=torch.tensor([0])), "exclude_self: a single key"),
        (lambda: info_nce(_q(), _q(), query_labels=torch.tensor([0, 1, 0])), r"query_labels: expected shape \(4,\)"),
        (lambda: info_nce(_q(), _q(), query_labels=torch.zeros(4)), "query_labels: expected an integer"),
        (lambda: info_nce(_q(), _q(5), query_labels=torch.zeros(4, dtype=torch.long)), "key_labels: required when N != M"),
        (lambda: info_nce(_q(), _q(), key_labels=torch.zeros(4, dtype=torch.long)), "query_labels: required"),
        (lambda: info_nce(_q(), _q(), query_labels=torch.arange(4), exclude_self=True), "query_labels: 4 row"),
        (lambda: info_nce(_q(), _q(), positive_index=torch.arange(4), query_labels=torch.arange(4)), "targets: give at most one"),
        (lambda: info_nce(_q(), _q(), teacher_query=_q(4, 2)), "teacher_query, teacher_key: soft targets need both"),
        (lambda: info_nce(_q(), _q(), teacher_query=_q(4, 2), teacher_key=_q(4, 3)), r"teacher_key: expected shape \(4, 2\)"),
        (lambda: info_nce(_q(), _q(), teacher_query=_q(3, 2), teacher_key=_q(4, 2)), r"teacher_query: expected shape \(4, '\*'\)"),
        (lambda: info_nce(_q(), _q(), teacher_query=_q(4, 2) * float("nan"), teacher_key=_q(4, 2)), "teacher_query: contains"),
        (lambda: info_nce(_q(), _q(), negatives=_q(5, 2)), r"negatives: expected shape \('\*', 3\)"),
        (lambda: info_nce(_q(), _q(), negatives=_q(5) * float("nan")), "negatives: contains"),
        (lambda: info_nce(_q(), _q(), query_labels=torch.arange(4), in_batch_negatives=False), "in_batch_negatives: False"),
        (lambda: info_nce(_q(), _q(), reduction="max"), "reduction: expected"),
        (lambda: info_nce(_q(), _q(), no_positive="ignore"), "no_positive: expected"),
        (lambda: info_nce(_q(), _q(), tile_size=0), "tile_size: expected a positive int"),
        (lambda: NTXentLoss()(_q(4, 3), _q(5, 3)), "out0 and out1 must have the same shape"),
        (lambda: NTXentLoss()(torch.randn(4), torch.randn(4)), "out0: expected a 2-D tensor"),
        (lambda: NTXentLoss(temperature=0.0), "temperature"),
        (lambda: NTXentLoss(memory_size=8), "memory_dim: required"),
        (lambda: InfoNCELoss(memory_size=-1), "memory_size: expected an int >= 0"),
        (lambda: InfoNCELoss(memory_size=8, memory_dim=5)(_q(), _q()), r"query: expected feature dim 5"),
        (lambda: InfoNCELoss(symmetric=True)(_q(), _q(), positive_index=torch.arange(4)), "positive_index: symmetric=True"),
        (lambda: InfoNCELoss(no_positive="skip"), "no_positive"),
        (lambda: SupConLoss()(_q(4, 3), torch.tensor([0, 1])), r"labels: expected shape \(4,\)"),
        (lambda: SupConLoss()(torch.randn(4), torch.arange(4)), "features: expected a 2-D or 3-D"),
        (lambda: SupConLoss(temperature=-0.1), "temperature"),
        (lambda: SoftTargetContrastiveLoss(teacher_temperature=0.0), "teacher_temperature"),
        (lambda: SoftTargetContrastiveLoss()(_q(), _q(), _q(4, 2), _q(3, 2)), r"teacher_key: expected shape"),
    ],
)
def test_bad_input_raises_one_clear_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
