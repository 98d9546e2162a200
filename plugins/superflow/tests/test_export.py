"""``accord export --format mmdet3d``: the shipped mmdet3d segmentor loads the backbone and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from accord.config import TrainerConfig
from accord.training import Trainer, load_checkpoint

SEGMENTOR_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "superflow" / "minkunet34_seg.py"
TINY_BACKBONE = {"base_channels": 4, "encoder_channels": [4, 8, 8, 8], "encoder_blocks": [2, 3, 4, 6],
                 "decoder_channels": [8, 8, 4, 4], "decoder_blocks": [2, 2, 2, 2]}


@pytest.fixture(scope="module")
def pretrained(pretrain_one_step) -> Path:
    """A SuperFlow checkpoint after one optimizer step (tiny MinkUNet-34: the real block counts)."""
    return pretrain_one_step(TINY_BACKBONE, "export")


@pytest.fixture(scope="module")
def exported(pretrained: Path) -> Path:
    from typer.testing import CliRunner

    from accord.cli import app

    out = pretrained.parent.parent / "superflow_minkunet34.pth"
    result = CliRunner().invoke(app, ["export", str(pretrained), "--format", "mmdet3d", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _segmentor(**backbone_options):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet3d.registry import MODELS

    config = Config.fromfile(str(SEGMENTOR_CONFIG))
    config.model.backbone.update(TINY_BACKBONE, **backbone_options)
    config.model.decode_head.channels = TINY_BACKBONE["decoder_channels"][-1]
    init_default_scope(config.default_scope)
    return MODELS.build(config.model)


def _pretrained_backbone(pretrained: Path) -> dict[str, torch.Tensor]:
    """``backbone.*`` weights of the pretraining checkpoint as the segmentor holds them (spconv 2.x kernels)."""
    source = load_checkpoint(pretrained)["model"]
    return {"backbone." + k.removeprefix("backbone_3d."): v for k, v in source.items() if k.startswith("backbone_3d.")}


def test_export_is_a_weights_only_mmengine_checkpoint(pretrained, exported):
    from accord_superflow.weights import to_spconv1_layout

    payload = torch.load(exported, map_location="cpu", weights_only=True)
    weights = payload["state_dict"]
    expected = _pretrained_backbone(pretrained)
    assert set(weights) == set(expected)
    for key, value in expected.items():
        # Sparse kernels go out in mmdet3d's canonical (spconv 1.x) layout, everything else as is.
        assert torch.equal(weights[key], to_spconv1_layout(value) if value.ndim == 5 else value), key
    assert payload["meta"]["step"] == 1


def test_shipped_segmentor_config_loads_every_backbone_key_and_runs(pretrained, exported, _tiny_template):
    from mmengine.runner import load_checkpoint as mmengine_load_checkpoint
    from mmdet3d.structures import Det3DDataSample, PointData

    from accord_superflow.data import load_info_index
    from accord_superflow.pretrain import load_lidar_points

    expected = _pretrained_backbone(pretrained)
    model = _segmentor()
    weights = torch.load(exported, map_location="cpu", weights_only=True)["state_dict"]
    incompatible = model.load_state_dict(weights, strict=False)
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert not incompatible.unexpected_keys
    # Every mmdet3d route (plain load_state_dict, load_from, init_cfg with a prefix) gives back
    # the pretrained tensors, kernels in spconv 2.x layout.
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    model = _segmentor()
    mmengine_load_checkpoint(model, str(exported), map_location="cpu", strict=False)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    model = _segmentor(init_cfg=dict(type="Pretrained", checkpoint=str(exported), prefix="backbone."))
    model.init_weights()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())

    index = load_info_index(_tiny_template, "v1.0-mini", "mini_train", max_sweeps=0,
                            cache_dir=exported.parent / "index")
    scan = torch.from_numpy(load_lidar_points(_tiny_template / index.keyframes[0].lidar.path))
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor({"inputs": {"points": [scan]}, "data_samples": [Det3DDataSample()]}, False)
        prediction = model(**data, mode="predict")[0]
    assert prediction.pred_pts_seg.pts_semantic_mask.shape == (len(scan),)

    model.train()
    sample = Det3DDataSample()
    sample.gt_pts_seg = PointData(pts_semantic_mask=torch.randint(0, 16, (len(scan),)))
    data = model.data_preprocessor({"inputs": {"points": [scan]}, "data_samples": [sample]}, True)
    losses = model(**data, mode="loss")
    assert torch.isfinite(sum(losses.values()))


def test_export_loads_into_the_stock_mmdet3d_backbone(pretrained, exported):
    from mmdet3d.models.backbones import MinkUNetBackbone

    stock = MinkUNetBackbone(in_channels=4, num_stages=4, sparseconv_backend="spconv",
                             **{k: list(v) if isinstance(v, list) else v for k, v in TINY_BACKBONE.items()})
    weights = torch.load(exported, map_location="cpu", weights_only=True)["state_dict"]
    stock.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items()})
    expected = _pretrained_backbone(pretrained)
    assert all(torch.equal(v, expected["backbone." + k]) for k, v in stock.state_dict().items())


def test_export_refuses_a_checkpoint_without_a_superflow_backbone(tmp_path):
    from torch import nn

    from accord_superflow.export import export_mmdet3d

    model = nn.Linear(2, 2)
    run = Trainer(TrainerConfig(max_steps=1, batch_size=2), tmp_path, seed=0).fit(
        _LinearLoss(model), torch.utils.data.TensorDataset(torch.randn(4, 2)))
    with pytest.raises(ValueError, match="backbone_3d"):
        export_mmdet3d(run["checkpoint"], tmp_path / "out.pth")


class _LinearLoss(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, batch):
        (inputs,) = batch
        return {"loss": self.layer(inputs).square().mean()}
