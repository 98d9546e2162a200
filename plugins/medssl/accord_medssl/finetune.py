"""3D segmentation fine-tuning and evaluation (the ``finetune`` / ``evaluate`` tasks): MONAI's SwinUNETR
from Alice, or GEMINI's backbone U-Net from GEMINI-MIP (``network: gemini_unet``).

Protocol:

- the labelled cases of an MSD dataset are split once into train / validation / test by
  :class:`SplitOptions` (its own seed, so every compared run sees the same cases); ``label_fraction``
  keeps a random subset of the train cases (at least one), drawn with the run seed;
- the network is ``monai.networks.nets.SwinUNETR``, either randomly initialised or with every
  weight but the output layer taken from an Alice pretraining checkpoint
  (:func:`~accord_medssl.weights.alice_backbone`); or, with ``network: gemini_unet``, GVSL's
  downstream network (medssl §3.3): GEMINI's backbone :class:`~accord_medssl.gemini.networks.GeminiUNet`
  (random, or loaded strictly from a ``gemini_pretrain`` checkpoint) and a ``conv3`` head to the
  classes, every weight trained (:class:`GeminiSegmentationNetwork`); its volumes keep their raw
  intensities normalised as GEMINI pretrained on them (``intensity``) instead of Alice's HU window;
- training: ``DiceCELoss`` (or GVSL's ``DiceLoss``, ``loss: dice``) on ``RandCropByPosNegLabeld``
  crops (foreground-centred with probability ``foreground_probability``), through the core
  :class:`~accord.training.Trainer`; optionally with per-class weights (``class_weights``: given,
  or from the training labels' voxel counts by :func:`inverse_sqrt_frequency_weights`), which
  MONAI applies to both the cross-entropy and the Dice term, so that a background of ~95 % of the
  voxels does not drown the small organs;
- validation every ``trainer.validate_every`` steps and after the last step (the trainer's
  ``validate``): ``sliding_window_inference`` over each whole validation case, per-class Dice with
  ``DiceMetric`` (background excluded; a class absent from a case's ground truth does not count for
  that case), logged as ``val/dice`` and ``val/dice/<class>`` in ``metrics.jsonl``; the core
  :class:`~accord.training.BestCheckpoint` keeps the weights with the best mean Dice as
  ``<run_dir>/best.safetensors``, a MONAI weights file (:mod:`accord_medssl.weights`; for
  ``gemini_unet`` the same layout with format :data:`GEMINI_SEGMENTATION_FORMAT` and the network's
  ``gemini_kwargs``) that also records the labels, crop size, split and preprocessing, so
  ``evaluate`` scores the right cases the right way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from monai.data import list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric
from monai.networks import one_hot
from monai.networks.nets import SwinUNETR
from monai.transforms import Lambdad, RandCropByPosNegLabeld, SpatialPadd
from pydantic import Field, PositiveFloat, model_validator
from torch import nn
from torch.utils.data import Dataset

from accord.config import ExistingPath, StrictModel, TrainerConfig
from accord.training import BestCheckpoint, Trainer, load_checkpoint
from accord.utils.files import write_text_atomically
from accord_medssl.data import build_dataset, decathlon_items, require_valid
from accord_medssl.data.layout import DATASET_JSON, is_msd_root
from accord_medssl.gemini.data import normalise_intensity
from accord_medssl.gemini.export import save_weights
from accord_medssl.gemini.networks import GeminiNetworkOptions, GeminiUNet
from accord_medssl.weights import alice_backbone, load_monai_weights, run_description, save_monai_weights, sidecar_path
from accord_medssl.models import SwinUNETRBackboneOptions
from accord_medssl.views import VolumeRunConfig

__all__ = [
    "GEMINI_SEGMENTATION_FORMAT",
    "EvaluateConfig",
    "FinetuneConfig",
    "GeminiSegmentationNetwork",
    "GeminiUNetOptions",
    "SegmentationModel",
    "SegmentationRunConfig",
    "SlidingWindowOptions",
    "SplitOptions",
    "build_segmentation_network",
    "evaluate",
    "finetune",
    "finite_or_none",
    "gemini_initial_network",
    "initial_network",
    "inverse_sqrt_frequency_weights",
    "labelled_items",
    "labelled_subset",
    "segmentation_dice",
    "segmentation_volumes",
    "split_cases",
    "training_class_weights",
    "training_crops",
]

BEST_WEIGHTS = "best.safetensors"
#: The ``format`` of a fine-tuned ``gemini_unet`` weights file (:class:`GeminiSegmentationNetwork`).
GEMINI_SEGMENTATION_FORMAT = "accord_medssl.finetune.GeminiSegmentationNetwork"
#: The GEMINI runs whose checkpoints hold a backbone ``network.unet`` to fine-tune.
GEMINI_TASKS = ("gemini_pretrain", "semisup")
Intensity = Literal["hu_window", "ct_clip", "minmax"]


class SplitOptions(StrictModel):
    """How the labelled cases split into train / validation / test (each part at least one case)."""

    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of cases for model selection")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of cases that evaluate scores")
    seed: int = Field(0, description="case shuffle before splitting; keep it fixed across compared runs")


class SlidingWindowOptions(StrictModel):
    """``monai.inferers.sliding_window_inference`` settings; the window is the training crop size."""

    overlap: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of the window shared by neighbours")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")
    mode: Literal["constant", "gaussian"] = Field("gaussian", description="blending of overlapping windows")


class SegmentationRunConfig(VolumeRunConfig):
    """What a run that segments with a SwinUNETR from an Alice checkpoint (or random weights) needs:
    the network, the cases it learns from and the window it sees (``finetune``, and the frozen
    probe of :mod:`accord_medssl.probe`)."""

    checkpoint: ExistingPath | None = Field(
        None, description="Alice pretraining checkpoint (finetune with network gemini_unet: a gemini_pretrain one); "
        "None: random init")
    pretrained_weights: Literal["student", "teacher"] = Field(
        "student", description="which network of the checkpoint (the reference fine-tunes the student)"
    )
    backbone: SwinUNETRBackboneOptions | None = Field(
        None, description="SwinUNETR architecture; None: the pretraining run's (with checkpoint) or MONAI's defaults"
    )
    spacing: tuple[float, float, float] | None = Field(None, description="resample to this voxel size (mm); None: native")
    label_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the train cases used (at least one)")
    split: SplitOptions = SplitOptions()
    crop_size: tuple[int, int, int] = Field((96, 96, 96), description="training crop and sliding window (multiples of 32)")
    sliding_window: SlidingWindowOptions = SlidingWindowOptions()


class GeminiUNetOptions(StrictModel):
    """Architecture of GEMINI's 3D backbone U-Net (:class:`~accord_medssl.gemini.networks.GeminiUNet`)."""

    in_channels: int = Field(1, ge=1, description="image channels")
    channels: tuple[int, int, int, int, int] = Field(
        (32, 64, 128, 256, 512), description="encoder widths (the reference's); the decoder mirrors the first four")

    @model_validator(mode="after")
    def _groups_divide(self) -> GeminiUNetOptions:
        GeminiNetworkOptions(in_channels=self.in_channels, channels=self.channels)  # its GroupNorm check
        return self


