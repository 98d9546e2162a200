"""GEMINI's networks (medssl §2.3): backbone U-Net, shallow deformer, task head; 2D and 3D.

- :class:`GeminiUNet`: the ``UNet_base`` backbone, channels ``(32, 64, 128, 256, 512 | 256, 128,
  64, 32)``, double ``conv3 -> GroupNorm(C/8) -> LeakyReLU(0.2)`` blocks (MONAI's ``TwoConv`` /
  ``Down``), four max-pools, (tri)linear ``align_corners=True`` upsampling with concatenated skips;
  the input is centre-padded to a multiple of 16 and the full-resolution features cropped back.
- :class:`Deformer`: ``UNet_shallow`` (single ``conv3 -> GN -> LeakyReLU`` blocks, channels
  ``(32, 64, 64 | 64, 32)``, two pools, pads to a multiple of 4) and a ``conv3`` to ``d`` channels:
  a displacement field in voxels. With ``diffeomorphic`` the output is a stationary velocity field
  integrated by scaling and squaring (MONAI ``DVF2DDF``), an extension beyond the reference.
- :class:`TaskHead`: ``conv3 -> GN -> LeakyReLU -> conv1`` (restoration: 1 channel; segmentation:
  one per class).

MONAI's ``BasicUNet`` is not used whole: it takes one norm for every block (GEMINI's groups scale
with the channels), upsamples with a channel-halving pre-conv and always ends in a 1x1 conv, so its
weights would not be GEMINI's. All convolutions are Kaiming-normal initialised, as the reference.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, DVF2DDF
from monai.networks.nets.basic_unet import Down, TwoConv
from pydantic import Field, model_validator
from torch import nn

from accord.config import StrictModel

__all__ = ["Deformer", "GeminiNetwork", "GeminiNetworkOptions", "GeminiUNet", "TaskHead"]

_ACT = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})


def _norm(channels: int) -> tuple[str, dict[str, int]]:
    """GEMINI's ``GroupNorm(C / 8)`` (at least one group, for the tiny test widths)."""
    return ("group", {"num_groups": max(1, channels // 8)})


def _centre_pad(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of ``x`` to multiples of ``multiple``, centred; and the crop back."""
    pads, crop = [], [slice(None), slice(None)]
    for size in x.shape[2:]:
        extra = (multiple - size % multiple) % multiple
        pads.append((extra // 2, extra - extra // 2))
        crop.append(slice(extra // 2, extra // 2 + size))
    flat = [amount for before_after in reversed(pads) for amount in before_after]  # F.pad: last axis first
    return F.pad(x, flat), tuple(crop)


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=like.shape[2:], mode=mode, align_corners=True)


def _kaiming(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(layer.weight)


class GeminiNetworkOptions(StrictModel):
    """Architecture of the GEMINI network (defaults: the reference's)."""

    spatial_dims: Literal[2, 3] = Field(3, description="3: volumes; 2: chest X-rays")
    in_channels: int = Field(1, ge=1, description="image channels")
    channels: tuple[int, int, int, int, int] = Field(
        (32, 64, 128, 256, 512), description="backbone encoder widths; the decoder mirrors the first four"
    )
    deformer_channels: tuple[int, int, int, int, int] = Field(
        (32, 64, 64, 64, 32), description="deformer (UNet_shallow) widths: three encoder, two decoder"
    )
    out_channels: int = Field(1, ge=1, description="task head outputs: 1 for restoration, one per class for segmentation")
    diffeomorphic: bool = Field(
        False, description="deformer predicts a stationary velocity field integrated by scaling and squaring "
        "(extension; the reference predicts the displacement directly)"
    )
    integration_steps: int = Field(7, ge=1, description="scaling-and-squaring steps of the diffeomorphic option")
    flow_init: Literal["kaiming", "zero"] = Field(
        "kaiming", description="init of the deformer's output conv: kaiming (reference, initial flows ~0.5 voxel) "
        "or zero (identity at start, as VoxelMorph-style models)"
    )

    @model_validator(mode="after")
    def _groups_divide(self) -> GeminiNetworkOptions:
        for width in (*self.channels, *self.deformer_channels):
            groups = max(1, width // 8)
            if width % groups:
                raise ValueError(f"channel width {width} is not divisible by its {groups} GroupNorm groups (C/8)")
        return self


class GeminiUNet(nn.Module):
    """The backbone: ``(B, in, *spatial) -> (B, channels[0], *spatial)`` dense features, any size."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128, 256, 512)):
        super().__init__()
        c = channels
        self.inc = TwoConv(spatial_dims, in_channels, c[0], _ACT, _norm(c[0]), bias=True)
        self.downs = nn.ModuleList(Down(spatial_dims, c[i], c[i + 1], _ACT, _norm(c[i + 1]), bias=True) for i in range(4))
        # Decoder level i: upsample, concatenate the encoder skip of width c[3 - i], double conv to c[3 - i].
        self.ups = nn.ModuleList(
            TwoConv(spatial_dims, (c[4] if i == 0 else c[4 - i]) + c[3 - i], c[3 - i], _ACT, _norm(c[3 - i]), bias=True)
            for i in range(4)
        )
        self.out_channels = c[0]
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, crop = _centre_pad(x, 16)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            skip = skips.pop()
            y = up(torch.cat([skip, _upsample(y, skip)], dim=1))
        return y[crop]


class Deformer(nn.Module):
    """``[f_moving, f_fixed] (B, 2F, *spatial) -> (B, d, *spatial)``: a displacement field in voxels.

    The displacement lives on the fixed image's grid (``warp(moving, phi) ~ fixed``). With
    ``diffeomorphic`` the convolution's output is a velocity field and the returned displacement its
    scaling-and-squaring exponential (``monai.networks.blocks.DVF2DDF``, which uses the same
    zero-flow-is-identity grid as :func:`~accord_medssl.gemini.warp.warp`'s default).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: tuple[int, ...] = (32, 64, 64, 64, 32),
                 diffeomorphic: bool = False, integration_steps: int = 7, flow_init: str = "kaiming"):
        super().__init__()
        c = channels

        def one_conv(cin: int, cout: int) -> Convolution:
            return Convolution(spatial_dims, cin, cout, kernel_size=3, act=_ACT, norm=_norm(cout))

        self.conv1, self.conv2, self.conv3 = one_conv(in_channels, c[0]), one_conv(c[0], c[1]), one_conv(c[1], c[2])
        self.conv4, self.conv5 = one_conv(c[2] + c[1], c[3]), one_conv(c[3] + c[0], c[4])
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.flow = conv(c[4], spatial_dims, kernel_size=3, padding=1)
        self.pool = nn.MaxPool3d(2) if spatial_dims == 3 else nn.MaxPool2d(2)
        _kaiming(self)
        if flow_init == "zero":
            nn.init.zeros_(self.flow.weight)
            nn.init.zeros_(self.flow.bias)
        self.integrate = None
        if diffeomorphic:
            with warnings.catch_warnings():  # MONAI's note that it uses torch's grid_sample
                warnings.simplefilter("ignore")
                self.integrate = DVF2DDF(num_steps=integration_steps, mode="bilinear", padding_mode="zeros")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x, crop = _centre_pad(torch.cat([moving, fixed], dim=1), 4)
        x1 = self.conv1(x)
        x2 = self.conv2(self.pool(x1))
        x3 = self.conv3(self.pool(x2))
        y = self.conv4(torch.cat([x2, _upsample(x3, x2)], dim=1))
        y = self.conv5(torch.cat([x1, _upsample(y, x1)], dim=1))
        field = self.flow(y)[crop]
        return field if self.integrate is None else self.integrate(field)


class TaskHead(nn.Module):
    """``res_conv``: ``conv3(F -> F/2) -> GN -> LeakyReLU -> conv1(F/2 -> out)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        hidden = max(1, in_channels // 2)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.layers = nn.Sequential(
            conv(in_channels, hidden, kernel_size=3, padding=1),
            nn.GroupNorm(max(1, hidden // 4), hidden),
            nn.LeakyReLU(0.2, inplace=True),
            conv(hidden, out_channels, kernel_size=1),
        )
        _kaiming(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class GeminiNetwork(nn.Module):
    """Backbone, deformer and task head of GEMINI (``GEMINI3d`` / ``GEMINI2d``).

    ``forward(a, b)`` returns ``(f_a, f_b, phi_ab, phi_ba)`` with both flows from the same deformer,
    inputs swapped: ``phi_ab = D([f_a, f_b])`` on B's grid (``warp(a, phi_ab) ~ b``), ``phi_ba =
    D([f_b, f_a])``. :meth:`task` is the reference's ``forward(x, res=True)`` (the restoration or
    segmentation head on the backbone's features) and :meth:`register` its ``test_reg``.
    """

    def __init__(self, options: GeminiNetworkOptions = GeminiNetworkOptions()):
        super().__init__()
        self.options = options
        dims = options.spatial_dims
        self.unet = GeminiUNet(dims, options.in_channels, options.channels)
        features = self.unet.out_channels
        self.deformer = Deformer(dims, 2 * features, options.deformer_channels, options.diffeomorphic,
                                 options.integration_steps, options.flow_init)
        self.head = TaskHead(dims, features, options.out_channels)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``a``, ``b``: ``(B, in, *spatial)`` -> ``f_a``, ``f_b`` ``(B, F, *spatial)`` and ``phi_ab``,
        ``phi_ba`` ``(B, d, *spatial)``."""
        features_a, features_b = self.unet(a), self.unet(b)
        return features_a, features_b, self.deformer(features_a, features_b), self.deformer(features_b, features_a)

    def task(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, *spatial) -> (B, out, *spatial)`` restoration or segmentation logits."""
        return self.head(self.unet(x))

    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The flow on ``fixed``'s grid that warps ``moving`` onto it: ``(B, d, *spatial)``."""
        return self.deformer(self.unet(moving), self.unet(fixed))
