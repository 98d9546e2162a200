"""SuperFlow's three grouped contrasts against a loop reference (pool by hand, plain NumPy InfoNCE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord_superflow.losses import GroupedFeatures, SuperFlowLoss, SuperFlowLossConfig

GROUPS = 5
SAMPLES = 3
DIM = 8


def _elements(count: int, seed: int, missing_groups=()) -> GroupedFeatures:
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(count, DIM, generator=generator, dtype=torch.float64), dim=1)
    groups = torch.randint(-1, GROUPS, (count,), generator=generator)  # -1: pixel/point without a group
    batch = torch.randint(0, SAMPLES, (count,), generator=generator)
    for sample, group in missing_groups:
        groups[(batch == sample) & (groups == group)] = -1
    return GroupedFeatures(features.requires_grad_(), groups, batch)


def _pool_by_hand(elements: GroupedFeatures) -> dict[tuple[int, int], np.ndarray]:
    sums: dict[tuple[int, int], list[np.ndarray]] = {}
    features = elements.features.detach().numpy()
    for row in range(len(features)):
        group = int(elements.group_ids[row])
        if group >= 0:
            sums.setdefault((int(elements.batch_index[row]), group), []).append(features[row])
    return {key: np.mean(rows, axis=0) for key, rows in sums.items()}


def _reference(anchors: GroupedFeatures, positives: GroupedFeatures, temperature: float = 0.07) -> float:
    """Mean over groups present on both sides of -log softmax_j(cos(k_i, q_j) / tau)[i]."""
    pooled_a, pooled_b = _pool_by_hand(anchors), _pool_by_hand(positives)
    kept = sorted(set(pooled_a) & set(pooled_b))  # sample-major, as the engine's combined ids
    k = np.stack([pooled_a[key] for key in kept])
    q = np.stack([pooled_b[key] for key in kept])
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    logits = k @ q.T / temperature
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return float(-np.mean(np.diag(log_softmax)))


@pytest.fixture
def frames() -> tuple[list[GroupedFeatures], list[GroupedFeatures], GroupedFeatures]:
    # Frame t-1 lacks group 2 of sample 0 and t+1 lacks group 4 of sample 1: the temporal term
    # must contrast only the groups present in both frames.
    points = [_elements(120, 0), _elements(110, 1, [(0, 2)]), _elements(130, 2, [(1, 4)])]
    pixels = [_elements(400, 10 + f) for f in range(3)]
    dense = _elements(200, 20)
    return points, pixels, dense


def test_spatial_term_is_the_frame_mean_of_point_vs_pixel_contrasts(frames):
    points, pixels, _ = frames
    loss = SuperFlowLoss(GROUPS)
    expected = np.mean([_reference(p, q) for p, q in zip(points, pixels)])
    assert loss.spatial(points, pixels).item() == pytest.approx(expected, rel=1e-9)


def test_dense_to_sparse_term_contrasts_keyframe_with_dense_superpoints(frames):
    points, _, dense = frames
    loss = SuperFlowLoss(GROUPS)
    assert loss.dense_to_sparse(points[0], dense).item() == pytest.approx(_reference(points[0], dense), rel=1e-9)


def test_temporal_term_matches_shared_class_ids_across_frames(frames):
    points, _, _ = frames
    loss = SuperFlowLoss(GROUPS)
    expected = (_reference(points[0], points[1]) + _reference(points[0], points[2])) / 2
    assert loss.temporal(points[0], points[1:]).item() == pytest.approx(expected, rel=1e-9)


def test_total_is_the_weighted_sum_and_gradients_flow(frames):
    points, pixels, dense = frames
    config = SuperFlowLossConfig(temperature=0.1, spatial_weight=1.0, dense_to_sparse_weight=0.5, temporal_weight=2.0)
    terms = SuperFlowLoss(GROUPS, config)(points, pixels, dense)
    values = {name: value.item() for name, value in terms.items()}
    assert set(terms) == {"loss", "spatial", "dense_to_sparse", "temporal"}
    spatial = np.mean([_reference(p, q, 0.1) for p, q in zip(points, pixels)])
    d2s = _reference(points[0], dense, 0.1)
    temporal = (_reference(points[0], points[1], 0.1) + _reference(points[0], points[2], 0.1)) / 2
    assert values["spatial"] == pytest.approx(spatial, rel=1e-9)
    assert values["loss"] == pytest.approx(spatial + 0.5 * d2s + 2.0 * temporal, rel=1e-9)
    terms["loss"].backward()
    for elements in (*points, *pixels, dense):
        assert elements.features.grad is not None and torch.isfinite(elements.features.grad).all()


def test_default_temperature_is_0_07_and_zero_weights_skip_a_term(frames):
    points, pixels, dense = frames
    assert SuperFlowLossConfig().temperature == 0.07
    config = SuperFlowLossConfig(temporal_weight=0.0)
    terms = {name: value.item() for name, value in SuperFlowLoss(GROUPS, config)(points, pixels, dense).items()}
    assert terms["temporal"] == 0.0
    assert terms["loss"] == pytest.approx(terms["spatial"] + terms["dense_to_sparse"], rel=1e-12)


def test_same_group_in_another_sample_is_a_negative():
    """Class-level ids: 'car' in sample 0 and 'car' in sample 1 are different superpixels."""
    features = torch.eye(2, dtype=torch.float64)
    anchors = GroupedFeatures(features, torch.tensor([3, 3]), torch.tensor([0, 1]))
    loss = SuperFlowLoss(GROUPS).dense_to_sparse(anchors, anchors)
    assert float(loss) == pytest.approx(_reference(anchors, anchors), rel=1e-12)
    assert float(loss) < 1e-3  # two distinct groups, each matched to itself


def test_no_shared_group_is_an_error():
    a = GroupedFeatures(torch.randn(2, DIM), torch.tensor([0, 1]), torch.tensor([0, 0]))
    b = GroupedFeatures(torch.randn(2, DIM), torch.tensor([2, 3]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="no group is present"):
        SuperFlowLoss(GROUPS).dense_to_sparse(a, b)
