"""MinkUNet-34 on spconv, built from mmdet3d's ``MinkUNetBackbone`` so weights move unchanged.

:class:`SFMinkUNetBackbone` *is* an mmdet3d ``MinkUNetBackbone(sparseconv_backend='spconv')``:
every layer (and so every ``state_dict`` key) comes from mmdet3d's constructor. It differs in two
places only, both fixes the method spec asks for:

* the sparse tensor's spatial shape is rounded up to a multiple of 16 instead of mmdet3d's
  ``max + 1``: spconv's ``k=2, s=2`` convolution drops voxels on the upper edge of an odd
  dimension (spec §2.1 / pitfall 12), so :meth:`SFMinkUNetBackbone.forward` builds the tensor
  itself and then runs the same U-Net pass;
* BatchNorm momentum is configurable (0.05 in pretraining, 0.02 downstream), which
  ``MinkUNetBackbone`` does not expose.

It is registered in mmdet3d's ``MODELS`` under its own name (registering a second
``MinkUNetBackbone`` raises a duplicate-name ``KeyError``, spec pitfall 3), so mmdet3d configs can
use it through ``custom_imports``; its checkpoints also load into the stock ``MinkUNetBackbone``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from accord_superflow.models import spconv_compat  # noqa: F401  (patches spconv before first use)
from accord_superflow.models.config import BackboneConfig
from accord_superflow.models.voxelize import padded_spatial_shape

from mmdet3d.models.backbones import MinkUNetBackbone  # isort: skip
from mmdet3d.models.layers.sparse_block import replace_feature  # isort: skip
from mmdet3d.registry import MODELS  # isort: skip
from spconv.pytorch import SparseConvTensor  # isort: skip

__all__ = ["SFMinkUNetBackbone", "build_backbone", "set_batchnorm_momentum"]


def set_batchnorm_momentum(module: nn.Module, momentum: float) -> None:
    """Set ``momentum`` on every BatchNorm layer of ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = momentum


@MODELS.register_module()
class SFMinkUNetBackbone(MinkUNetBackbone):
    """mmdet3d ``MinkUNetBackbone`` on spconv with a padded spatial shape and set BN momentum.

    Args:
        in_channels: input voxel feature width.
        base_channels: stem width.
        encoder_channels: width of each encoder stage.
        encoder_blocks: BasicBlocks per encoder stage.
        decoder_channels: width of each decoder stage (the last one is the output width).
        decoder_blocks: BasicBlocks per decoder stage.
        bn_momentum: momentum of every BatchNorm; ``None`` keeps mmdet3d's (0.1).
        shape_multiple: spatial shape rounded up to this (``2 ** stages``).
        init_cfg: mmengine initialisation config (e.g. ``Pretrained``).

    Shape:
        - ``voxel_features``: ``(V, in_channels)``; ``coors``: ``(V, 4)`` int ``(batch, i, j, k)``,
          non-negative.
        - Output: ``(V, decoder_channels[-1])`` in the order of the input voxels.
    """

    def __init__(self, in_channels: int = 4, base_channels: int = 32,
                 encoder_channels: Sequence[int] = (32, 64, 128, 256), encoder_blocks: Sequence[int] = (2, 3, 4, 6),
                 decoder_channels: Sequence[int] = (256, 128, 96, 96), decoder_blocks: Sequence[int] = (2, 2, 2, 2),
                 bn_momentum: float | None = None, shape_multiple: int | None = None, init_cfg=None) -> None:
        # MinkUNetBackbone inserts into its list arguments, so hand it fresh lists.
        super().__init__(in_channels=in_channels, base_channels=base_channels, num_stages=len(encoder_channels),
                         encoder_channels=list(encoder_channels), encoder_blocks=list(encoder_blocks),
                         decoder_channels=list(decoder_channels), decoder_blocks=list(decoder_blocks),
                         block_type="basic", sparseconv_backend="spconv", init_cfg=init_cfg)
        self.out_channels = int(decoder_channels[-1])
        self.shape_multiple = 2 ** len(encoder_channels) if shape_multiple is None else shape_multiple
        if bn_momentum is not None:
            set_batchnorm_momentum(self, bn_momentum)

    def forward(self, voxel_features: torch.Tensor, coors: torch.Tensor) -> torch.Tensor:
        """Per-voxel features (see the class docstring for shapes)."""
        coors = coors.int()
        spatial_shape = padded_spatial_shape(coors[:, 1:], self.shape_multiple)
        x = SparseConvTensor(voxel_features, coors, spatial_shape, int(coors[:, 0].max()) + 1)
        # mmdet3d's U-Net pass for the spconv backend.
        x = self.conv_input(x)
        laterals = [x]
        for encoder_layer in self.encoder:
            x = encoder_layer(x)
            laterals.append(x)
        laterals = laterals[:-1][::-1]
        for lateral, (upsample, blocks) in zip(laterals, self.decoder):
            x = upsample(x)
            x = blocks(replace_feature(x, torch.cat((x.features, lateral.features), dim=1)))
        return x.features


def build_backbone(config: BackboneConfig = BackboneConfig()) -> SFMinkUNetBackbone:
    """The 3D backbone of a :class:`BackboneConfig`."""
    return SFMinkUNetBackbone(**config.mmdet3d_kwargs())
