"""The ``finetune`` task: LiDAR segmentation from a SuperFlow backbone (or random init), incl. linear probing.

Protocol (SuperFlow's downstream configs, method spec §5.4 / §6):

- training scans: the keyframes of ``data.train_split``, restricted to a SLidR label fraction
  (1/5/10/25/100 %: every ``100 / p``-th scene, :func:`~accord_superflow.data.label_fraction_subset`),
  each randomly flipped, rotated (yaw in ``[-pi, pi]``) and scaled (0.95..1.05);
- the network: :class:`~accord_superflow.segmentation.LidarSegmenter` (MinkUNet, BN momentum
  0.02, linear head to 16 classes); the backbone is random or the ``backbone_3d.*`` weights of a
  pretraining checkpoint; the head learns ``head_lr_mult`` times faster (10, through the trainer's
  ``lr_multipliers``);
- loss ``CE(ignore) + 2 x Lovasz`` on voxel labels, AdamW (lr 1e-3, wd 0.01) through the core
  :class:`~accord.training.Trainer`;
- ``linear_probe: true`` trains the head only, on a backbone frozen outright (parameters *and*
  BatchNorm statistics; upstream lets the statistics drift);
- with a ``data.validation_split``, the trainer validates every ``trainer.validate_every`` steps
  and after the last step: point mIoU, accuracy and per-class IoU on that split, logged as
  ``val/miou``, ``val/accuracy`` and ``val/iou/<class>`` in ``metrics.jsonl``; the core
  :class:`~accord.training.BestCheckpoint` keeps the best-mIoU weights as ``<run_dir>/best.pt``
  (without a validation split, the final weights are written there); ``evaluate`` reads that file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from accord.config import ExistingPath, RunConfig, TrainerConfig
from accord.training import BestCheckpoint, Trainer
from accord_superflow.data.index import LABEL_FRACTIONS, label_fraction_subset
from accord_superflow.evaluate import save_segmenter, score_segmenter, segmenter_record
from accord_superflow.weights import load_pretrained_backbone
from accord_superflow.pretrain import PointAugmentationConfig
from accord_superflow.segmentation import (
    SEGMENTATION_CLASSES,
    LidarSegDataset,
    SegmentationDataConfig,
    SegmentationLoss,
    SegmentationModelConfig,
    SegmentationTraining,
    build_segmenter,
    collate_scans,
)

__all__ = ["BEST_WEIGHTS", "FinetuneDataConfig", "FinetuneConfig", "build_finetune_model",
           "finetune"]

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best.pt"
#: The head's parameters in :class:`SegmentationTraining`, for the trainer's ``lr_multipliers``.
HEAD_PARAMETERS = r"^segmenter\.head\."


class FinetuneDataConfig(SegmentationDataConfig):
    """Training and validation scans."""

    train_split: str = Field("train", description="official split to train on (v1.0-mini: mini_train)")
    validation_split: str | None = Field("val", description="split scored every trainer.validate_every steps to keep "
                                                            "the best weights; None: keep the final weights")
    label_fraction: int = Field(100, description=f"percent of the train scenes, one of {LABEL_FRACTIONS} (SLidR)")
    augmentation: PointAugmentationConfig = PointAugmentationConfig(rotation_range=(-math.pi, math.pi))

    @field_validator("label_fraction")
    @classmethod
    def _known_fraction(cls, value: int) -> int:
        if value not in LABEL_FRACTIONS:
            raise ValueError(f"expected one of {LABEL_FRACTIONS} (percent), got {value}")
        return value


class FinetuneConfig(RunConfig):
    """``task: finetune``: segmentation fine-tuning or (``linear_probe: true``) linear probing."""

    task: str = "finetune"
    data: FinetuneDataConfig
    model: SegmentationModelConfig = SegmentationModelConfig()
    checkpoint: ExistingPath | None = Field(None, description="SuperFlow pretraining checkpoint (its backbone_3d.* "
                                                              "weights); None: random initialisation")
    linear_probe: bool = Field(False, description="train the head only; backbone weights and BN statistics frozen")
    lovasz_weight: float = Field(2.0, ge=0, description="loss = CE + lovasz_weight x Lovasz-softmax")
    head_lr_mult: float = Field(10.0, gt=0, description="head learning rate / backbone learning rate (SuperFlow: 10); "
                                                       "becomes the trainer's lr_multipliers entry for the head")
    # SuperFlow: AdamW(1e-3, wd 0.01), OneCycle, 100 epochs of 4 scans x 4 GPUs; 1750 steps are 100
    # epochs of the 1 % subset (about 280 keyframes). Warm-up + cosine follow the OneCycle shape.
    trainer: TrainerConfig = TrainerConfig(max_steps=1750, batch_size=16, lr=1e-3, weight_decay=0.01,
                                           warmup_steps=350, min_lr=4e-7, validate_every=175, checkpoint_every=350,
                                           keep_last=1)

    @model_validator(mode="after")
    def _head_learns_faster(self) -> FinetuneConfig:
        if HEAD_PARAMETERS not in self.trainer.lr_multipliers:  # (assignment re-runs this validator)
            multipliers = {HEAD_PARAMETERS: self.head_lr_mult, **self.trainer.lr_multipliers}
            self.trainer = self.trainer.model_copy(update={"lr_multipliers": multipliers})
        return self


def _nan_if_none(value: float | None) -> float:
    """A score for the trainer's validation metrics: ``None`` (nothing to score) becomes NaN."""
    return math.nan if value is None else value


