"""SuperFlow's three contrastive terms, each a grouped (superpixel-pooled) InfoNCE.

Every term is accord's :class:`~accord.losses.GroupedContrastLoss`: both sides are mean-pooled per
``(sample, superpixel id)``, the groups present on both sides are kept, and pooled side ``a`` of a
group must pick pooled side ``b`` of the same group among all kept groups of the batch
(one-directional, temperature 0.07; method spec §4):

* **spatial** (2D <-> 3D), per frame ``t, t-1, t+1``: superpoints (3D features of the points that
  project into a superpixel) vs superpixels (2D features of *all* its pixels), averaged over frames;
* **dense-to-sparse** (3D <-> 3D): keyframe superpoints vs superpoints of the dense cloud
  (keyframe + sweeps) pooled with the keyframe's superpixels;
* **temporal** (3D <-> 3D): keyframe superpoints vs the superpoints of the same class-level id at
  ``t - 1`` and at ``t + 1``, averaged.

``loss = w_s * spatial + w_d * dense_to_sparse + w_t * temporal`` (all weights 1 upstream).

Difference from upstream (inherent to the shared engine loss): accord's InfoNCE L2-normalises the
pooled features before the dot product, so logits are cosines of the pooled means; upstream dots
the raw means of unit vectors (norms <= 1). The spec lists re-normalisation as an ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from pydantic import Field
from torch import nn

from accord.config import StrictModel
from accord.losses import GroupedContrastLoss

__all__ = ["GroupedFeatures", "SuperFlowLossConfig", "SuperFlowLoss"]


class GroupedFeatures(NamedTuple):
    """Elements (point-pixel pairs or pixels) with their features and superpixel group.

    Attributes:
        features: ``(N, D)`` features.
        group_ids: ``(N,)`` integer superpixel id within the sample, in
            ``[0, groups_per_sample)``, or -1 for no group.
        batch_index: ``(N,)`` integer sample of each element.
    """

    features: torch.Tensor
    group_ids: torch.Tensor
    batch_index: torch.Tensor


class SuperFlowLossConfig(StrictModel):
    """Weights and temperature of the three terms (defaults: the released SuperFlow code)."""

    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature of every term")
    spatial_weight: float = Field(1.0, ge=0, description="2D-3D superpixel contrast over t, t-1, t+1")
    dense_to_sparse_weight: float = Field(1.0, ge=0, description="keyframe vs keyframe + sweeps (3D-3D)")
    temporal_weight: float = Field(1.0, ge=0, description="keyframe vs t-1 and t+1 by shared class id (3D-3D)")
    gather_distributed: bool = Field(
        False, description="contrast against the groups of every rank (upstream: per-GPU negatives only)")


class SuperFlowLoss(nn.Module):
    """The weighted sum of the spatial, dense-to-sparse and temporal grouped contrasts.

    Args:
        groups_per_sample: exclusive upper bound of the group ids of one sample (17 for the
            class-level superpixels; cameras x ids for per-image SLIC ids).
        config: weights, temperature and distributed negatives.

    Terms whose weight is 0 are not computed and reported as 0.
    """

    def __init__(self, groups_per_sample: int, config: SuperFlowLossConfig = SuperFlowLossConfig()) -> None:
        super().__init__()
        if groups_per_sample <= 0:
            raise ValueError(f"groups_per_sample: expected a positive int, got {groups_per_sample}")
        self.groups_per_sample = groups_per_sample
        self.config = config
        self.contrast = GroupedContrastLoss(temperature=config.temperature,
                                            gather_distributed=config.gather_distributed)

    def pair(self, anchors: GroupedFeatures, positives: GroupedFeatures) -> torch.Tensor:
        """One grouped InfoNCE: pooled ``anchors`` against pooled ``positives`` (scalar)."""
        return self.contrast(anchors.features, anchors.group_ids, positives.features, positives.group_ids,
                             anchors.batch_index, positives.batch_index, self.groups_per_sample)

    def spatial(self, points: Sequence[GroupedFeatures], pixels: Sequence[GroupedFeatures]) -> torch.Tensor:
        """Mean over frames of superpoint (3D) vs superpixel (2D) contrast; frame ``f`` with ``f``."""
        if len(points) != len(pixels) or not points:
            raise ValueError(f"spatial: expected one pixel set per point set, got {len(points)} and {len(pixels)}")
        return torch.stack([self.pair(p, q) for p, q in zip(points, pixels)]).mean()

    def dense_to_sparse(self, keyframe: GroupedFeatures, dense: GroupedFeatures) -> torch.Tensor:
        """Keyframe superpoints vs dense-cloud superpoints (same keyframe superpixels)."""
        return self.pair(keyframe, dense)

    def temporal(self, keyframe: GroupedFeatures, neighbours: Sequence[GroupedFeatures]) -> torch.Tensor:
        """Mean over neighbouring frames of keyframe vs neighbour superpoints with the same id."""
        if not neighbours:
            raise ValueError("temporal: expected at least one neighbouring frame")
        return torch.stack([self.pair(keyframe, n) for n in neighbours]).mean()

    def forward(self, points: Sequence[GroupedFeatures], pixels: Sequence[GroupedFeatures],
                dense: GroupedFeatures) -> dict[str, torch.Tensor]:
        """All terms and their weighted sum.

        Args:
            points: per frame (keyframe first, then its neighbours), 3D features of the point-pixel
                pairs with the superpixel id of the pixel.
            pixels: per frame, 2D features of every pixel of its images with the pixel's id.
            dense: 3D features of the dense cloud's pairs with the keyframe's superpixel ids.

        Returns:
            ``{"loss", "spatial", "dense_to_sparse", "temporal"}`` scalars.
        """
        cfg = self.config
        zero = points[0].features.new_zeros(())
        terms = {
            "spatial": self.spatial(points, pixels) if cfg.spatial_weight else zero,
            "dense_to_sparse": self.dense_to_sparse(points[0], dense) if cfg.dense_to_sparse_weight else zero,
            "temporal": self.temporal(points[0], points[1:]) if cfg.temporal_weight else zero,
        }
        total = (cfg.spatial_weight * terms["spatial"] + cfg.dense_to_sparse_weight * terms["dense_to_sparse"]
                 + cfg.temporal_weight * terms["temporal"])
        return {"loss": total, **terms}
