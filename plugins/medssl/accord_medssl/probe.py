"""The online probe of medssl pretraining: Dice of a linear voxel classifier on the frozen features.

A pretraining config with a ``probe:`` section (:class:`VoxelProbeOptions`) makes the trainer run
the core :class:`~accord.training.OnlineProbe` every ``probe.every`` steps:

- the set: the first ``cases`` labelled cases of the MSD dataset (``labelsTr``), the first half
  for fitting the probe and the rest for scoring it, preprocessed as the pretraining volumes;
  ``crops_per_case`` crops of ``crop_size`` per case, each centred on a random labelled voxel, and
  the voxels of each crop (a class-balanced sample for fitting, a uniform one for scoring) are
  drawn once from the run seed, so every probe of a run sees the same voxels;
- the features (labels stay at full resolution, the features are brought to it):

  - ``method: alice``: the student's SwinUNETR, per voxel the output of its last decoder block
    (``decoder1``, full resolution, ``feature_size`` channels: what a fine-tuned SwinUNETR's
    1x1x1 output layer reads, so the probe is that output layer on the frozen network) concatenated
    with the decoder tokens that Alice's token loss trains (stride 16, ``8 x feature_size``
    channels), upsampled trilinearly;
  - ``method: anatomy_embedding``: the local embedding (stride 2, ``local_dim`` channels),
    upsampled trilinearly;

- the metric: per-organ Dice and IoU on the scored voxels, background excluded from the means
  (``probe/dice``, ``probe/miou``, ``probe/dice/<organ>``), as fine-tuning's Dice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from accord.training import DenseProbeData, OnlineProbe, OnlineProbeOptions
from accord_medssl.anatomy import AnatomyEmbeddingPretraining
from accord_medssl.anatomy.grid import crop_with_zero_padding
from accord_medssl.finetune import labelled_items

if TYPE_CHECKING:
    from accord_medssl.tasks import PretrainConfig

__all__ = ["VoxelProbeOptions", "VoxelProbeSet", "alice_voxel_features", "anatomy_voxel_features", "voxel_probe"]

#: The label id of the background in MSD datasets.
BACKGROUND = 0


class VoxelProbeOptions(OnlineProbeOptions):
    """``probe:`` of a medssl ``pretrain`` config: which labelled voxels the online probe uses."""

    cases: int = Field(4, ge=2, description="labelled cases used (dataset order): the first half fit, the rest score")
    crops_per_case: int = Field(2, ge=1, description="crops of crop_size per case, centred on random labelled voxels")
    train_voxels_per_class: int = Field(200, ge=1, description="voxels per class and crop the probe is fitted on")
    test_voxels: int = Field(5000, ge=1, description="voxels per crop it is scored on (uniform sample)")


def alice_voxel_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-voxel features of an Alice model's student SwinUNETR (see the module docstring).

    Args:
        model: an :class:`~accord_medssl.alice.AliceModel`.
        images: ``(B, 1, D, H, W)``, sizes multiples of 32.

    Returns:
        ``(B, 9 * feature_size, D, H, W)``: ``decoder1`` output, then the upsampled decoder tokens.
    """
    backbone = model.backbone  # the student's
    captured = []
    hook = backbone.swin_unetr.decoder1.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        features = backbone(images)
    finally:
        hook.remove()
    tokens = features.decoder_tokens.transpose(1, 2).reshape(len(images), -1, *features.decoder_grid)
    upsampled = F.interpolate(tokens, size=images.shape[2:], mode="trilinear", align_corners=False)
    return torch.cat([captured[0], upsampled], dim=1)


