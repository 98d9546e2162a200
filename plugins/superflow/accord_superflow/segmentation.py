"""LiDAR semantic segmentation on nuScenes-lidarseg: classes, labelled scans, the segmenter, its loss.

Downstream protocol of SuperFlow (method spec §5.4):

* the 32 lidarseg classes map to the 16 nuScenes-lidarseg challenge classes plus ``ignore``
  (:data:`SEGMENTATION_CLASSES`, :data:`IGNORE_INDEX`; the devkit's ``LidarsegClassMapper``
  mapping, with its class names, shifted down by one so that the classes are ``0..15``);
* the network is the pretraining backbone (``SFMinkUNetBackbone``, BN momentum 0.02) on the same
  cylindrical voxels, followed by a linear head to the 16 classes (the head never predicts
  ``ignore``, so predictions fit the devkit's ``1..16`` result format after a shift);
* the loss is ``CE(ignore) + 2 x Lovasz-softmax`` on **voxel** labels (the majority label of a
  voxel's points), with mmdet3d's ``LovaszLoss``; metrics are computed on **points**, each point
  taking its voxel's logits.

For linear probing, :meth:`LidarSegmenter.freeze_backbone` freezes the backbone completely: no
gradients *and* BatchNorm kept in eval mode whatever ``train()`` calls the trainer makes, so its
running statistics never change (upstream only sets ``requires_grad=False``, so there the
statistics keep adapting to the downstream data).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from accord.utils.checks import check_tensor
from accord.config import ExistingPath, StrictModel
from accord_superflow.data.index import InfoIndex, KeyframeInfo, load_info_index
from accord_superflow.data.schema import LIDARSEG_CLASSES, LIDARSEG_TO_SEMANTIC, SEMANTIC_SUPERPIXEL_CLASSES
from accord_superflow.models.config import BackboneConfig
from accord_superflow.models.voxelize import DEFAULT_VOXEL_SIZE, VoxelBatch, cylindrical_voxelize
from accord_superflow.pretrain import PointAugmentationConfig, augment_points, load_lidar_points

__all__ = [
    "SEGMENTATION_CLASSES",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "LIDARSEG_TO_SEGMENTATION",
    "DOWNSTREAM_BN_MOMENTUM",
    "SegmentationDataConfig",
    "SegmentationModelConfig",
    "load_segmentation_labels",
    "LidarSegDataset",
    "collate_scans",
    "LidarSegmenter",
    "SegmentationLoss",
    "SegmentationTraining",
    "build_segmenter",
]

#: The 16 nuScenes-lidarseg challenge classes (the devkit's coarse names), in label order 0..15.
SEGMENTATION_CLASSES: tuple[str, ...] = SEMANTIC_SUPERPIXEL_CLASSES[:-1]
NUM_CLASSES = len(SEGMENTATION_CLASSES)
#: Label of the points no class covers (noise, animal, ambulances, debris, ego vehicle, ...).
IGNORE_INDEX = NUM_CLASSES
#: lidarseg index (0..31) -> segmentation label (0..15, or IGNORE_INDEX); spec §5.4's table.
LIDARSEG_TO_SEGMENTATION = np.asarray(LIDARSEG_TO_SEMANTIC, dtype=np.int64)
#: SuperFlow's BatchNorm momentum for fine-tuning and linear probing (pretraining uses 0.05).
DOWNSTREAM_BN_MOMENTUM = 0.02


class SegmentationDataConfig(StrictModel):
    """Where the labelled scans are: a nuScenes root with lidarseg and its table version."""

    root: ExistingPath = Field(description="nuScenes root (v1.0-* tables with lidarseg.json, samples/, lidarseg/)")
    version: str = Field("v1.0-trainval", description="nuScenes table directory")
    cache_dir: Path | None = Field(None, description="info index cache; None: <root>/superflow_cache")

    def index(self, split: str) -> InfoIndex:
        """The keyframes of an official split (cached info index, no sweeps)."""
        return load_info_index(self.root, self.version, split, max_sweeps=0, cache_dir=self.cache_dir)


class SegmentationModelConfig(StrictModel):
    """The segmenter: backbone (as pretrained) and voxel grid (as pretrained)."""

    backbone: BackboneConfig = Field(BackboneConfig(bn_momentum=DOWNSTREAM_BN_MOMENTUM),
                                     description="must match the pretraining backbone when a checkpoint is given")
    voxel_size: tuple[float, float, float] = Field(DEFAULT_VOXEL_SIZE, description="(rho m, phi deg, z m)")

    @model_validator(mode="after")
    def _voxel_size_is_positive(self) -> SegmentationModelConfig:
        if min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size: every size must be positive, got {self.voxel_size}")
        return self


def load_segmentation_labels(path: str | Path, num_points: int) -> np.ndarray:
    """A ``*_lidarseg.bin`` file as ``(N,)`` int64 segmentation labels (0..15, ``IGNORE_INDEX``).

    Raises:
        ValueError: the file does not hold one uint8 lidarseg index per point, or an index is not
            one of the 32 lidarseg classes.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != num_points:
        raise ValueError(f"{path}: {len(raw)} labels for a scan of {num_points} points")
    if raw.size and int(raw.max()) >= len(LIDARSEG_CLASSES):
        raise ValueError(f"{path}: lidarseg index {int(raw.max())} is not one of the "
                         f"{len(LIDARSEG_CLASSES)} lidarseg classes")
    return LIDARSEG_TO_SEGMENTATION[raw]


