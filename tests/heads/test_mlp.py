"""Projection, prediction, DINO and dense projection heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accord.heads.mlp import DenseProjectionHead, DINOHead, PredictionHead, ProjectionHead


def _layer_types(module: nn.Module) -> list[type]:
    return [type(layer) for layer in module.layers]


def test_projection_head_layout():
    head = ProjectionHead(8, 16, 4, num_layers=3, batch_norm=True, last_bn=True)
    assert _layer_types(head) == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d
    ]
    assert head.layers[0].bias is None  # cancelled by the following BatchNorm
    assert head.layers[-1].affine is False
    assert head(torch.randn(5, 8)).shape == (5, 4)
    plain = ProjectionHead(8, 16, 4, num_layers=2, batch_norm=False, activation=nn.GELU)
    assert _layer_types(plain) == [nn.Linear, nn.GELU, nn.Linear]
    assert _layer_types(ProjectionHead(8, 16, 4, num_layers=1)) == [nn.Linear]


def test_prediction_head_is_byol_predictor():
    head = PredictionHead(6, 12, 6)
    assert _layer_types(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(3, 6)).shape == (3, 6)


def test_dino_head_normalises_and_fixes_last_layer_gain():
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4, num_layers=3)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))
    features = torch.randn(5, 8)
    logits = head(features)
    assert logits.shape == (5, 10)
    # With unit gain, logits are cosines between the normalised embedding and unit prototypes.
    assert logits.abs().max() <= 1.0 + 1e-6
    tokens = torch.randn(2, 3, 8)
    assert torch.allclose(head(tokens), head(tokens.reshape(6, 8)).reshape(2, 3, 10))
    assert DINOHead(8, 10, 16, 4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("spatial", [(3,), (3, 4), (2, 3, 2)])
def test_dense_projection_head_equals_per_location_head_and_1x1_convolutions(spatial):
    torch.manual_seed(0)
    head = DenseProjectionHead(4, 6, 3, num_layers=2, batch_norm=True)
    feature_map = torch.randn(2, 4, *spatial)
    out = head(feature_map)
    assert out.shape == (2, 3, *spatial)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(spatial)]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(spatial)]
    linear0, batch_norm, _, linear1 = head.head.layers
    reference = nn.Sequential(conv(4, 6, 1, bias=False), norm(6), nn.ReLU(), conv(6, 3, 1))
    with torch.no_grad():
        reference[0].weight.copy_(linear0.weight.view(6, 4, *[1] * len(spatial)))
        reference[3].weight.copy_(linear1.weight.view(3, 6, *[1] * len(spatial)))
        reference[3].bias.copy_(linear1.bias)
    # Training mode: BatchNorm statistics over (B, *spatial) must agree too.
    torch.testing.assert_close(out, reference(feature_map))
    torch.testing.assert_close(batch_norm.running_mean, reference[1].running_mean)
    head.eval()
    flat = feature_map.movedim(1, -1).reshape(-1, 4)
    torch.testing.assert_close(head(feature_map).movedim(1, -1).reshape(-1, 3), head.head(flat))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ProjectionHead(0, 4, 4), "in_dim"),
        (lambda: ProjectionHead(4, 4, 4, num_layers=0), "num_layers"),
        (lambda: DINOHead(4, out_dim=0), "out_dim"),
        (lambda: ProjectionHead(4, 8, 2)(torch.randn(3, 5)), r"features.*\('\*', 4\)"),
        (lambda: ProjectionHead(4, 8, 2)(torch.randn(0, 4)), "features.*row"),
        (lambda: DINOHead(4, 6, 8, 2)(torch.randn(3, 5)), "features.*last dim 4"),
        (lambda: DenseProjectionHead(4, 8, 2)(torch.randn(2, 5, 3, 3)), "feature_map.*4 channels"),
        (lambda: DenseProjectionHead(4, 8, 2)(torch.randn(2, 4)), "feature_map.*3-D"),
    ],
)
def test_heads_reject_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
