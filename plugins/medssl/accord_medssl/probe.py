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

The benchmark's **frozen probe** (:func:`frozen_probe`, :class:`FrozenProbeConfig`) is the same
probe on a downstream split: the SwinUNETR that fine-tuning would start from (an Alice student, or
random weights) stays frozen, and the same linear voxel classifier, i.e. a 1x1x1 convolution on
``decoder1`` plus the upsampled decoder tokens, is fitted on the labelled train cases of the
fine-tuning split (``label_fraction`` of them) and scored on its test cases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from accord.config import StrictModel
from accord.training import DenseProbeData, OnlineProbe, OnlineProbeOptions
from accord.utils.files import write_text_atomically
from accord_medssl.anatomy import AnatomyEmbeddingPretraining
from accord_medssl.anatomy.grid import crop_with_zero_padding
from accord_medssl.data import require_valid
from accord_medssl.finetune import (
    SegmentationRunConfig,
    finite_or_none,
    initial_network,
    labelled_items,
    labelled_subset,
    split_cases,
)

if TYPE_CHECKING:
    from accord_medssl.tasks import PretrainConfig

__all__ = [
    "FrozenProbeConfig",
    "FrozenProbeOptions",
    "VoxelProbeOptions",
    "VoxelProbeSet",
    "alice_voxel_features",
    "anatomy_voxel_features",
    "balanced_voxels",
    "frozen_probe",
    "swin_unetr_voxel_features",
    "voxel_probe",
]

#: The label id of the background in MSD datasets.
BACKGROUND = 0


class VoxelProbeOptions(OnlineProbeOptions):
    """``probe:`` of a medssl ``pretrain`` config: which labelled voxels the online probe uses."""

    cases: int = Field(4, ge=2, description="labelled cases used (dataset order): the first half fit, the rest score")
    crops_per_case: int = Field(2, ge=1, description="crops of crop_size per case, centred on random labelled voxels")
    train_voxels_per_class: int = Field(200, ge=1, description="voxels per class and crop the probe is fitted on")
    test_voxels: int = Field(5000, ge=1, description="voxels per crop it is scored on (uniform sample)")


def swin_unetr_voxel_features(network: SwinUNETR, images: torch.Tensor) -> torch.Tensor:
    """Per-voxel features of a MONAI SwinUNETR: its last decoder block and its decoder tokens.

    Args:
        network: any ``SwinUNETR`` (the output layer is run but not read).
        images: ``(B, in_channels, D, H, W)``, sizes multiples of 32.

    Returns:
        ``(B, 9 * feature_size, D, H, W)``: the ``decoder1`` output (``feature_size`` channels, what
        the output layer reads), then the ``decoder5`` output (stride 16, ``8 * feature_size``
        channels: the decoder tokens of Alice's token loss) upsampled trilinearly.
    """
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(network, name).register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output))
        for name in ("decoder1", "decoder5")
    ]
    try:
        network(images)
    finally:
        for hook in hooks:
            hook.remove()
    upsampled = F.interpolate(captured["decoder5"], size=images.shape[2:], mode="trilinear", align_corners=False)
    return torch.cat([captured["decoder1"], upsampled], dim=1)


def alice_voxel_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """:func:`swin_unetr_voxel_features` of an :class:`~accord_medssl.alice.AliceModel`'s student.

    Args:
        model: an Alice model.
        images: ``(B, 1, D, H, W)``, sizes multiples of 32.

    Returns:
        ``(B, 9 * feature_size, D, H, W)``.
    """
    return swin_unetr_voxel_features(model.backbone.swin_unetr, images)


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