class FinetuneConfig(SegmentationRunConfig):
    """The ``finetune`` task: SwinUNETR segmentation from an Alice checkpoint or from scratch, or GEMINI's
    backbone U-Net from a ``gemini_pretrain`` checkpoint or from scratch (``network: gemini_unet``)."""

    network: Literal["swin_unetr", "gemini_unet"] = Field(
        "swin_unetr", description="swin_unetr: MONAI SwinUNETR (checkpoint: Alice's); gemini_unet: GEMINI's backbone "
        "U-Net + conv3 head, every weight trained (checkpoint: a gemini_pretrain run's, loaded strictly; medssl §3.3)")
    gemini_unet: GeminiUNetOptions | None = Field(
        None, description="gemini_unet architecture; None: the checkpoint's (gemini.network) or the reference's")
    intensity: Intensity | None = Field(
        None, description="hu_window: Alice's HU window to [0, 1]; ct_clip / minmax: GEMINI's normalisations of the raw "
        "volume; None: hu_window for swin_unetr, the checkpoint's gemini.normalisation for gemini_unet (ct_clip from "
        "scratch)")
    loss: Literal["dice_ce", "dice"] = Field("dice_ce", description="DiceCELoss, or DiceLoss alone (GVSL's downstream)")

    samples_per_volume: int = Field(2, ge=1, description="crops per volume and step (RandCropByPosNegLabeld num_samples)")
    foreground_probability: float = Field(0.5, ge=0.0, le=1.0, description="chance that a crop centres on a label voxel")
    class_weights: Literal["none", "inverse_sqrt_frequency"] | list[PositiveFloat] = Field(
        "none", description="per-class weights of DiceCELoss (background first): none, inverse_sqrt_frequency "
        "(1/sqrt of each class's share of the training labels' voxels, mean 1 over classes) or one positive "
        "weight per label"
    )
    trainer: TrainerConfig = TrainerConfig(
        max_steps=1000, batch_size=1, lr=1e-4, weight_decay=1e-5, warmup_steps=20, validate_every=100,
        checkpoint_every=250, keep_last=1
    )

    @model_validator(mode="after")
    def _network_settings(self) -> FinetuneConfig:
        if self.network == "swin_unetr" and self.gemini_unet is not None:
            raise ValueError("gemini_unet: set, but network is swin_unetr (its architecture is backbone)")
        if self.network == "gemini_unet" and self.backbone is not None:
            raise ValueError("backbone: a SwinUNETR architecture, but network is gemini_unet (its architecture is gemini_unet)")
        return self


