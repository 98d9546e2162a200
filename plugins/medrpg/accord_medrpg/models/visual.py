"""Visual branch of TransVG: ResNet (frozen BatchNorm, MONAI) + DETR transformer encoder.

The image ``(B, 3, S, S)`` becomes ``(S/32)^2`` tokens of width ``dim`` with a padding mask and a 2-D
sine position embedding (``S = 640``: a 20 x 20 grid, 400 tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from accord_medrpg.models.layers import Encoder

__all__ = ["FrozenBatchNorm2d", "freeze_batch_norm", "ResNetBackbone", "sine_position_embedding", "VisualEncoder"]

#: Downsampling of the ResNet's last stage (C5): the token grid is ``image_size / STRIDE``.
STRIDE = 32


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers), as DETR's backbone.

    Neither torch nor MONAI ships one (torchvision does, but cannot be installed beside the CPU torch
    build). Its state-dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``) match
    ``nn.BatchNorm2d`` so ImageNet / DETR ResNet weights load directly.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a :class:`FrozenBatchNorm2d` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, child.eps))
        else:
            freeze_batch_norm(child)
    return module


class ResNetBackbone(nn.Module):
    """MONAI 2-D bottleneck ResNet up to C5 (stride 32), frozen BatchNorm, stem and first stage frozen.

    Parameter names equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so DETR /
    TransVG backbone weights map onto it by prefix only (:mod:`accord_medrpg.weights`).

    Args:
        layers: blocks per stage (ResNet-50: ``[3, 4, 6, 3]``).
        widths: bottleneck widths per stage (ResNet-50: ``[64, 128, 256, 512]``; output ``4 * widths[-1]``).
        train_from: the first trainable stage (``"layer2"`` as DETR: the stem and ``layer1`` stay fixed).
    """

    def __init__(self, layers: list[int], widths: list[int], train_from: str = "layer2") -> None:
        super().__init__()
        self.body = freeze_batch_norm(ResNet(
            "bottleneck", layers, widths, spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2,
            shortcut_type="B", bias_downsample=False, feed_forward=False,
        ))
        # MONAI's ResNet ends in pooling + fc; only the stages are used.
        self.body.avgpool = nn.Identity()
        self.body.fc = None
        self.out_channels = 4 * widths[-1]
        stages = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
        if train_from not in stages:
            raise ValueError(f"train_from must be one of {stages}, got {train_from!r}")
        for stage in stages[: stages.index(train_from)]:
            for parameter in getattr(self.body, stage).parameters():
                parameter.requires_grad_(False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> C5 ``(B, 4 * widths[-1], S/32, S/32)``."""
        body = self.body
        x = body.maxpool(body.act(body.bn1(body.conv1(image))))
        return body.layer4(body.layer3(body.layer2(body.layer1(x))))


def sine_position_embedding(padding_mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding (``PositionEmbeddingSine(dim / 2, normalize=True)``).

    Written here because transformers' DETR embedding changed its signature between 4.x and 5.x.

    Args:
        padding_mask: ``(B, H, W)`` bool, True on padding (positions count valid cells only).
        dim: embedding width (even); half encodes y, half x.

    Returns:
        ``(B, H, W, dim)``.
    """
    valid = (~padding_mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    half = dim // 2
    frequencies = temperature ** (2 * (torch.arange(half, device=x.device) // 2) / half)
    pos_x = x[..., None] / frequencies
    pos_y = y[..., None] / frequencies
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3)


class VisualEncoder(nn.Module):
    """ResNet C5 -> 1x1 ``input_proj`` -> DETR encoder with sine positions.

    Args:
        dim: token width.
        resnet_layers, resnet_widths, train_from: see :class:`ResNetBackbone`.
        layers, heads, ffn_dim, dropout: the DETR encoder (``layers=0`` skips it).
    """

    def __init__(self, dim: int, resnet_layers: list[int], resnet_widths: list[int], train_from: str,
                 layers: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(resnet_layers, resnet_widths, train_from)
        self.input_proj = nn.Conv2d(self.backbone.out_channels, dim, kernel_size=1)
        self.encoder = Encoder(layers, dim, heads, ffn_dim, dropout)
        self.dim = dim

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: image ``(B, 3, S, S)``, image_mask ``(B, S, S)`` bool (True = padding).

        Returns:
            ``(tokens (B, G*G, dim), padding mask (B, G*G) bool)``, ``G = S / 32``, row-major (y, x).
        """
        features = self.backbone(image)
        mask = F.interpolate(image_mask[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0].bool()
        pos = sine_position_embedding(mask, self.dim).flatten(1, 2)
        tokens = self.input_proj(features).flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        tokens, _ = self.encoder(tokens, pos, mask)
        return tokens, mask
