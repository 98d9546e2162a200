"""SuperFlow's projection heads into the shared 64-d contrast space (both outputs L2-normalised).

* 3D: ``Linear(96 -> 64)`` per point (``LinearHead``, no dropout);
* 2D: ``Conv1x1(C_vit -> 64)`` on the ViT token map, then bilinear x patch-size upsampling with
  ``align_corners=True`` back to the image resolution (``UpsampleHead``).

Both reuse accord's heads with one linear layer (a 1x1 conv is a per-location linear layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from accord.heads import DenseProjectionHead, ProjectionHead

__all__ = ["PointHead", "PixelHead"]


class PointHead(nn.Module):
    """``normalize(Linear(features))``.

    Args:
        in_dim: backbone output width (96 for MinkUNet-34).
        out_dim: contrast dimension (64).

    Shape:
        - Input: ``(N, in_dim)``; output: ``(N, out_dim)`` with unit rows.
    """

    def __init__(self, in_dim: int = 96, out_dim: int = 64) -> None:
        super().__init__()
        self.projection = ProjectionHead(in_dim, in_dim, out_dim, num_layers=1, batch_norm=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(features), dim=1)


class PixelHead(nn.Module):
    """``normalize(upsample(conv1x1(token_map)))`` to one feature per image pixel.

    Args:
        in_dim: ViT width (768 for ViT-B/14).
        out_dim: contrast dimension (64).
        scale: upsampling factor, the ViT patch size (14).

    Shape:
        - Input: ``(I, in_dim, h, w)``; output: ``(I, out_dim, h * scale, w * scale)``, unit
          vectors along dim 1.
    """

    def __init__(self, in_dim: int = 768, out_dim: int = 64, scale: int = 14) -> None:
        super().__init__()
        self.projection = DenseProjectionHead(in_dim, in_dim, out_dim, num_layers=1, batch_norm=False)
        self.scale = scale

    def forward(self, token_map: torch.Tensor) -> torch.Tensor:
        projected = self.projection(token_map)
        upsampled = F.interpolate(projected, scale_factor=self.scale, mode="bilinear", align_corners=True)
        return F.normalize(upsampled, dim=1)