def balanced_voxels(label: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Flat indices of up to ``per_class`` random voxels of each class in ``label`` (any shape)."""
    flat = label.flatten()
    chosen = []
    for value in flat.unique():
        where = (flat == value).nonzero()[:, 0]
        chosen.append(where[torch.randperm(len(where), generator=generator)[:per_class]])
    return torch.cat(chosen)


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
                voxels = (balanced_voxels(crop_label, options.train_voxels_per_class, generator)
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


class FrozenProbeOptions(StrictModel):
    """Which voxels the frozen probe is fitted on and scored on, and its fit."""

    voxels_per_class: int = Field(1000, ge=1, description="voxels per class and labelled case it is fitted on")
    test_voxels: int = Field(100_000, ge=1, description="voxels per test case it is scored on (uniform sample; a "
                             "smaller case is scored whole)")
    fit_steps: int = Field(100, ge=1, description="L-BFGS iterations of the linear classifier")


class FrozenProbeConfig(SegmentationRunConfig):
    """The frozen probe of the ``segmentation`` benchmark: see :func:`frozen_probe`."""

    task: str = "frozen_probe"
    probe: FrozenProbeOptions = FrozenProbeOptions()


def frozen_probe(cfg: FrozenProbeConfig) -> dict[str, Any]:
    """Dice of a linear voxel classifier on a frozen SwinUNETR: the pretraining signal without fine-tuning.

    The network is the one ``finetune`` would start from with the same config (the Alice
    checkpoint's weights, or random ones drawn from ``cfg.seed``), frozen in eval mode. Each case
    is run whole by sliding-window inference (``crop_size`` window, ``sliding_window`` blending)
    through :func:`swin_unetr_voxel_features`. The linear classifier on those features (a 1x1x1
    convolution: :func:`~accord.training.fit_linear_probe`, the online probe's, class-balanced) is
    fitted on ``probe.voxels_per_class`` random voxels of each class in each labelled train case
    (``label_fraction`` of the split's train cases, drawn as ``finetune`` draws them) and scored on
    up to ``probe.test_voxels`` uniformly drawn voxels of each test case, pooled
    (:func:`~accord.training.segmentation_scores`; background excluded from the mean). Voxels are
    drawn from ``cfg.seed``. Writes ``<run_dir>/results.json``.

    Returns:
        ``dice`` (mean over the organs), ``dice_per_class`` ({organ: Dice or None}), ``miou``,
        ``labelled_cases``, ``test_cases`` and ``initialisation`` (as ``finetune`` records it).

    Raises:
        ValueError: an invalid dataset (the check's messages), not a labelled MSD dataset, too few
            cases, or pretrained weights that do not fit ``cfg.backbone``.
    """
    require_valid(cfg.data)
    items, labels = labelled_items(cfg.data)
    splits = split_cases(items, cfg.split)
    train = labelled_subset(splits["train"], cfg.label_fraction, cfg.seed)
    with torch.random.fork_rng():  # the seed's random weights, without moving the caller's generator
        torch.manual_seed(cfg.seed)
        network, _, initialisation = initial_network(cfg, num_classes=len(labels))
    network = network.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(cfg.seed)

    def voxel_features(
        model: SwinUNETR, volumes: Dataset, pick: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, C)`` features and ``(N,)`` labels of the voxels ``pick(flat labels)`` chooses in each case."""
        device = next(model.parameters()).device
        features, targets = [], []
        for index in range(len(volumes)):
            case = volumes[index]
            image = case["image"].as_subclass(torch.Tensor)[None].to(device)
            label = case["label"].as_subclass(torch.Tensor).long().flatten()
            dense = sliding_window_inference(
                image, cfg.crop_size, cfg.sliding_window.batch_size, lambda crops: swin_unetr_voxel_features(model, crops),
                overlap=cfg.sliding_window.overlap, mode=cfg.sliding_window.mode,
            )[0].flatten(1)
            voxels = pick(label)
            features.append(dense[:, voxels.to(device)].T.float())
            targets.append(label[voxels].to(device))
        return torch.cat(features), torch.cat(targets)

    def extract(model: SwinUNETR) -> DenseProbeData:
        fit = voxel_features(model, cfg.volumes(train, cfg.spacing),
                             lambda label: balanced_voxels(label, cfg.probe.voxels_per_class, generator))
        test = voxel_features(model, cfg.volumes(splits["test"], cfg.spacing),
                              lambda label: torch.randperm(len(label), generator=generator)[: cfg.probe.test_voxels])
        return DenseProbeData(*fit, *test)

    names = [labels[index] for index in range(len(labels))]
    probe = OnlineProbe(extract, len(names), every=1, class_names=names, background=BACKGROUND,
                        fit_steps=cfg.probe.fit_steps, namespace="frozen_probe")
    metrics = probe.probe(network)
    result = {
        "dice": finite_or_none(metrics["frozen_probe/dice"]),
        "dice_per_class": {name: finite_or_none(metrics[f"frozen_probe/dice/{name}"])
                           for index, name in enumerate(names) if index != BACKGROUND},
        "miou": finite_or_none(metrics["frozen_probe/miou"]),
        "labelled_cases": len(train),
        "test_cases": len(splits["test"]),
        **initialisation,
    }
    write_text_atomically(cfg.run_dir / "results.json", json.dumps(result, indent=2))
    return result
