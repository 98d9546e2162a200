"""A small SAM-style anatomical embedding network, trained in this plugin instead of loading SAM.

SAM (Yan et al., TMI 2022; medssl §1.3) is a 3D ResNet-18 + FPN giving a coarse "global" and a
stride-2 "local" L2-normalised embedding per voxel. This is the same layout at toy scale:

- three stride-2 convolution stages (strides 2, 4, 8; ``widths`` channels), BatchNorm + ReLU;
- global head on the stride-8 stage (3^3 conv, 1^3 conv to ``global_dim``);
- local head on an FPN: 1^3 lateral convolutions of the three stages to ``fpn_dim``, summed
  top-down with nearest upsampling to stride 2, then a 3^3 conv and a 1^3 conv to ``local_dim``.

BatchNorm rather than instance or group norm: in eval mode it normalises with fixed statistics,
so a whole volume embedded at mining time sees the same normalisation as the training crops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from accord.utils.checks import check_tensor
from accord.config import StrictModel
from accord_medssl.anatomy.embedding import AnatomyEmbedding, Embedder
from accord_medssl.anatomy.grid import embedding_grid_shape

__all__ = ["AnatomyEmbeddingModel", "AnatomyEmbeddingOptions", "model_embedder"]

LOCAL_STRIDE = 2
GLOBAL_STRIDE = 8


class AnatomyEmbeddingOptions(StrictModel):
    """Architecture of :class:`AnatomyEmbeddingModel` (SAM uses 128-d embeddings)."""

    in_channels: int = Field(1, ge=1, description="image channels")
    widths: tuple[int, int, int] = Field((16, 32, 64), description="channels of the stride-2, -4 and -8 stages")
    fpn_dim: int = Field(32, ge=1, description="channels of the FPN feeding the local head")
    global_dim: int = Field(128, ge=1, description="size of the global (coarse) embedding")
    local_dim: int = Field(128, ge=1, description="size of the local (fine) embedding")


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


def _embedding_head(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, in_channels, 3, padding=1, bias=False),
        nn.BatchNorm3d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(in_channels, out_channels, 1),
    )


class AnatomyEmbeddingModel(nn.Module):
    """Global (stride 8) and local (stride 2) voxel embeddings, each L2-normalised per location.

    Args:
        options: the architecture.

    Shape:
        - Input: ``(B, in_channels, D, H, W)``, spatial sizes multiples of 8.
        - Output: ``(global (B, global_dim, D/8, H/8, W/8), local (B, local_dim, D/2, H/2, W/2))``.

    Example:
        >>> model = AnatomyEmbeddingModel(AnatomyEmbeddingOptions(global_dim=16, local_dim=16))
        >>> global_map, local_map = model(torch.rand(2, 1, 32, 32, 32))
        >>> global_map.shape, local_map.shape
        (torch.Size([2, 16, 4, 4, 4]), torch.Size([2, 16, 16, 16, 16]))
    """

    global_stride = GLOBAL_STRIDE
    local_stride = LOCAL_STRIDE

    def __init__(self, options: AnatomyEmbeddingOptions | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else AnatomyEmbeddingOptions()
        opts = self.options
        channels = (opts.in_channels, *opts.widths)
        self.stages = nn.ModuleList(_conv_block(channels[i], channels[i + 1], stride=2) for i in range(3))
        self.global_head = _embedding_head(opts.widths[-1], opts.global_dim)
        self.laterals = nn.ModuleList(nn.Conv3d(width, opts.fpn_dim, 1) for width in opts.widths)
        self.local_head = _embedding_head(opts.fpn_dim, opts.local_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global and local embedding maps of a batch of crops or volumes.

        Raises:
            ValueError: wrong rank or channels, or a spatial size that is not a multiple of 8.
        """
        check_tensor(images, "images", shape=(None, self.options.in_channels, None, None, None), floating=True)
        if any(size % GLOBAL_STRIDE for size in images.shape[2:]):
            raise ValueError(
                f"images: spatial sizes must be multiples of {GLOBAL_STRIDE}, got shape {tuple(images.shape)}"
            )
        features = []
        hidden = images
        for stage in self.stages:
            hidden = stage(hidden)
            features.append(hidden)
        global_map = F.normalize(self.global_head(features[-1]), dim=1)
        pyramid = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            pyramid = lateral(feature) + F.interpolate(pyramid, size=feature.shape[2:], mode="nearest")
        local_map = F.normalize(self.local_head(pyramid), dim=1)
        return global_map, local_map

    @torch.no_grad()
    def embed_volume(self, volume: torch.Tensor) -> AnatomyEmbedding:
        """Embed one whole volume in eval mode (the module's train/eval mode is restored after).

        The volume is zero-padded at its upper ends to a multiple of 8 (so cell ``j`` still covers
        voxels ``[j s, (j + 1) s)``) and the maps are cut back to ``ceil(S / stride)`` cells.

        Args:
            volume: ``(in_channels, D, H, W)`` on the model's device.

        Returns:
            The embedding; maps ``(C, *grid)`` on the model's device.
        """
        check_tensor(volume, "volume", shape=(self.options.in_channels, None, None, None), floating=True)
        shape = tuple(volume.shape[1:])
        padding = []
        for size in reversed(shape):  # F.pad lists the last axis first
            padding += [0, -size % GLOBAL_STRIDE]
        was_training = self.training
        self.eval()
        try:
            global_map, local_map = self(F.pad(volume, padding).unsqueeze(0))
        finally:
            self.train(was_training)
        global_grid = embedding_grid_shape(shape, GLOBAL_STRIDE)
        local_grid = embedding_grid_shape(shape, LOCAL_STRIDE)
        return AnatomyEmbedding(
            global_map=global_map[0, :, : global_grid[0], : global_grid[1], : global_grid[2]],
            local_map=local_map[0, :, : local_grid[0], : local_grid[1], : local_grid[2]],
            global_stride=(GLOBAL_STRIDE,) * 3,
            local_stride=(LOCAL_STRIDE,) * 3,
            volume_shape=shape,
        )


def model_embedder(model: AnatomyEmbeddingModel) -> Embedder:
    """An :data:`Embedder` that runs ``model`` on the volume (moved to the model's device)."""

    def embed(key: str, volume: torch.Tensor) -> AnatomyEmbedding:
        return model.embed_volume(volume.to(next(model.parameters()).device))

    return embed
