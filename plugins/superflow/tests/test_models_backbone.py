"""MinkUNet on spconv built by mmdet3d: drop-in keys, BN momentum, CPU training, padded spatial shape."""

from __future__ import annotations

import pytest
import torch

from accord_superflow.models import BackboneConfig, cylindrical_voxelize
from accord_superflow.models.backbone import SFMinkUNetBackbone, build_backbone

# MinkUNet-34 depth with tiny widths.
TINY = BackboneConfig(base_channels=4, encoder_channels=[4, 8, 8, 8], decoder_channels=[8, 8, 4, 4])




def _voxels(seed: int = 0, clouds: int = 2):
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(clouds * 400, 4, generator=generator) * torch.tensor([8.0, 8.0, 1.0, 50.0])
    return cylindrical_voxelize(points, torch.arange(clouds).repeat_interleave(400))


def test_backbone_is_mmdet3d_minkunet_with_identical_keys():
    from mmdet3d.models.backbones import MinkUNetBackbone
    from mmdet3d.registry import MODELS

    ours = build_backbone(BackboneConfig())
    stock = MinkUNetBackbone(in_channels=4, base_channels=32, num_stages=4, encoder_channels=[32, 64, 128, 256],
                             encoder_blocks=[2, 3, 4, 6], decoder_channels=[256, 128, 96, 96],
                             decoder_blocks=[2, 2, 2, 2], sparseconv_backend="spconv")
    assert isinstance(ours, MinkUNetBackbone)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    assert ours.out_channels == 96
    # About 37.9 M parameters for MinkUNet-34 (spec §1).
    assert 37e6 < sum(p.numel() for p in ours.parameters()) < 39e6
    built = MODELS.build(dict(type="SFMinkUNetBackbone", **TINY.mmdet3d_kwargs()))
    assert isinstance(built, SFMinkUNetBackbone)


def test_batchnorm_momentum_follows_the_config():
    momenta = {m.momentum for m in build_backbone(TINY).modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert momenta == {0.05}
    downstream = build_backbone(TINY.model_copy(update={"bn_momentum": 0.02}))
    assert {m.momentum for m in downstream.modules() if isinstance(m, torch.nn.BatchNorm1d)} == {0.02}


def test_forward_and_backward_on_the_cpu():
    torch.manual_seed(0)
    backbone = build_backbone(TINY).train()
    voxels = _voxels()
    features = voxels.features.clone().requires_grad_()
    out = backbone(features, voxels.coords)
    assert out.shape == (len(voxels), 4)
    per_point = voxels.to_points(out)
    assert per_point.shape == (len(voxels.point_to_voxel), 4)
    per_point.square().mean().backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert all(p.grad is not None for p in backbone.parameters())


def test_padded_shape_keeps_upper_boundary_voxels():
    """With mmdet3d's ``max + 1`` shape an odd extent drops the top voxel in the stride-2 stages."""
    from mmdet3d.models.backbones import MinkUNetBackbone

    torch.manual_seed(0)
    ours = build_backbone(TINY).eval()
    stock = MinkUNetBackbone(sparseconv_backend="spconv", num_stages=4, in_channels=4, base_channels=4,
                             encoder_channels=[4, 8, 8, 8], encoder_blocks=[2, 3, 4, 6],
                             decoder_channels=[8, 8, 4, 4], decoder_blocks=[2, 2, 2, 2]).eval()
    stock.load_state_dict(ours.state_dict())
    # Extent 33 (odd): the stock shape is 33 and the voxel at 32 has no parent after the first stride.
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 3], [0, 32, 32, 32]], dtype=torch.int32)
    features = 100 * torch.randn(4, 4)  # freshly initialised layers shrink activations a lot
    with torch.no_grad():
        padded = ours(features, coords)
        wider = SFMinkUNetBackbone(shape_multiple=64, **TINY.mmdet3d_kwargs()).eval()
        wider.load_state_dict(ours.state_dict())
        assert torch.allclose(padded, wider(features, coords), rtol=1e-5, atol=1e-7), "padding must not matter"
        unpadded = stock(features, coords)
    # The stock shape loses the top voxel's parent, so its deep features differ.
    assert not torch.allclose(padded[3], unpadded[3], rtol=1e-3, atol=0)


@pytest.mark.parametrize("bad", [{"encoder_blocks": [2, 3, 4]}, {"bn_momentum": 0.0}])
def test_backbone_config_rejects_inconsistent_stages(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        BackboneConfig(**bad)