class LidarSegDataset(Dataset):
    """Labelled keyframe scans of an info index: ``{"points": (N, 4), "labels": (N,)}``.

    Args:
        root: nuScenes root.
        index: the keyframes (each needs a lidarseg label file).
        augmentation: random flips, rotation and scale applied per access; ``None``: raw scans.

    Raises:
        ValueError: a keyframe without lidarseg labels (named by its sample token).
    """

    def __init__(self, root: str | Path, index: InfoIndex, augmentation: PointAugmentationConfig | None = None) -> None:
        unlabelled = [k.sample_token for k in index.keyframes if k.lidarseg_path is None]
        if unlabelled:
            raise ValueError(f"{root}: {len(unlabelled)} keyframe(s) of {index.version}/{index.split} have no "
                             f"lidarseg labels (first: sample {unlabelled[0]}); segmentation needs lidarseg.json")
        self.root = Path(root)
        self.index = index
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.index)

    def scan(self, keyframe: KeyframeInfo) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(N, 4)`` points and ``(N,)`` labels of a keyframe."""
        points = load_lidar_points(self.root / keyframe.lidar.path)
        return points, load_segmentation_labels(self.root / keyframe.lidarseg_path, len(points))

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        points, labels = self.scan(self.index.keyframes[position])
        if self.augmentation is not None:
            # Drawn from torch's generator, which the Trainer seeds per worker and restores on resume.
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            points = augment_points(points, self.augmentation, rng)
        return {"points": torch.from_numpy(points), "labels": torch.from_numpy(labels)}


def collate_scans(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate scans: ``points`` ``(N, 4)``, ``labels`` ``(N,)``, ``point_cloud`` ``(N,)`` scan of each point."""
    sizes = torch.tensor([len(s["points"]) for s in samples])
    return {
        "points": torch.cat([s["points"] for s in samples]),
        "labels": torch.cat([s["labels"] for s in samples]),
        "point_cloud": torch.repeat_interleave(torch.arange(len(samples)), sizes),
    }


