"""Losses: each an ``nn.Module`` with tensor shapes in its docstring and a test against a plain
reference. See docs/engine.md for how plugins compose them with matchers."""

from __future__ import annotations

from accord.losses.cosine import MaskedDenseCosineLoss, NegativeCosineSimilarity
from accord.losses.distill import DINOLoss, IBOTPatchLoss
from accord.losses.grouped import GroupedContrastLoss, group_mean_pool
from accord.losses.infonce import InfoNCELoss, NTXentLoss, SoftTargetContrastiveLoss, SupConLoss, info_nce
from accord.losses.memory import MemoryQueue

__all__ = [
    "DINOLoss",
    "GroupedContrastLoss",
    "IBOTPatchLoss",
    "InfoNCELoss",
    "MaskedDenseCosineLoss",
    "MemoryQueue",
    "NTXentLoss",
    "NegativeCosineSimilarity",
    "SoftTargetContrastiveLoss",
    "SupConLoss",
    "group_mean_pool",
    "info_nce",
]
