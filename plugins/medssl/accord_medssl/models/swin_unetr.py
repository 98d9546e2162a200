"""MONAI SwinUNETR as a self-supervision backbone: pooled, encoder and decoder tokens plus a reconstruction.

Alice's reference backbone is an nnFormer (medssl §1.4); this plugin uses MONAI's ``SwinUNETR``
instead so that pretrained weights load straight into MONAI fine-tuning. The network is kept whole
under :attr:`SwinUNETRBackbone.swin_unetr`, so its weights are a key-prefix strip away from a plain
``SwinUNETR`` state dict (:func:`monai_state_dict`).

Token geometry for a ``(B, 1, D, H, W)`` input (every spatial size a multiple of 32), ``F`` the
feature size:

- encoder tokens: the output of the deepest Swin stage, stride 32, ``16 F`` channels;
- pooled token: their mean (nnFormer's "[CLS]" is the same global average of its deepest stage);
- decoder tokens: the first upsampling decoder block (``decoder5``), stride 16, ``8 F`` channels,
  so there are 8x more decoder than encoder tokens, as in Alice's nnFormer (64 vs 512 at 64^3);
- reconstruction: SwinUNETR's output block, full resolution, ``in_channels`` channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import SwinUNETR
from pydantic import Field, field_validator
from torch import nn

from accord.utils.checks import check_tensor
from accord.config import StrictModel

__all__ = ["BackboneOutput", "SwinUNETRBackbone", "SwinUNETRBackboneOptions", "monai_state_dict"]

#: SwinUNETR halves the resolution five times (patch embedding + four patch mergings).
SIZE_MULTIPLE = 32


class SwinUNETRBackboneOptions(StrictModel):
    """SwinUNETR hyper-parameters (MONAI's names); the defaults are MONAI's 3D SwinUNETR defaults."""

    in_channels: int = Field(1, ge=1, description="image channels (CT: 1); also the reconstruction's channels")
    feature_size: int = Field(48, ge=12, description="channels of the first stage; a multiple of 12")
    depths: tuple[int, int, int, int] = Field((2, 2, 2, 2), description="Swin blocks per stage")
    num_heads: tuple[int, int, int, int] = Field((3, 6, 12, 24), description="attention heads per stage")
    window_size: int = Field(7, ge=1, description="attention window edge (clamped to small feature maps)")
    norm_name: str = Field(
        "instance",
        description="norm of the convolutional blocks; 'instance' needs inputs of at least 64^3 in "
        "training (the stride-32 map must have more than one voxel), 'batch' also works on 32^3",
    )
    dropout_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic-depth rate")
    use_checkpoint: bool = Field(False, description="activation checkpointing in the Swin stages")
    use_v2: bool = Field(False, description="SwinUNETR-V2 (a residual conv block before each stage)")

    @field_validator("feature_size")
    @classmethod
    def _multiple_of_twelve(cls, value: int) -> int:
        # MONAI's SwinUNETR refuses other sizes (the stage widths must split into heads and halves).
        if value % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {value}")
        return value

    def monai_kwargs(self, out_channels: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``monai.networks.nets.SwinUNETR`` with this architecture.

        Args:
            out_channels: the output classes of a fine-tuning model; defaults to ``in_channels``
                (the reconstruction head, for a strict load of :func:`monai_state_dict`).
        """
        return {
            "in_channels": self.in_channels,
            "out_channels": self.in_channels if out_channels is None else out_channels,
            "feature_size": self.feature_size,
            "depths": self.depths,
            "num_heads": self.num_heads,
            "window_size": self.window_size,
            "norm_name": self.norm_name,
            "dropout_path_rate": self.dropout_path_rate,
            "use_checkpoint": self.use_checkpoint,
            "use_v2": self.use_v2,
        }


@dataclass(frozen=True)
class BackboneOutput:
    """Features of one forward pass of :class:`SwinUNETRBackbone`.

    Tokens are flattened in C order over their grid (last spatial axis fastest), the convention of
    :mod:`accord.matchers`.

    Attributes:
        pooled: mean of the encoder tokens, ``(B, C_enc)`` with ``C_enc = 16 * feature_size``.
        encoder_tokens: deepest Swin stage, ``(B, T_enc, C_enc)``, ``T_enc = D H W / 32^3``.
        decoder_tokens: first upsampling decoder block, ``(B, T_dec, C_dec)``,
            ``C_dec = 8 * feature_size``, ``T_dec = 8 * T_enc``.
        encoder_grid: the encoder tokens' grid ``(D / 32, H / 32, W / 32)``.
        decoder_grid: the decoder tokens' grid ``(D / 16, H / 16, W / 16)``.
        reconstruction: ``(B, in_channels, D, H, W)``, or ``None`` when not requested.
    """

    pooled: torch.Tensor
    encoder_tokens: torch.Tensor
    decoder_tokens: torch.Tensor
    encoder_grid: tuple[int, int, int]
    decoder_grid: tuple[int, int, int]
    reconstruction: torch.Tensor | None


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, C, *grid)`` -> ``(B, prod(grid), C)``."""
    return feature_map.flatten(2).transpose(1, 2)


class SwinUNETRBackbone(nn.Module):
    """MONAI SwinUNETR exposing the features self-distillation needs.

    Args:
        options: the SwinUNETR architecture.

    Shape:
        - Input: ``(B, in_channels, D, H, W)`` with ``D, H, W`` multiples of 32.
        - Output: :class:`BackboneOutput`.

    Example:
        >>> backbone = SwinUNETRBackbone(SwinUNETRBackboneOptions(feature_size=12, norm_name="batch"))
        >>> out = backbone(torch.randn(2, 1, 32, 32, 32))
        >>> out.pooled.shape, out.encoder_tokens.shape, out.decoder_tokens.shape
        (torch.Size([2, 192]), torch.Size([2, 1, 192]), torch.Size([2, 8, 96]))
    """

    def __init__(self, options: SwinUNETRBackboneOptions | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else SwinUNETRBackboneOptions()
        self.swin_unetr = SwinUNETR(**self.options.monai_kwargs())
        self.encoder_channels = 16 * self.options.feature_size
        self.decoder_channels = 8 * self.options.feature_size

    def forward(self, images: torch.Tensor, reconstruct: bool = True) -> BackboneOutput:
        """Run the network.

        Args:
            images: ``(B, in_channels, D, H, W)``, spatial sizes multiples of 32.
            reconstruct: also run the skip encoders, the remaining decoder blocks and the output
                block; an EMA teacher that only needs tokens skips them (most of the full-resolution
                convolution cost).

        Returns:
            The pooled token, encoder and decoder tokens with their grids, and the reconstruction
            (``None`` when ``reconstruct`` is false).

        Raises:
            ValueError: wrong rank, channel count or a spatial size that is not a multiple of 32.
        """
        check_tensor(images, "images", shape=(None, self.options.in_channels, None, None, None), floating=True)
        if any(size % SIZE_MULTIPLE for size in images.shape[2:]):
            raise ValueError(
                f"images: spatial sizes must be multiples of {SIZE_MULTIPLE} (SwinUNETR downsamples 5 times), "
                f"got shape {tuple(images.shape)}"
            )
        net = self.swin_unetr
        # The same data flow as SwinUNETR.forward, spelt out to keep the intermediate features;
        # test_backbone checks that the reconstruction equals SwinUNETR.forward's output.
        hidden_states = net.swinViT(images, net.normalize)
        bottleneck = net.encoder10(hidden_states[4])
        decoder_map = net.decoder5(bottleneck, hidden_states[3])
        reconstruction = None
        if reconstruct:
            skip1 = net.encoder1(images)
            skip2 = net.encoder2(hidden_states[0])
            skip3 = net.encoder3(hidden_states[1])
            skip4 = net.encoder4(hidden_states[2])
            decoded = net.decoder4(decoder_map, skip4)
            decoded = net.decoder3(decoded, skip3)
            decoded = net.decoder2(decoded, skip2)
            decoded = net.decoder1(decoded, skip1)
            reconstruction = net.out(decoded)
        encoder_tokens = _tokens(hidden_states[4])
        return BackboneOutput(
            pooled=encoder_tokens.mean(dim=1),
            encoder_tokens=encoder_tokens,
            decoder_tokens=_tokens(decoder_map),
            encoder_grid=tuple(hidden_states[4].shape[2:]),
            decoder_grid=tuple(decoder_map.shape[2:]),
            reconstruction=reconstruction,
        )


def monai_state_dict(
    source: nn.Module | Mapping[str, torch.Tensor],
    prefix: str | None = None,
    drop_output_layer: bool = False,
) -> dict[str, torch.Tensor]:
    """The SwinUNETR weights of a backbone, keyed as ``monai.networks.nets.SwinUNETR`` expects.

    Args:
        source: a :class:`SwinUNETRBackbone`, a module with a ``backbone`` attribute holding one
            (e.g. :class:`~accord_medssl.alice.AliceModel`, whose ``backbone`` is the student's), or
            a state dict (e.g. ``checkpoint["model"]`` of an accord run) together with ``prefix``.
        prefix: with a state dict, the key prefix in front of the SwinUNETR keys, e.g.
            ``"student.backbone.swin_unetr."`` for an Alice checkpoint. Ignored for modules.
        drop_output_layer: leave out the reconstruction output block (``out.*``) for a fine-tuning
            model with a different number of classes; load that with ``strict=False`` and check
            that the only missing keys are ``out.*``.

    Returns:
        A new dict; ``SwinUNETR(**options.monai_kwargs()).load_state_dict(result, strict=True)``
        succeeds (without ``drop_output_layer``).

    Raises:
        ValueError: a module without a SwinUNETR backbone, or no key with ``prefix``.
    """
    if isinstance(source, nn.Module):
        backbone = source if isinstance(source, SwinUNETRBackbone) else getattr(source, "backbone", None)
        if not isinstance(backbone, SwinUNETRBackbone):
            raise ValueError(
                f"source: expected a SwinUNETRBackbone or a module whose 'backbone' is one, got {type(source).__name__}"
            )
        weights = dict(backbone.swin_unetr.state_dict())
    elif isinstance(source, Mapping):
        if not prefix:
            raise ValueError("prefix: required when source is a state dict (e.g. 'student.backbone.swin_unetr.')")
        weights = {key[len(prefix) :]: value for key, value in source.items() if key.startswith(prefix)}
        if not weights:
            raise ValueError(f"prefix: no key of the state dict starts with {prefix!r}")
    else:
        raise ValueError(f"source: expected an nn.Module or a state dict, got {type(source).__name__}")
    if drop_output_layer:
        weights = {key: value for key, value in weights.items() if not key.startswith("out.")}
    return weights