class EvaluateConfig(VolumeRunConfig):
    """The ``evaluate`` task: per-class Dice of fine-tuned weights on the test cases."""

    checkpoint: ExistingPath = Field(description="weights written by finetune (<run_dir>/best.safetensors)")
    subset: Literal["test", "validation", "train", "all"] = Field(
        "test", description="cases of the fine-tuning run's split, or all labelled cases (another dataset)"
    )
    sliding_window: SlidingWindowOptions = SlidingWindowOptions()


def labelled_items(root: str | Path) -> tuple[list[dict[str, str]], dict[int, str]]:
    """The ``{"image", "label"}`` items of an MSD dataset and its label names ``{id: name}``.

    Raises:
        ValueError: not an MSD dataset, or label ids that are not ``0..K-1``.
    """
    root = Path(root)
    if not is_msd_root(root):
        raise ValueError(f"{root}: segmentation needs an MSD dataset ({DATASET_JSON} with labelled 'training' cases)")
    labels = {int(key): name for key, name in json.loads((root / DATASET_JSON).read_text())["labels"].items()}
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"{root / DATASET_JSON}: label ids must be 0..K-1 for one-hot segmentation, got {sorted(labels)}")
    return decathlon_items(root), labels


def split_cases(items: Sequence[dict[str, str]], split: SplitOptions) -> dict[str, list[dict[str, str]]]:
    """Disjoint ``"train"``, ``"validation"`` and ``"test"`` cases (dataset order kept within each).

    Raises:
        ValueError: too few cases for a non-empty train part.
    """
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(split.seed)).tolist()
    num_test = max(1, round(len(items) * split.test_fraction))
    num_validation = max(1, round(len(items) * split.validation_fraction))
    if len(items) - num_test - num_validation < 1:
        raise ValueError(
            f"{len(items)} labelled cases cannot give {num_test} test, {num_validation} validation and at least "
            "one training case; lower split.test_fraction / split.validation_fraction or add cases"
        )
    parts = {
        "test": order[:num_test],
        "validation": order[num_test : num_test + num_validation],
        "train": order[num_test + num_validation :],
    }
    return {name: [items[i] for i in sorted(indices)] for name, indices in parts.items()}


def labelled_subset(items: Sequence[dict[str, str]], fraction: float, seed: int) -> list[dict[str, str]]:
    """``max(1, round(len(items) * fraction))`` random items; smaller fractions give subsets of larger ones."""
    keep = max(1, round(len(items) * fraction))
    chosen = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:keep]
    return [items[i] for i in sorted(chosen.tolist())]


