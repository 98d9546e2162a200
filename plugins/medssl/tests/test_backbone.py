"""SwinUNETR backbone adapter: feature shapes, fidelity to MONAI's forward, strict MONAI export."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from accord_medssl.alice import AliceModel, AliceOptions
from accord_medssl.models import SwinUNETRBackbone, SwinUNETRBackboneOptions, monai_state_dict

TINY = SwinUNETRBackboneOptions(
    feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, norm_name="batch"
)


@pytest.fixture(scope="module")
def backbone() -> SwinUNETRBackbone:
    torch.manual_seed(0)
    return SwinUNETRBackbone(TINY).eval()


def test_feature_shapes_follow_the_strides(backbone: SwinUNETRBackbone) -> None:
    with torch.no_grad():
        out = backbone(torch.rand(2, 1, 32, 32, 64))
    assert out.encoder_grid == (1, 1, 2) and out.decoder_grid == (2, 2, 4)
    assert out.encoder_tokens.shape == (2, 2, 16 * 12)
    assert out.decoder_tokens.shape == (2, 16, 8 * 12)
    assert out.pooled.shape == (2, 16 * 12)
    torch.testing.assert_close(out.pooled, out.encoder_tokens.mean(dim=1))
    assert out.reconstruction.shape == (2, 1, 32, 32, 64)


def test_reconstruction_is_swin_unetr_forward(backbone: SwinUNETRBackbone) -> None:
    images = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours = backbone(images)
        tokens_only = backbone(images, reconstruct=False)
        torch.testing.assert_close(ours.reconstruction, backbone.swin_unetr(images))
    assert tokens_only.reconstruction is None
    torch.testing.assert_close(tokens_only.decoder_tokens, ours.decoder_tokens)


def test_monai_state_dict_loads_strictly_into_a_fresh_swin_unetr(backbone: SwinUNETRBackbone) -> None:
    fresh = SwinUNETR(**TINY.monai_kwargs()).eval()
    fresh.load_state_dict(monai_state_dict(backbone), strict=True)
    images = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), backbone(images).reconstruction)


def test_monai_state_dict_from_alice_model_and_checkpoint() -> None:
    options = AliceOptions(backbone=TINY, out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, casa_hidden_dim=16)
    model = AliceModel(options)
    from_module = monai_state_dict(model)
    from_checkpoint = monai_state_dict(model.state_dict(), prefix="student.backbone.swin_unetr.")
    assert from_module.keys() == from_checkpoint.keys()
    SwinUNETR(**TINY.monai_kwargs()).load_state_dict(from_checkpoint, strict=True)
    finetune = SwinUNETR(**TINY.monai_kwargs(out_channels=3))
    result = finetune.load_state_dict(monai_state_dict(model, drop_output_layer=True), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(key.startswith("out.") for key in result.missing_keys)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(1, 32, 32, 32), "images"),
        (torch.rand(1, 2, 32, 32, 32), "images"),
        (torch.rand(1, 1, 32, 32, 48), "multiples of 32"),
    ],
)
def test_bad_images_raise(backbone: SwinUNETRBackbone, images: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backbone(images)


def test_bad_export_sources_raise() -> None:
    with pytest.raises(ValueError, match="source"):
        monai_state_dict(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="prefix"):
        monai_state_dict({"a.weight": torch.zeros(1)}, prefix="student.backbone.swin_unetr.")
    with pytest.raises(ValueError, match="prefix"):
        monai_state_dict({"a.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="multiple of 12"):
        SwinUNETRBackboneOptions(feature_size=16)
