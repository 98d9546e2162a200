"""Negative-cosine (BYOL / SimSiam) and masked dense cosine losses against loop references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord.losses.cosine import MaskedDenseCosineLoss, NegativeCosineSimilarity


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _negative_cosine_reference(prediction: np.ndarray, target: np.ndarray) -> float:
    return -np.mean([_cos(p, t) for p, t in zip(prediction, target)])


@pytest.mark.parametrize(("batch", "dim"), [(1, 3), (4, 8), (7, 2)])
def test_negative_cosine_matches_reference(batch, dim):
    prediction, target = torch.randn(batch, dim, dtype=torch.float64), torch.randn(batch, dim, dtype=torch.float64)
    loss = NegativeCosineSimilarity()(prediction, target)
    assert loss.item() == pytest.approx(_negative_cosine_reference(prediction.numpy(), target.numpy()), rel=1e-12)


def test_negative_cosine_symmetric_form_pairs_each_prediction_with_the_other_views_target():
    predictions, targets = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    p, z = predictions.numpy(), targets.numpy()
    expected = 0.5 * (_negative_cosine_reference(p[0], z[1]) + _negative_cosine_reference(p[1], z[0]))
    loss_fn = NegativeCosineSimilarity(symmetric=True)
    assert loss_fn(predictions, targets).item() == pytest.approx(expected, rel=1e-12)
    assert loss_fn(list(predictions), list(targets)).item() == pytest.approx(expected, rel=1e-12)
    # Swapping the two views leaves the symmetric loss unchanged.
    assert loss_fn(predictions.flip(0), targets.flip(0)).item() == pytest.approx(expected, rel=1e-12)


def test_negative_cosine_value_is_symmetric_in_its_arguments_and_bounded():
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    loss_fn = NegativeCosineSimilarity()
    assert loss_fn(a, b).item() == pytest.approx(loss_fn(b, a).item(), rel=1e-6)
    assert loss_fn(a, a).item() == pytest.approx(-1.0)
    assert loss_fn(a, -a).item() == pytest.approx(1.0)


def test_negative_cosine_gradcheck_and_stop_gradient():
    prediction = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NegativeCosineSimilarity(detach_target=False), (prediction, target))
    NegativeCosineSimilarity()(prediction, target).backward()
    assert target.grad is None and prediction.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "prediction", "target", "match"),
    [
        ({}, torch.randn(3, 4), torch.randn(3, 5), "same shape"),
        ({}, torch.randn(0, 4), torch.randn(0, 4), "prediction.*row"),
        ({}, torch.randn(4), torch.randn(4), "prediction.*2-D"),
        ({}, torch.full((2, 3), float("nan")), torch.randn(2, 3), "prediction.*NaN"),
        ({"symmetric": True}, torch.randn(3, 2, 4), torch.randn(3, 2, 4), "prediction.*exactly 2 views"),
        ({"symmetric": True}, torch.randn(2, 4), torch.randn(2, 4), "prediction.*3-D"),
    ],
)
def test_negative_cosine_rejects_bad_input(kwargs, prediction, target, match):
    with pytest.raises(ValueError, match=match):
        NegativeCosineSimilarity(**kwargs)(prediction, target)


def _dense_reference(prediction, target, weight):
    """Loop over every location of channel-last arrays ``(..., C)`` with weights ``(...)``."""
    total, weight_sum = 0.0, 0.0
    for index in np.ndindex(*weight.shape):
        total += weight[index] * (1 - _cos(prediction[index], target[index]))
        weight_sum += weight[index]
    return total / weight_sum


@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 2)])
@pytest.mark.parametrize("use_weight", [False, True])
def test_masked_dense_cosine_matches_reference_channels_first(spatial, use_weight):
    batch, channels = 2, 3
    prediction = torch.randn(batch, channels, *spatial, dtype=torch.float64)
    target = torch.randn(batch, channels, *spatial, dtype=torch.float64)
    mask = torch.rand(batch, *spatial) < 0.6
    mask.view(-1)[0] = True
    weight = torch.rand(batch, *spatial, dtype=torch.float64) if use_weight else None
    expected_weight = mask.double() * (weight if use_weight else 1.0)
    expected = _dense_reference(
        prediction.movedim(1, -1).numpy(), target.movedim(1, -1).numpy(), expected_weight.numpy()
    )
    loss = MaskedDenseCosineLoss()(prediction, target, mask, weight)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_masked_dense_cosine_tokens_layout_and_gradcheck():
    prediction = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, False]])
    expected = _dense_reference(prediction.detach().numpy(), target.detach().numpy(), mask.double().numpy())
    loss_fn = MaskedDenseCosineLoss(channel_dim=-1)
    assert loss_fn(prediction, target, mask).item() == pytest.approx(expected, rel=1e-12)
    # No mask: every location counts; symmetric in its arguments.
    assert loss_fn(prediction, target).item() == pytest.approx(loss_fn(target, prediction).item(), rel=1e-12)
    both_sides = MaskedDenseCosineLoss(channel_dim=-1, detach_target=False)
    assert torch.autograd.gradcheck(lambda p, t: both_sides(p, t, mask), (prediction, target))
    loss_fn(prediction, target, mask).backward()
    assert target.grad is None


_MAP = (2, 3, 4, 4)  # (B, C, H, W); per-location tensors are (B, H, W)


@pytest.mark.parametrize(
    ("prediction", "target", "mask", "weight", "match"),
    [
        (torch.randn(_MAP), torch.randn(_MAP), torch.zeros(2, 4, 4, dtype=torch.bool), None, "no valid location"),
        (torch.randn(_MAP), torch.randn(_MAP), None, torch.zeros(2, 4, 4), "no valid location"),
        (torch.randn(_MAP), torch.randn(2, 3, 4, 5), None, None, "same shape"),
        (torch.randn(_MAP), torch.randn(_MAP), torch.ones(_MAP, dtype=torch.bool), None, r"mask.*\(2, 4, 4\)"),
        (torch.randn(_MAP), torch.randn(_MAP), torch.ones(2, 4, 4), None, "mask.*bool tensor of shape"),
        (torch.randn(_MAP), torch.randn(_MAP), None, -torch.ones(2, 4, 4), "weight.*non-negative"),
        (torch.randn(_MAP), torch.randn(_MAP), None, torch.full((2, 4, 4), float("nan")), "weight.*NaN"),
        (torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4), None, None, "prediction.*row"),
        (torch.randn(2, 3), torch.randn(2, 3), None, None, "prediction.*3-D or 4-D or 5-D"),
        (torch.randn(2, 3, 4), torch.full((2, 3, 4), float("inf")), None, None, "target.*NaN"),
    ],
)
def test_masked_dense_cosine_rejects_bad_input(prediction, target, mask, weight, match):
    with pytest.raises(ValueError, match=match):
        MaskedDenseCosineLoss()(prediction, target, mask, weight)


def test_masked_dense_cosine_rejects_bad_channel_dim():
    with pytest.raises(ValueError, match="channel_dim"):
        MaskedDenseCosineLoss(channel_dim=2)
