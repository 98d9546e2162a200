"""Group mean pooling and grouped contrast against hand pooling and a plain NumPy InfoNCE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord.losses.grouped import GroupedContrastLoss, group_mean_pool


def _pool_reference(features: np.ndarray, keys: list, all_keys: list) -> tuple[dict, set]:
    """Mean feature per key by explicit loops; ``None`` keys are ignored."""
    pooled = {}
    for key in all_keys:
        rows = [features[i] for i, k in enumerate(keys) if k == key]
        if rows:
            pooled[key] = np.mean(rows, axis=0)
    return pooled, set(pooled)


def _info_nce_reference(anchors: np.ndarray, positives: np.ndarray, temperature: float) -> float:
    anchors = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    positives = positives / np.linalg.norm(positives, axis=1, keepdims=True)
    losses = []
    for i in range(len(anchors)):
        logits = np.array([anchors[i] @ p / temperature for p in positives])
        losses.append(-(logits[i] - np.log(np.exp(logits).sum())))
    return float(np.mean(losses))


def test_group_mean_pool_matches_loop_reference():
    features = torch.randn(30, 4, dtype=torch.float64)
    group_ids = torch.randint(-1, 6, (30,))
    group_ids[0] = 7  # highest id present, so G = 8 is inferred; some ids in between are absent
    pooled, present = group_mean_pool(features, group_ids)
    keys = [int(g) if g >= 0 else None for g in group_ids]
    expected, expected_present = _pool_reference(features.numpy(), keys, list(range(8)))
    assert pooled.shape == (8, 4) and present.shape == (8,)
    for g in range(8):
        assert bool(present[g]) == (g in expected_present)
        if g in expected:
            np.testing.assert_allclose(pooled[g].numpy(), expected[g], rtol=1e-12)
        else:
            assert torch.equal(pooled[g], torch.zeros(4, dtype=torch.float64))


def test_group_mean_pool_num_groups_ignore_index_and_gradient():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64, requires_grad=True)
    pooled, present = group_mean_pool(features, torch.tensor([2, -5, 2]), num_groups=4, ignore_index=-5)
    assert torch.equal(present, torch.tensor([False, False, True, False]))
    assert pooled[2].tolist() == [3.0, 4.0]
    pooled.sum().backward()
    assert features.grad.tolist() == [[0.5, 0.5], [0.0, 0.0], [0.5, 0.5]]
    pooled, present = group_mean_pool(features, torch.full((3,), -1))
    assert pooled.shape == (0, 2) and present.shape == (0,)
    assert torch.autograd.gradcheck(lambda f: group_mean_pool(f, torch.tensor([1, 0, 1]))[0], (features,))


@pytest.mark.parametrize(
    ("features", "group_ids", "kwargs", "match"),
    [
        (torch.randn(3, 2), torch.tensor([0, 1]), {}, r"group_ids.*\(3,\)"),
        (torch.randn(3, 2), torch.tensor([0.0, 1.0, 2.0]), {}, "group_ids.*integer"),
        (torch.randn(3, 2), torch.tensor([0, 1, 5]), {"num_groups": 4}, r"group_ids.*\[0, 4\)"),
        (torch.randn(3, 2), torch.tensor([0, -2, 1]), {}, r"group_ids.*\[0, 2\)"),
        (torch.randn(3, 2), torch.tensor([0, 1, 1]), {"ignore_index": 0}, "ignore_index.*negative"),
        (torch.randn(3, 2), torch.tensor([0, 1, 1]), {"num_groups": -1}, "num_groups"),
        (torch.randn(0, 2), torch.zeros(0, dtype=torch.long), {}, "features.*row"),
        (torch.randn(3), torch.tensor([0, 1, 1]), {}, "features.*2-D"),
    ],
)
def test_group_mean_pool_rejects_bad_input(features, group_ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_mean_pool(features, group_ids, **kwargs)


def _grouped_reference(fa, ga, ba, fb, gb, bb, temperature):
    """Pool by (sample, group) key by hand, keep keys on both sides, then NumPy InfoNCE a -> b."""
    keys_a = [(int(b), int(g)) if g >= 0 else None for b, g in zip(ba, ga)]
    keys_b = [(int(b), int(g)) if g >= 0 else None for b, g in zip(bb, gb)]
    all_keys = sorted({k for k in keys_a + keys_b if k is not None})
    pooled_a, present_a = _pool_reference(fa, keys_a, all_keys)
    pooled_b, present_b = _pool_reference(fb, keys_b, all_keys)
    kept = [k for k in all_keys if k in present_a and k in present_b]
    anchors = np.stack([pooled_a[k] for k in kept])
    positives = np.stack([pooled_b[k] for k in kept])
    return _info_nce_reference(anchors, positives, temperature)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_grouped_contrast_matches_reference(temperature, num_samples):
    generator = torch.Generator().manual_seed(num_samples)
    fa = torch.randn(40, 5, dtype=torch.float64, generator=generator)
    fb = torch.randn(60, 5, dtype=torch.float64, generator=generator)
    ga = torch.randint(-1, 6, (40,), generator=generator)
    gb = torch.randint(-1, 6, (60,), generator=generator)
    ba = torch.randint(0, num_samples, (40,), generator=generator)
    bb = torch.randint(0, num_samples, (60,), generator=generator)
    expected = _grouped_reference(fa.numpy(), ga.numpy(), ba.numpy(), fb.numpy(), gb.numpy(), bb.numpy(), temperature)
    loss_fn = GroupedContrastLoss(temperature=temperature)
    if num_samples == 1:
        loss = loss_fn(fa, ga, fb, gb)
    else:
        loss = loss_fn(fa, ga, fb, gb, ba, bb)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_grouped_contrast_keeps_samples_distinct_and_supports_a_custom_pair_loss():
    # Group 0 exists in both samples; only a batch index keeps them apart.
    fa = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    fb = torch.tensor([[1.0, 0.1], [0.1, 1.0]], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.long)
    samples = torch.tensor([0, 1])
    expected = _info_nce_reference(fa.numpy(), fb.numpy(), 0.07)
    assert GroupedContrastLoss()(fa, zeros, fb, zeros, samples, samples).item() == pytest.approx(expected)

    class MeanSquaredPair(torch.nn.Module):
        def forward(self, anchors, positives):
            return ((anchors - positives) ** 2).mean()

    loss = GroupedContrastLoss(pair_loss=MeanSquaredPair())(fa, zeros, fb, zeros, samples, samples)
    assert loss.item() == pytest.approx(((fa - fb) ** 2).mean().item())


def test_grouped_contrast_gradcheck():
    fa = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    fb = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    ga, gb = torch.tensor([0, 1, 2, 0, 1, 2, 3, -1]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, 1])
    loss_fn = GroupedContrastLoss(temperature=0.5)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, ga, b, gb), (fa, fb))


def _valid_grouped_inputs() -> dict[str, object]:
    return {
        "features_a": torch.randn(4, 3),
        "group_ids_a": torch.tensor([0, 1, 2, 3]),
        "features_b": torch.randn(4, 3),
        "group_ids_b": torch.tensor([0, 1, 2, 3]),
    }


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"features_b": torch.randn(4, 2)}, "features_b.*3 channels"),
        ({"group_ids_a": torch.tensor([0, 1, 2])}, r"group_ids_a.*\(4,\)"),
        ({"group_ids_b": torch.tensor([0.0, 1, 2, 3])}, "group_ids_b.*integer"),
        ({"group_ids_a": torch.tensor([0, 1, 2, 9]), "groups_per_sample": 4}, r"group_ids_a.*\[0, 4\)"),
        ({"group_ids_a": torch.tensor([0, 1, -3, 3])}, "group_ids_a.*min -3"),
        ({"group_ids_a": torch.zeros(4, dtype=torch.long), "group_ids_b": torch.ones(4, dtype=torch.long)}, "in both"),
        ({"group_ids_a": torch.full((4,), -1), "group_ids_b": torch.full((4,), -1)}, "in both"),
        ({"features_a": torch.randn(0, 3), "group_ids_a": torch.zeros(0, dtype=torch.long)}, "features_a.*row"),
        ({"features_a": torch.full((4, 3), float("nan"))}, "features_a.*NaN"),
        ({"batch_index_a": torch.zeros(4, dtype=torch.long)}, "give both or neither"),
        ({"batch_index_a": torch.tensor([0, -1, 0, 0]), "batch_index_b": torch.zeros(4, dtype=torch.long)}, "min -1"),
        ({"batch_index_a": torch.zeros(4, dtype=torch.long), "batch_index_b": torch.zeros(3, dtype=torch.long)},
         r"batch_index_b.*\(4,\)"),
        ({"groups_per_sample": 0}, "groups_per_sample"),
    ],
)
def test_grouped_contrast_rejects_bad_input(overrides, match):
    with pytest.raises(ValueError, match=match):
        GroupedContrastLoss()(**{**_valid_grouped_inputs(), **overrides})


def test_grouped_contrast_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        GroupedContrastLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature.*pair_loss"):
        GroupedContrastLoss(pair_loss=torch.nn.MSELoss(), temperature=0.1)
    with pytest.raises(ValueError, match="ignore_index"):
        GroupedContrastLoss(ignore_index=0)
