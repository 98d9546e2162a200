"""Backbones of the medssl methods."""

from __future__ import annotations

from accord_medssl.models.swin_unetr import (
    BackboneOutput,
    SwinUNETRBackbone,
    SwinUNETRBackboneOptions,
    monai_state_dict,
)

__all__ = ["BackboneOutput", "SwinUNETRBackbone", "SwinUNETRBackboneOptions", "monai_state_dict"]
