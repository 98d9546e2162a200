"""Small 2D encoder and the SimCLR wrapper used by the core demo."""

from __future__ import annotations

import torch
from torch import nn

from accord.config import StrictModel
from accord.heads.mlp import ProjectionHead
from accord.losses.infonce import NTXentLoss

__all__ = ["EncoderConfig", "ConvEncoder", "SimCLR"]


class EncoderConfig(StrictModel):
    """Size of the toy encoder."""

    width: int = 32
    feature_dim: int = 64
    projection_dim: int = 32


class ConvEncoder(nn.Module):
    """Three strided conv blocks and global average pooling.

    Shape:
        input ``(B, 1, H, W)`` -> output ``(B, feature_dim)``.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.feature_dim = feature_dim

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

        self.body = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, feature_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).mean(dim=(2, 3))


class SimCLR(nn.Module):
    """Encoder + projection head trained with NT-Xent on two views.

    ``forward(batch)`` takes ``(view_a, view_b)``, each ``(B, 1, H, W)``, and returns the trainer's
    loss dict ``{"loss": ...}``.
    """

    def __init__(self, encoder: ConvEncoder, projection_dim: int, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        dim = encoder.feature_dim
        self.projection = ProjectionHead(dim, dim, projection_dim, num_layers=2, batch_norm=True, last_bn=False)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        view_a, view_b = batch
        z = self.projection(self.encoder(torch.cat([view_a, view_b])))
        z_a, z_b = z.chunk(2)
        return {"loss": self.criterion(z_a, z_b)}
