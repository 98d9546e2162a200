"""Config sections of the SuperFlow networks (import-light: no mmdet3d, spconv or transformers)."""

from __future__ import annotations

from pydantic import Field, model_validator

from accord.config import ExistingPath, StrictModel

__all__ = ["BackboneConfig", "TeacherConfig"]


class BackboneConfig(StrictModel):
    """MinkUNet widths and depths (defaults: MinkUNet-34 as in SuperFlow / SLidR's Res16UNet34C)."""

    in_channels: int = Field(4, ge=1, description="point features: x, y, z, intensity")
    base_channels: int = Field(32, ge=1, description="stem width")
    encoder_channels: list[int] = [32, 64, 128, 256]
    encoder_blocks: list[int] = [2, 3, 4, 6]
    decoder_channels: list[int] = [256, 128, 96, 96]
    decoder_blocks: list[int] = [2, 2, 2, 2]
    bn_momentum: float = Field(0.05, gt=0, le=1, description="0.05 pretraining, 0.02 downstream (torch semantics)")

    @model_validator(mode="after")
    def _stages_agree(self) -> BackboneConfig:
        lengths = {len(self.encoder_channels), len(self.encoder_blocks), len(self.decoder_channels),
                   len(self.decoder_blocks)}
        if len(lengths) != 1:
            raise ValueError("encoder_channels, encoder_blocks, decoder_channels and decoder_blocks need one "
                             "entry per stage each")
        return self

    @property
    def out_channels(self) -> int:
        return self.decoder_channels[-1]

    def mmdet3d_kwargs(self) -> dict:
        """Constructor arguments of ``SFMinkUNetBackbone`` (also valid keys of an mmdet3d config)."""
        return self.model_dump()


class TeacherConfig(StrictModel):
    """The frozen DINOv2 teacher."""

    weights: ExistingPath | None = Field(
        None, description="local Dinov2Model directory (save_pretrained of facebook/dinov2-base for ViT-B/14); "
                          "None: a small random ViT (smoke tests and demos only)")
    random_width: int = Field(32, ge=1, description="hidden size of the random ViT")
    random_layers: int = Field(2, ge=1, description="layers of the random ViT")
    random_heads: int = Field(2, ge=1, description="attention heads of the random ViT")