def training_crops(cfg: FinetuneConfig, items: Sequence[dict[str, str]]) -> Dataset:
    """The cached labelled volumes of ``items``, each access cutting ``samples_per_volume`` crops.

    Volumes smaller than ``crop_size`` are zero-padded; each crop is centred on a label voxel with
    probability ``foreground_probability`` and otherwise on a voxel inside the body (windowed
    intensity > 0), by ``RandCropByPosNegLabeld``. The crops follow the global NumPy generator,
    which the run seeds from ``cfg.seed`` (and the trainer checkpoints).

    Returns:
        A dataset whose items are lists of ``{"image": (C, *crop_size), "label": (1, *crop_size)}``.
    """
    keys = ["image", "label"]
    foreground_crops = RandCropByPosNegLabeld(
        keys,
        label_key="label",
        spatial_size=cfg.crop_size,
        pos=cfg.foreground_probability,
        neg=1.0 - cfg.foreground_probability,
        num_samples=cfg.samples_per_volume,
        image_key="image",
        image_threshold=0.0,
    )
    return segmentation_volumes(cfg, items, cfg.spacing, cfg.intensity,
                                augment=[SpatialPadd(keys, cfg.crop_size), foreground_crops])


def segmentation_volumes(
    cfg: VolumeRunConfig,
    items: Sequence[dict[str, str]],
    spacing: Sequence[float] | None,
    intensity: Intensity | None,
    augment: Sequence[Callable] = (),
) -> Dataset:
    """``cfg.volumes`` of ``items`` with their intensities mapped by ``intensity``.

    ``hu_window`` (or None) is the data layer's HU window to [0, 1] (Alice's); ``ct_clip`` and
    ``minmax`` read the raw volume and normalise it as GEMINI does
    (:func:`~accord_medssl.gemini.data.normalise_intensity`, per whole volume, before ``augment``).
    """
    if intensity in (None, "hu_window"):
        return cfg.volumes(items, spacing, augment)
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else cfg.run_dir / "cache"
    normalise = Lambdad("image", partial(normalise_intensity, mode=intensity))
    return build_dataset(items, cache=cfg.cache, cache_dir=cache_dir, spacing=spacing, hu_window=None,
                         augment=[normalise, *augment], seed=cfg.seed)


def inverse_sqrt_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """Class weights ``w_k = c / sqrt(f_k)`` from voxel counts, ``c`` making their mean over the classes 1.

    ``f_k`` is class ``k``'s share of the counted voxels. The square root tempers plain inverse
    frequency: on the quick benchmark's phantoms (background 94 %, kidneys 0.3 % of the voxels) 1/f
    would weigh a kidney voxel ~300 times a background voxel, ``1 / sqrt(f)`` ~18 times. A class
    with no voxel gets the largest weight of the classes present (it is rarer than any of them).
    Mean 1 keeps the weighted Dice term (a weighted mean over classes) at the scale of the unweighted one.

    Args:
        counts: ``(K,)`` non-negative voxel counts per class, background first.

    Returns:
        ``(K,)`` float32 weights.

    Raises:
        ValueError: not a 1-D tensor of non-negative counts with at least one voxel.
    """
    if counts.ndim != 1 or bool((counts < 0).any()) or not bool((counts > 0).any()):
        raise ValueError(f"counts: expected (K,) non-negative voxel counts, at least one positive, got {counts.tolist()}")
    counts = counts.double()
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = (counts[present] / counts.sum()).rsqrt()
    weights[~present] = weights[present].max()
    return (weights / weights.mean()).float()


def training_class_weights(cfg: FinetuneConfig, volumes: Dataset, labels: dict[int, str]) -> list[float] | None:
    """The loss's class weights of a run: ``cfg.class_weights`` as given, or from ``volumes``' label voxels.

    Args:
        cfg: the run config.
        volumes: the labelled training volumes, items ``{"label": (1, X, Y, Z)}`` (whole, not cropped).
        labels: ``{id: name}`` of the dataset.

    Returns:
        ``K`` weights, background first, or None for an unweighted loss.

    Raises:
        ValueError: a given list whose length is not the number of labels.
    """
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != len(labels):
            raise ValueError(f"class_weights: {len(cfg.class_weights)} weights given, expected one per label "
                             f"({len(labels)}: {', '.join(labels[index] for index in sorted(labels))})")
        return list(cfg.class_weights)
    counts = torch.zeros(len(labels), dtype=torch.long)
    for index in range(len(volumes)):
        label = volumes[index]["label"].as_subclass(torch.Tensor).long()
        counts += torch.bincount(label.flatten(), minlength=len(labels))
    return inverse_sqrt_frequency_weights(counts).tolist()


