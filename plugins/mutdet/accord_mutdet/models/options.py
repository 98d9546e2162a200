"""Config schemas of the detector and of MutDet's pretraining additions."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from accord.config import StrictModel

__all__ = ["DetectorOptions", "MutDetOptions"]


class DetectorOptions(StrictModel):
    """ARS-DETR-style rotated deformable DETR (spec §4). Defaults: the fine-tuning model (R50, 6 + 6)."""

    backbone: Literal["resnet50", "resnet18", "tiny"] = Field("resnet50", description="MONAI ResNet variant")
    backbone_weights: Path | None = Field(
        None, description="local torchvision-layout ResNet state dict (e.g. ImageNet resnet50); None: random init")
    embed_dim: int = Field(256, ge=8, multiple_of=8, description="transformer width (GN: 32 groups at 256)")
    num_heads: int = Field(8, ge=1)
    ffn_dim: int = Field(1024, ge=8, description="feed-forward width of encoder and decoder layers")
    dropout: float = Field(0.1, ge=0, lt=1)
    encoder_layers: int = Field(6, ge=1, description="deformable encoder layers (MutDet pretraining R50: 2)")
    decoder_layers: int = Field(6, ge=1, description="rotated deformable decoder layers (MutDet pretraining R50: 2)")
    num_points: int = Field(4, ge=1, description="sampling points per head and level")
    num_queries: int = Field(300, ge=1, description="two-stage top-k proposals = decoder queries")
    num_dn_queries: int = Field(100, ge=0, description="denoising queries (groups = num_dn // most targets); 0: off")
    dn_label_noise: float = Field(0.5, ge=0, le=1)
    dn_box_noise: float = Field(0.4, ge=0)
    dn_angle_noise: float = Field(0.02, ge=0)
    max_detections: int = Field(100, ge=1, description="detections kept per image by predict()")


class MutDetOptions(StrictModel):
    """MutDet's pretraining parts (spec §5-§7). ``enhancement: false`` is the DETReg-style baseline."""

    enhancement: bool = Field(True, description="mutual enhancement + enhanced branch + alignment loss; "
                              "false: DETReg-style pretraining on pseudo-boxes and pseudo-classes only")
    depth: int = Field(3, ge=1, description="two-way blocks")
    mlp_dim: int = Field(2048, ge=8, description="hidden width of the object MLP in a block")
    object_dim: int = Field(256, ge=2, description="width of the object embeddings (PCA-256)")
    encoder_embed_dim: int = Field(1024, ge=8, description="hidden width of the encoder embedding MLP")
    tau: float = Field(0.2, gt=0, description="alignment temperature; the outer factor is 2 tau")
    proposal_score: Literal["logit", "sigmoid"] = Field(
        "logit", description="similarity x raw objectness logit (the reference) or x its sigmoid")