class LidarSegmenter(nn.Module):
    """Cylindrical voxels -> sparse backbone -> linear head: per-voxel class logits.

    Args:
        backbone: ``backbone(voxel_features (V, C_in), coords (V, 4) int32) -> (V, C)``.
        head: ``(V, C) -> (V, NUM_CLASSES)``.
        voxel_size: cylindrical voxel size ``(rho m, phi deg, z m)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        """Linear probing: no backbone gradients and BatchNorm statistics that never update."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> LidarSegmenter:
        """``nn.Module.train``, except that a frozen backbone stays in eval mode (its BN statistics are kept)."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, points: torch.Tensor, point_cloud: torch.Tensor, num_clouds: int | None = None
                ) -> tuple[torch.Tensor, VoxelBatch]:
        """Voxel logits of a batch of clouds.

        Args:
            points: ``(N, 4)`` ``(x, y, z, intensity)``.
            point_cloud: ``(N,)`` cloud of every point.
            num_clouds: batch size; ``None``: ``max(point_cloud) + 1``.

        Returns:
            ``(V, NUM_CLASSES)`` logits and the voxels (``voxels.to_points(logits)`` gives ``(N, NUM_CLASSES)``).
        """
        check_tensor(points, "points", ndim=2, floating=True)
        voxels = cylindrical_voxelize(points, point_cloud, num_clouds, self.voxel_size)
        # A frozen backbone needs no graph: linear probing then costs little more than inference.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            features = self.backbone(voxels.features, voxels.coords)
        return self.head(features), voxels


class SegmentationLoss(nn.Module):
    """``CE(ignore) + lovasz_weight x Lovasz-softmax`` over labelled voxels (SuperFlow: weight 2).

    mmdet3d's ``LovaszLoss`` runs on the CPU as is. It is given the labelled voxels only: its own
    ``ignore_index`` filtering squeezes a single remaining voxel into a 1-D tensor and fails.

    Args:
        lovasz_weight: weight of the Lovasz term.
    """

    def __init__(self, lovasz_weight: float = 2.0) -> None:
        super().__init__()
        from mmdet3d.models.losses import LovaszLoss

        self.lovasz = LovaszLoss(loss_type="multi_class", classes="present", per_sample=False, reduction="none",
                                 loss_weight=lovasz_weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "ce", "lovasz"}`` of ``(V, K)`` logits and ``(V,)`` labels (``0..K-1`` or ``IGNORE_INDEX``)."""
        labelled = labels != IGNORE_INDEX
        if not bool(labelled.any()):
            # Nothing to learn from this batch; a zero that keeps the graph (CE would be NaN).
            zero = logits.sum() * 0
            return {"loss": zero, "ce": zero.detach(), "lovasz": zero.detach()}
        logits, labels = logits[labelled], labels[labelled]
        cross_entropy = F.cross_entropy(logits, labels)
        lovasz = self.lovasz(logits, labels, ignore_index=None)
        return {"loss": cross_entropy + lovasz, "ce": cross_entropy.detach(), "lovasz": lovasz.detach()}


class SegmentationTraining(nn.Module):
    """Trainer contract: the loss of a :func:`collate_scans` batch on voxel labels.

    Args:
        segmenter: the network being trained.
        loss: :class:`SegmentationLoss`.
    """

    def __init__(self, segmenter: LidarSegmenter, loss: SegmentationLoss) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from accord_superflow.models.segmentor import majority_voxel_labels

        logits, voxels = self.segmenter(batch["points"], batch["point_cloud"])
        voxel_labels = majority_voxel_labels(batch["labels"], voxels.point_to_voxel, len(voxels))
        return self.loss(logits, voxel_labels)


def build_segmenter(model: SegmentationModelConfig) -> LidarSegmenter:
    """A randomly initialised segmenter (imports mmdet3d and spconv for the backbone).

    Args:
        model: backbone, voxel grid.
    """
    from accord_superflow.models.backbone import build_backbone

    head = nn.Linear(model.backbone.out_channels, NUM_CLASSES)
    return LidarSegmenter(build_backbone(model.backbone), head, model.voxel_size)