class SegmentationModel(nn.Module):
    """Trainer contract around a segmentation network: ``{"loss": DiceCE}`` (or Dice) of a batch of crops.

    Args:
        network: maps ``(B, C, d, h, w)`` images to ``(B, K, d, h, w)`` logits.
        class_weights: ``K`` weights of the classes in both loss terms (MONAI's ``DiceCELoss(weight=)``);
            None: unweighted.
        loss: ``dice_ce`` (MONAI ``DiceCELoss``) or ``dice`` (``DiceLoss``, GVSL's downstream loss), on softmax.
    """

    def __init__(self, network: nn.Module, class_weights: Sequence[float] | None = None,
                 loss: Literal["dice_ce", "dice"] = "dice_ce") -> None:
        super().__init__()
        self.network = network
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        loss_class = DiceCELoss if loss == "dice_ce" else DiceLoss
        self.loss = loss_class(to_onehot_y=True, softmax=True, weight=weight)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``: ``"image"`` ``(B, C, d, h, w)`` float, ``"label"`` ``(B, 1, d, h, w)`` class ids."""
        return {"loss": self.loss(self.network(batch["image"]), batch["label"].long())}


def _crop_batch(samples: list[Any]) -> dict[str, torch.Tensor]:
    """Flatten the per-volume crop lists and drop MONAI's metadata (plain tensors train faster)."""
    batch = list_data_collate(samples)
    return {key: batch[key].as_tensor() for key in ("image", "label")}


def finite_or_none(value: float) -> float | None:
    """A Dice for JSON: NaN (no case holds the class) becomes null."""
    return None if math.isnan(value) else value


def _per_class(class_names: Sequence[str], dice: torch.Tensor) -> dict[str, float | None]:
    """``{class: Dice}`` of a ``(K - 1,)`` Dice tensor, for JSON."""
    return {name: finite_or_none(value) for name, value in zip(class_names, dice.tolist())}


@torch.no_grad()
def segmentation_dice(
    network: nn.Module,
    volumes: Dataset,
    num_classes: int,
    roi_size: Sequence[int],
    window: SlidingWindowOptions,
) -> torch.Tensor:
    """Per-class Dice of ``network`` over whole labelled volumes, by sliding-window inference.

    Args:
        network: ``(1, C, *roi_size)`` -> ``(1, num_classes, *roi_size)`` logits; evaluated in eval
            mode (its mode is restored afterwards).
        volumes: items ``{"image": (C, X, Y, Z), "label": (1, X, Y, Z)}``.
        num_classes: ``K`` including background.
        roi_size: the sliding window.
        window: overlap, windows per pass and blending.

    Returns:
        ``(K - 1,)`` Dice per foreground class averaged over the cases whose ground truth holds the
        class; NaN for a class that no case holds.
    """
    device = next(network.parameters()).device
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=num_classes)
    was_training = network.training
    network.eval()
    try:
        for index in range(len(volumes)):
            case = volumes[index]
            image = case["image"].as_subclass(torch.Tensor)[None].to(device)
            logits = sliding_window_inference(
                image, tuple(roi_size), window.batch_size, network, overlap=window.overlap, mode=window.mode
            )
            label = case["label"].as_subclass(torch.Tensor)[None].long().to(device)
            metric(one_hot(logits.argmax(1, keepdim=True), num_classes), one_hot(label, num_classes))
        return torch.nanmean(metric.aggregate().float().cpu(), dim=0)
    finally:
        network.train(was_training)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class GeminiSegmentationNetwork(nn.Module):
    """GVSL's downstream network on GEMINI's backbone (medssl §3.3): ``GeminiUNet`` features, then a
    ``conv3`` to the classes: ``(B, in, X, Y, Z) -> (B, num_classes, X, Y, Z)`` logits (any size; the
    U-Net pads to a multiple of 16 and crops back)."""

    def __init__(self, num_classes: int, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256, 512)):
        super().__init__()
        self.unet = GeminiUNet(3, in_channels, tuple(channels))
        self.head = nn.Conv3d(self.unet.out_channels, num_classes, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet(images))