def anatomy_voxel_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The local anatomy embedding of an :class:`AnatomyEmbeddingPretraining`, upsampled to ``images``' size.

    Args:
        model: the anatomy-embedding pretraining model.
        images: ``(B, 1, D, H, W)``, sizes multiples of 8.

    Returns:
        ``(B, local_dim, D, H, W)``.
    """
    _, local_map = model.model(images)
    return F.interpolate(local_map, size=images.shape[2:], mode="trilinear", align_corners=False)


class VoxelProbeSet:
    """The probe's labelled crops and the voxels sampled from them, drawn once (see the module docstring).

    Args:
        cfg: the pretraining config (dataset, preprocessing, ``crop_size``, ``seed``, ``probe``).

    Raises:
        ValueError: the dataset is not a labelled MSD dataset, or has fewer than ``probe.cases``
            labelled cases.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        options = cfg.probe
        try:
            items, self.labels = labelled_items(cfg.data)
        except ValueError as exc:
            raise ValueError(f"probe: needs labelled cases: {exc}") from None
        if len(items) < options.cases:
            raise ValueError(f"probe.cases is {options.cases} but {cfg.data} has {len(items)} labelled cases")
        generator = torch.Generator().manual_seed(cfg.seed)
        volumes = cfg.volumes(items[: options.cases], cfg.spacing)
        fit_cases = options.cases // 2
        self.crops: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"train": [], "test": []}
        for index in range(options.cases):
            case = volumes[index]
            image, label = case["image"].as_subclass(torch.Tensor), case["label"].as_subclass(torch.Tensor)
            part = "train" if index < fit_cases else "test"
            for _ in range(options.crops_per_case):
                crop_image, crop_label = self._crop(image, label, cfg.crop_size, generator)
                voxels = (self._balanced_voxels(crop_label, options.train_voxels_per_class, generator)
                          if part == "train" else torch.randperm(crop_label.numel(), generator=generator)[
                              : options.test_voxels])
                self.crops[part].append((crop_image, crop_label.flatten()[voxels], voxels))

    @staticmethod
    def _crop(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int, int], generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``size`` crop of ``(1, X, Y, Z)`` image and label around a random labelled voxel (zero-padded)."""
        foreground = (label[0] != BACKGROUND).nonzero()
        centre = foreground[torch.randint(len(foreground), (), generator=generator)] if len(foreground) else (
            torch.tensor(label.shape[1:]) // 2)
        start = [int(c) - s // 2 for c, s in zip(centre, size)]
        return crop_with_zero_padding(image, start, size), crop_with_zero_padding(label, start, size)[0].long()

    @staticmethod
    def _balanced_voxels(label: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
        """Flat indices of up to ``per_class`` random voxels of each class in ``label``."""
        flat = label.flatten()
        chosen = []
        for value in flat.unique():
            where = (flat == value).nonzero()[:, 0]
            chosen.append(where[torch.randperm(len(where), generator=generator)[:per_class]])
        return torch.cat(chosen)

    def extract(self, model: nn.Module) -> DenseProbeData:
        """Features and labels of the sampled voxels under ``model`` (any pretraining model of this plugin)."""
        features_of = anatomy_voxel_features if isinstance(model, AnatomyEmbeddingPretraining) else alice_voxel_features
        device = next(model.parameters()).device
        parts = []
        for part in ("train", "test"):
            features, labels = [], []
            for image, voxel_labels, voxels in self.crops[part]:
                crop_features = features_of(model, image[None].to(device))[0].flatten(1)
                features.append(crop_features[:, voxels.to(device)].T.float())
                labels.append(voxel_labels.to(device))
            parts += [torch.cat(features), torch.cat(labels)]
        return DenseProbeData(*parts)


def voxel_probe(cfg: PretrainConfig) -> OnlineProbe:
    """The online probe of a medssl pretraining run (``cfg.probe`` must be set)."""
    probe_set = VoxelProbeSet(cfg)
    names = [probe_set.labels[index] for index in range(len(probe_set.labels))]
    return OnlineProbe(probe_set.extract, len(names), cfg.probe.every, class_names=names, background=BACKGROUND,
                       fit_steps=cfg.probe.fit_steps)
