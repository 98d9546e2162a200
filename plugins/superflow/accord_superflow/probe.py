"""The online probe of SuperFlow pretraining: mIoU of a linear point classifier on frozen backbone features.

A pretraining config with a ``probe:`` section (:class:`PointProbeOptions`) makes the trainer run
the core :class:`~accord.training.OnlineProbe` every ``probe.every`` steps:

- the set: ``keyframes`` labelled keyframes (nuScenes-lidarseg, evenly spaced) of ``train_split``
  (default: the pretraining split) fit the probe, as many of ``test_split`` (default: the
  validation split of the table version, ``mini_val`` or ``val``) score it; of each scan
  ``points_per_keyframe`` labelled points are drawn once from the run seed, so every probe of a
  run sees the same points;
- the features: the whole raw scan goes through the cylindrical voxelisation and the MinkUNet
  backbone (what a downstream segmenter reads, before SuperFlow's projection head); each sampled
  point takes its voxel's feature;
- the metric: per-class IoU over the 16 lidarseg classes and their mean (``probe/miou``,
  ``probe/iou/<class>``), as the downstream evaluation scores points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import Field

from accord.training import DenseProbeData, OnlineProbe, OnlineProbeOptions
from accord_superflow.data.index import load_info_index
from accord_superflow.models.voxelize import cylindrical_voxelize
from accord_superflow.pretrain import SuperFlow, load_lidar_points
from accord_superflow.segmentation import IGNORE_INDEX, NUM_CLASSES, SEGMENTATION_CLASSES, load_segmentation_labels

if TYPE_CHECKING:
    from accord_superflow.tasks import PretrainConfig

__all__ = ["PointProbeOptions", "PointProbeSet", "backbone_point_features", "point_probe"]


class PointProbeOptions(OnlineProbeOptions):
    """``probe:`` of a superflow ``pretrain`` config: which labelled points the online probe uses."""

    train_split: str | None = Field(None, description="split whose keyframes fit the probe (None: data.split)")
    test_split: str | None = Field(None, description="split whose keyframes score it (None: mini_val for v1.0-mini, "
                                                     "else val)")
    keyframes: int = Field(4, ge=1, description="labelled keyframes per split, evenly spaced")
    points_per_keyframe: int = Field(5000, ge=1, description="labelled points sampled per keyframe")


def backbone_point_features(model: SuperFlow, points: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` points of one scan -> ``(N, C_out)`` MinkUNet features (each point its voxel's)."""
    voxels = cylindrical_voxelize(points, torch.zeros(len(points), dtype=torch.long, device=points.device), 1,
                                  model.voxel_size)
    return voxels.to_points(model.backbone_3d(voxels.features, voxels.coords))


class PointProbeSet:
    """The probe's labelled scans and the points sampled from them, drawn once (see the module docstring).

    Args:
        cfg: the pretraining config (dataset, ``seed``, ``probe``).

    Raises:
        ValueError: a split without labelled keyframes, or an unknown split.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        options, data = cfg.probe, cfg.data
        rng = np.random.default_rng(cfg.seed)
        self.scans: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        test_split = options.test_split or ("mini_val" if data.version == "v1.0-mini" else "val")
        for part, split in (("train", options.train_split or data.split), ("test", test_split)):
            index = load_info_index(data.root, data.version, split, max_sweeps=0, cache_dir=data.cache_dir)
            labelled = [keyframe for keyframe in index.keyframes if keyframe.lidarseg_path is not None]
            if not labelled:
                raise ValueError(f"probe: split {split} of {data.root} ({data.version}) has no keyframe with "
                                 "lidarseg labels")
            chosen = np.unique(np.linspace(0, len(labelled) - 1, options.keyframes).round().astype(int))
            self.scans[part] = []
            for position in chosen:
                keyframe = labelled[position]
                points = load_lidar_points(data.root / keyframe.lidar.path)
                labels = load_segmentation_labels(data.root / keyframe.lidarseg_path, len(points))
                candidates = np.flatnonzero(labels != IGNORE_INDEX)
                sampled = np.sort(rng.permutation(candidates)[: options.points_per_keyframe])
                self.scans[part].append((torch.from_numpy(points), torch.from_numpy(sampled),
                                         torch.from_numpy(labels[sampled])))

    def extract(self, model: SuperFlow) -> DenseProbeData:
        """Backbone features and labels of the sampled points under ``model``."""
        device = next(model.parameters()).device
        parts = []
        for part in ("train", "test"):
            features = [backbone_point_features(model, points.to(device))[sampled.to(device)].float()
                        for points, sampled, _ in self.scans[part]]
            parts += [torch.cat(features), torch.cat([labels for _, _, labels in self.scans[part]]).to(device)]
        return DenseProbeData(*parts)


def point_probe(cfg: PretrainConfig) -> OnlineProbe:
    """The online probe of a SuperFlow pretraining run (``cfg.probe`` must be set)."""
    return OnlineProbe(PointProbeSet(cfg).extract, NUM_CLASSES, cfg.probe.every, class_names=SEGMENTATION_CLASSES,
                       ignore_index=IGNORE_INDEX, fit_steps=cfg.probe.fit_steps)