def _gemini_kwargs(options: GeminiUNetOptions, num_classes: int) -> dict[str, Any]:
    return {"num_classes": num_classes, "in_channels": options.in_channels, "channels": list(options.channels)}


def segmentation_model(
    cfg: FinetuneConfig, num_classes: int, class_weights: Sequence[float] | None = None
) -> SegmentationModel:
    """Model factory ``medssl.segmentation``: the network a ``finetune`` run trains (architecture
    ``cfg.backbone`` or ``cfg.gemini_unet``, which :func:`finetune` resolves before its checkpoints
    record the config) and its loss with the class weights (computed from the data once, then
    recorded with the run)."""
    if cfg.network == "gemini_unet":
        network = GeminiSegmentationNetwork(**_gemini_kwargs(cfg.gemini_unet or GeminiUNetOptions(), num_classes))
    else:
        network = SwinUNETR(**(cfg.backbone or SwinUNETRBackboneOptions()).monai_kwargs(out_channels=num_classes))
    return SegmentationModel(network, class_weights, cfg.loss)


def gemini_initial_network(
    cfg: FinetuneConfig, num_classes: int
) -> tuple[GeminiSegmentationNetwork, GeminiUNetOptions, Intensity, dict[str, Any]]:
    """The ``gemini_unet`` network to fine-tune, its architecture, intensity mapping and initialisation.

    With ``cfg.checkpoint`` (a ``gemini_pretrain`` or ``semisup`` run's) the backbone's
    weights are the checkpoint's ``network.unet``, loaded strictly; the architecture and intensity
    mapping are that run's (``gemini.network``, ``gemini.normalisation``) unless ``cfg.gemini_unet``
    / ``cfg.intensity`` set them. The head is new (random), as in GVSL's downstream scripts.

    Raises:
        ValueError: a checkpoint of another task or a 2D one, or backbone weights that do not match the
            architecture exactly (missing, unexpected or misshapen keys, named).
    """
    if cfg.checkpoint is None:
        options = cfg.gemini_unet or GeminiUNetOptions()
        network = GeminiSegmentationNetwork(**_gemini_kwargs(options, num_classes))
        return network, options, cfg.intensity or "ct_clip", {"initialisation": {"checkpoint": None}}
    state = load_checkpoint(cfg.checkpoint)
    record = state.get("run") or {}
    if (record.get("plugin"), record.get("task")) not in {("medssl", task) for task in GEMINI_TASKS}:
        written = run_description(record) if record else "a run that does not record its config"
        raise ValueError(f"{cfg.checkpoint}: written by {written}; network gemini_unet fine-tunes the backbone of a "
                         f"medssl {' or '.join(GEMINI_TASKS)} checkpoint")
    gemini = record["config"]["gemini"]
    trained = GeminiNetworkOptions.model_validate(gemini["network"])
    if trained.spatial_dims != 3:
        raise ValueError(f"{cfg.checkpoint}: a {trained.spatial_dims}D GEMINI backbone; finetune segments volumes (3D)")
    options = cfg.gemini_unet or GeminiUNetOptions(in_channels=trained.in_channels, channels=trained.channels)
    prefix = "network.unet."
    weights = {key[len(prefix):]: value for key, value in state["model"].items() if key.startswith(prefix)}
    network = GeminiSegmentationNetwork(**_gemini_kwargs(options, num_classes))
    expected = network.unet.state_dict()
    problems = {
        "missing keys": [key for key in expected if key not in weights],
        "unexpected keys": [key for key in weights if key not in expected],
        "shapes (checkpoint vs gemini_unet)": [
            f"{key} {tuple(weights[key].shape)} vs {tuple(value.shape)}"
            for key, value in expected.items() if key in weights and weights[key].shape != value.shape],
    }
    if any(problems.values()):
        found = "; ".join(f"{name} {found[:5]}" + (f" and {len(found) - 5} more" if len(found) > 5 else "")
                          for name, found in problems.items() if found)
        raise ValueError(f"{cfg.checkpoint}: its GEMINI backbone does not fit gemini_unet "
                         f"{options.model_dump(mode='json')}: {found}")
    network.unet.load_state_dict(weights, strict=True)
    source = {"checkpoint": str(cfg.checkpoint.absolute()), "task": record["task"], "step": state["step"]}
    return network, options, cfg.intensity or gemini["normalisation"], {"initialisation": source}