def segmentation_model(cfg: FinetuneConfig) -> SegmentationTraining:
    """Model factory ``superflow.segmentation``: the trainer-contract segmenter of ``cfg``, randomly initialised."""
    return SegmentationTraining(build_segmenter(cfg.model), SegmentationLoss(cfg.lovasz_weight))


def build_finetune_model(cfg: FinetuneConfig) -> tuple[SegmentationTraining, dict[str, Any]]:
    """The trainer-contract model of ``cfg`` and how its backbone was initialised.

    Raises:
        ValueError: a checkpoint that is not a SuperFlow pretraining checkpoint of ``model.backbone``'s
            architecture.
    """
    model = segmentation_model(cfg)
    initialisation = None if cfg.checkpoint is None else load_pretrained_backbone(model.segmenter.backbone, cfg.checkpoint)
    if cfg.linear_probe:
        model.segmenter.freeze_backbone()
    return model, {"initialisation": initialisation}


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train the segmenter on the labelled fraction; keep the best (or final) weights in ``best.pt``.

    Returns:
        The trainer's last metrics record plus ``weights`` (``best.pt``), ``best_step``,
        ``validation_miou`` (``None`` without validation), ``train_keyframes`` and ``train_scenes``.

    Raises:
        ValueError: a bad split or fraction, scans without labels, or an unusable checkpoint.
    """
    from accord_superflow.data import require_valid

    splits = [cfg.data.train_split] + ([cfg.data.validation_split] if cfg.data.validation_split else [])
    require_valid(cfg.data.root, version=cfg.data.version, splits=splits)
    train_index = label_fraction_subset(cfg.data.index(cfg.data.train_split), cfg.data.label_fraction)
    train = LidarSegDataset(cfg.data.root, train_index, cfg.data.augmentation)
    validation = (None if cfg.data.validation_split is None
                  else LidarSegDataset(cfg.data.root, cfg.data.index(cfg.data.validation_split)))
    model, initialisation = build_finetune_model(cfg)
    metadata = {**initialisation, "linear_probe": cfg.linear_probe, "label_fraction": cfg.data.label_fraction,
                "train_split": cfg.data.train_split, "train_scenes": train_index.scene_names()}
    best_path = cfg.run_dir / BEST_WEIGHTS

    def validate(trained: SegmentationTraining, step: int) -> dict[str, float]:
        scores = score_segmenter(trained.segmenter, validation)
        per_class = {f"iou/{name}": _nan_if_none(value) for name, value in scores["iou_per_class"].items()}
        return {"miou": _nan_if_none(scores["miou"]), "accuracy": _nan_if_none(scores["accuracy"]), **per_class}

    def save(trained: SegmentationTraining, path: Path, record: dict[str, Any]) -> None:
        iou = {name: record["metrics"][f"iou/{name}"] for name in SEGMENTATION_CLASSES}
        save_segmenter(path, trained.segmenter, cfg.model, {
            **metadata, "step": record["step"], "validation_miou": record["score"],
            "validation_iou_per_class": {name: None if math.isnan(value) else value for name, value in iou.items()}})

    best = BestCheckpoint("miou", best_path, save=save)
    trainer = Trainer.for_run(cfg, model_factory="superflow.segmentation",
                              validate=None if validation is None else validate,
                              callbacks=[] if validation is None else [best])
    log.info("fine-tuning on %d keyframes (%d %% of %s: %d scenes)%s", len(train), cfg.data.label_fraction,
             cfg.data.train_split, len(train_index.scene_names()), ", linear probing" if cfg.linear_probe else "")
    result = trainer.fit(model, train, collate_fn=collate_scans)
    if validation is None:
        save_segmenter(best_path, model.segmenter, cfg.model,
                       {**metadata, "step": cfg.trainer.max_steps, "validation_miou": None})
    elif best.record is None:
        raise ValueError(f"{cfg.data.root}: no keyframe of split {cfg.data.validation_split} has a labelled point, "
                         "so no weights could be selected")
    kept = segmenter_record(best_path)
    return {**result, "weights": str(best_path), "best_step": kept["step"], "validation_miou": kept["validation_miou"],
            "train_keyframes": len(train), "train_scenes": train_index.scene_names()}
