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
- with a ``data.validation_split``, every checkpoint step scores point mIoU on it and the best
  weights are kept as ``<run_dir>/best.pt`` (without one, the final weights are written there);
  ``evaluate`` reads that file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from accord.config import ExistingPath, RunConfig, TrainerConfig
from accord.training import Trainer
from accord.training.checkpoint import list_checkpoints
from accord_superflow.data.index import LABEL_FRACTIONS, label_fraction_subset
from accord_superflow.evaluate import save_segmenter, score_segmenter, segmenter_record
from accord_superflow.pretrain import PointAugmentationConfig
from accord_superflow.segmentation import (
    LidarSegDataset,
    LidarSegmenter,
    SegmentationDataConfig,
    SegmentationLoss,
    SegmentationModelConfig,
    SegmentationTraining,
    build_segmenter,
    collate_scans,
    load_pretrained_backbone,
)

__all__ = ["BEST_WEIGHTS", "FinetuneDataConfig", "FinetuneConfig", "BestSegmenter", "build_finetune_model",
           "finetune"]

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best.pt"
VALIDATION_LOG = "validation.jsonl"
#: The head's parameters in :class:`SegmentationTraining`, for the trainer's ``lr_multipliers``.
HEAD_PARAMETERS = r"^segmenter\.head\."


class FinetuneDataConfig(SegmentationDataConfig):
    """Training and validation scans."""

    train_split: str = Field("train", description="official split to train on (v1.0-mini: mini_train)")
    validation_split: str | None = Field("val", description="split scored at every checkpoint to keep the best "
                                                            "weights; None: keep the final weights")
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
                                           warmup_steps=350, min_lr=4e-7, checkpoint_every=175, keep_last=1)

    @model_validator(mode="after")
    def _head_learns_faster(self) -> FinetuneConfig:
        if HEAD_PARAMETERS not in self.trainer.lr_multipliers:  # (assignment re-runs this validator)
            multipliers = {HEAD_PARAMETERS: self.head_lr_mult, **self.trainer.lr_multipliers}
            self.trainer = self.trainer.model_copy(update={"lr_multipliers": multipliers})
        return self


class BestSegmenter:
    """Keeps the best-scoring segmenter weights in one file, rewritten on improvement.

    Args:
        path: the weights file; a resumed run competes with the score stored in it.
        model: the config that rebuilds the segmenter.
        metadata: provenance stored with every version.
    """

    def __init__(self, path: Path, model: SegmentationModelConfig, metadata: dict[str, Any]) -> None:
        self.path = path
        self.model = model
        self.metadata = metadata
        self.score = segmenter_record(path)["validation_miou"] if path.is_file() else -math.inf

    def update(self, step: int, score: float, segmenter: LidarSegmenter, details: dict[str, Any]) -> bool:
        """Keep ``segmenter`` if ``score`` beats the best so far; True if kept."""
        if not score > self.score:
            return False
        save_segmenter(self.path, segmenter, self.model, {**self.metadata, "step": step, "validation_miou": score,
                                                          **details})
        self.score = score
        return True


def build_finetune_model(cfg: FinetuneConfig) -> tuple[SegmentationTraining, dict[str, Any]]:
    """The trainer-contract model of ``cfg`` and how its backbone was initialised.

    Raises:
        ValueError: a checkpoint that is not a SuperFlow pretraining checkpoint of ``model.backbone``'s
            architecture.
    """
    segmenter = build_segmenter(cfg.model)
    initialisation = None if cfg.checkpoint is None else load_pretrained_backbone(segmenter.backbone, cfg.checkpoint)
    if cfg.linear_probe:
        segmenter.freeze_backbone()
    return SegmentationTraining(segmenter, SegmentationLoss(cfg.lovasz_weight)), {"initialisation": initialisation}


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train the segmenter on the labelled fraction; keep the best (or final) weights in ``best.pt``.

    Returns:
        The trainer's last metrics record plus ``weights`` (``best.pt``), ``best_step``,
        ``validation_miou`` (``None`` without validation), ``train_keyframes`` and ``train_scenes``.

    Raises:
        ValueError: a bad split or fraction, scans without labels, or an unusable checkpoint.
    """
    from accord_superflow.data import require_valid

    require_valid(cfg.data.root)
    train_index = label_fraction_subset(cfg.data.index(cfg.data.train_split), cfg.data.label_fraction)
    train = LidarSegDataset(cfg.data.root, train_index, cfg.data.augmentation)
    validation = (None if cfg.data.validation_split is None
                  else LidarSegDataset(cfg.data.root, cfg.data.index(cfg.data.validation_split)))
    torch.manual_seed(cfg.seed)
    model, initialisation = build_finetune_model(cfg)
    metadata = {**initialisation, "linear_probe": cfg.linear_probe, "label_fraction": cfg.data.label_fraction,
                "train_split": cfg.data.train_split, "train_scenes": train_index.scene_names()}
    best_path, log_path = cfg.run_dir / BEST_WEIGHTS, cfg.run_dir / VALIDATION_LOG

    def validate(step: int, trained: SegmentationTraining) -> None:
        scores = score_segmenter(trained.segmenter, validation)
        with log_path.open("a") as handle:
            handle.write(json.dumps({"step": step, **scores}) + "\n")
        best.update(step, scores["miou"] or 0.0, trained.segmenter,
                    {"validation_iou_per_class": scores["iou_per_class"]})

    trainer = Trainer(cfg.trainer, cfg.run_dir, before_checkpoint=None if validation is None else validate)
    if not list_checkpoints(trainer.checkpoint_dir):
        # A fresh run: weights an earlier run left in run_dir are not this run's best.
        best_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    best = BestSegmenter(best_path, cfg.model, metadata)
    log.info("fine-tuning on %d keyframes (%d %% of %s: %d scenes)%s", len(train), cfg.data.label_fraction,
             cfg.data.train_split, len(train_index.scene_names()), ", linear probing" if cfg.linear_probe else "")
    result = trainer.fit(model, train, collate_fn=collate_scans)
    if validation is None:
        save_segmenter(best_path, model.segmenter, cfg.model,
                       {**metadata, "step": cfg.trainer.max_steps, "validation_miou": None})
    kept = segmenter_record(best_path)
    return {**result, "weights": str(best_path), "best_step": kept["step"], "validation_miou": kept["validation_miou"],
            "train_keyframes": len(train), "train_scenes": train_index.scene_names()}