def build_segmentation_network(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a weights file that ``finetune`` wrote (SwinUNETR, or :class:`GeminiSegmentationNetwork`
    for format :data:`GEMINI_SEGMENTATION_FORMAT`), weights loaded strictly; plus its metadata."""
    state, info = load_monai_weights(path)
    if info.get("format") == GEMINI_SEGMENTATION_FORMAT:
        network = GeminiSegmentationNetwork(**info["gemini_kwargs"])
    else:
        network = SwinUNETR(**info["swin_unetr_kwargs"])
    network.load_state_dict(state, strict=True)
    return network, info


def initial_network(cfg: SegmentationRunConfig, num_classes: int) -> tuple[SwinUNETR, SwinUNETRBackboneOptions, dict[str, Any]]:
    """The SwinUNETR to fine-tune, its architecture and how it was initialised.

    With ``cfg.checkpoint``, every weight but the output layer comes from the Alice run's
    ``cfg.pretrained_weights`` network, and the architecture from that checkpoint's run config
    unless ``cfg.backbone`` overrides it.

    Raises:
        ValueError: pretrained weights that do not fit the architecture.
    """
    if cfg.checkpoint is None:
        backbone = cfg.backbone or SwinUNETRBackboneOptions()
        return SwinUNETR(**backbone.monai_kwargs(out_channels=num_classes)), backbone, {"initialisation": {"checkpoint": None}}
    pretrained, weights, step = alice_backbone(cfg.checkpoint, cfg.pretrained_weights, drop_output_layer=True)
    backbone = cfg.backbone or pretrained
    network = SwinUNETR(**backbone.monai_kwargs(out_channels=num_classes))
    try:
        missing, unexpected = network.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{cfg.checkpoint}: pretrained weights do not fit backbone {cfg.backbone}: {exc}") from None
    stray = [key for key in missing if not key.startswith("out.")] + list(unexpected)
    if stray:
        raise ValueError(f"{cfg.checkpoint}: pretrained weights do not fit backbone {cfg.backbone}: keys {stray[:5]}")
    source = {"checkpoint": str(cfg.checkpoint.absolute()), "weights": cfg.pretrained_weights, "step": step}
    return network, backbone, {"initialisation": source}


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune SwinUNETR (or ``gemini_unet``) on a labelled fraction; keep the weights with the best
    validation Dice.

    Returns:
        The trainer's last metrics record plus ``weights`` (the best weights file), ``best_step``,
        ``validation_dice`` (mean over classes), ``validation_dice_per_class``, ``labelled_cases``
        and ``class_weights`` (the loss's, None when unweighted).

    Raises:
        ValueError: an invalid dataset (the check's messages), too few cases, or pretrained weights
            that do not fit the backbone.
    """
    require_valid(cfg.data)
    items, labels = labelled_items(cfg.data)
    splits = split_cases(items, cfg.split)
    train = labelled_subset(splits["train"], cfg.label_fraction, cfg.seed)
    if len(train) < cfg.trainer.batch_size:
        raise ValueError(
            f"label_fraction {cfg.label_fraction} of {len(splits['train'])} train cases leaves {len(train)}, fewer than "
            f"trainer.batch_size {cfg.trainer.batch_size} (volumes per step)"
        )
    if cfg.network == "gemini_unet":
        network, gemini_unet, intensity, initialisation = gemini_initial_network(cfg, num_classes=len(labels))
        # The checkpoints record the architecture and intensity mapping actually trained, so load_run
        # needs no pretrained checkpoint.
        cfg = cfg.model_copy(update={"gemini_unet": gemini_unet, "intensity": intensity})
        weights_info = {"format": GEMINI_SEGMENTATION_FORMAT, "gemini_kwargs": _gemini_kwargs(gemini_unet, len(labels))}
        write_weights = save_weights
    else:
        network, backbone, initialisation = initial_network(cfg, num_classes=len(labels))
        cfg = cfg.model_copy(update={"backbone": backbone, "intensity": cfg.intensity or "hu_window"})
        kwargs = backbone.monai_kwargs(out_channels=len(labels))
        weights_info = {}

        def write_weights(state: dict[str, torch.Tensor], info: dict[str, Any], path: Path) -> Path:
            return save_monai_weights(state, kwargs, path, info)

    train_volumes = training_crops(cfg, train)
    validation_volumes = segmentation_volumes(cfg, splits["validation"], cfg.spacing, cfg.intensity)
    class_weights = training_class_weights(cfg, segmentation_volumes(cfg, train, cfg.spacing, cfg.intensity), labels)
    class_names = [labels[index] for index in range(1, len(labels))]
    metadata = {
        **weights_info,
        **initialisation,
        "intensity": cfg.intensity,
        "class_weights": class_weights,
        "labels": {str(index): name for index, name in labels.items()},
        "crop_size": list(cfg.crop_size),
        "spacing": cfg.spacing,
        "split": cfg.split.model_dump(),
        "label_fraction": cfg.label_fraction,
        "train_cases": [item["image"] for item in train],
    }

    def validate(model: SegmentationModel, step: int) -> dict[str, float]:
        dice = segmentation_dice(model.network, validation_volumes, len(labels), cfg.crop_size, cfg.sliding_window)
        per_class = {f"dice/{name}": value for name, value in zip(class_names, dice.tolist())}
        return {"dice": float(torch.nanmean(dice)), **per_class}

    def save(model: SegmentationModel, path: Path, record: dict[str, Any]) -> None:
        per_class = {name: finite_or_none(record["metrics"][f"dice/{name}"]) for name in class_names}
        write_weights(model.network.state_dict(), {
            **metadata, "step": record["step"], "validation_dice": record["score"],
            "validation_dice_per_class": per_class}, path)

    best = BestCheckpoint("dice", cfg.run_dir / BEST_WEIGHTS, save=save)
    trainer = Trainer.for_run(cfg, model_factory="medssl.segmentation",
                              model_options={"num_classes": len(labels), "class_weights": class_weights},
                              validate=validate, callbacks=[best])
    result = trainer.fit(SegmentationModel(network, class_weights, cfg.loss), train_volumes, collate_fn=_crop_batch)
    if best.record is None:
        raise ValueError(f"{cfg.data}: no validation case holds any labelled class, so no weights could be selected")
    kept = json.loads(sidecar_path(best.path).read_text())
    return {
        **result,
        "weights": str(best.path),
        "best_step": kept["step"],
        "validation_dice": kept["validation_dice"],
        "validation_dice_per_class": kept["validation_dice_per_class"],
        "labelled_cases": len(train),
        "class_weights": class_weights,
    }


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Per-class and mean Dice of fine-tuned weights; also written to ``<run_dir>/results.json``.

    The cases are the ``subset`` of the split recorded in the weights file, preprocessed at its
    recorded spacing and intensity mapping, and inferred with its training crop as the sliding
    window. SwinUNETR and ``gemini_unet`` weights alike (:func:`build_segmentation_network`).

    Raises:
        ValueError: an invalid dataset, or labels that differ from the ones the weights were trained on.
    """
    require_valid(cfg.data)
    network, info = build_segmentation_network(cfg.checkpoint)
    items, labels = labelled_items(cfg.data)
    trained_labels = {int(index): name for index, name in info["labels"].items()}
    if trained_labels != labels:
        raise ValueError(f"{cfg.data}: labels {labels} differ from the ones {cfg.checkpoint} was trained on: {trained_labels}")
    cases = items if cfg.subset == "all" else split_cases(items, SplitOptions(**info["split"]))[cfg.subset]
    spacing = tuple(info["spacing"]) if info["spacing"] is not None else None
    per_class = segmentation_dice(
        network.to(_device()), segmentation_volumes(cfg, cases, spacing, info.get("intensity")), len(labels),
        info["crop_size"], cfg.sliding_window
    )
    class_names = [labels[index] for index in range(1, len(labels))]
    result = {
        "dice": finite_or_none(float(torch.nanmean(per_class))),
        "dice_per_class": _per_class(class_names, per_class),
        "subset": cfg.subset,
        "cases": len(cases),
        "checkpoint": str(cfg.checkpoint),
    }
    write_text_atomically(cfg.run_dir / "results.json", json.dumps(result, indent=2))
    return result
