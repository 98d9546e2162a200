"""mutdet tasks: ``pretrain`` (MutDet or DETReg-style), ``finetune`` and ``evaluate``, and the model factories.

* ``pretrain``: the detector on pseudo-labels (boxes, 256 pseudo-classes, object embeddings from
  the ``pseudolabel`` task) with the backbone frozen; ``mutdet.enhancement: false`` is the
  DETReg-style baseline (no enhancement, no alignment loss). Spec default 2 + 2 layers.
* ``finetune``: the plain detector on labelled DIOR-R / DOTA, optionally from a pretraining
  checkpoint (:func:`accord_mutdet.weights.load_pretrained_detector`), on a fixed, seeded fraction
  of the training images. Spec default 6 + 6 layers.
* ``evaluate``: VOC07 rotated AP50 / AP75 per class of a fine-tuned checkpoint
  (:func:`accord_mutdet.evaluation.evaluate_detections`); with ``patch_size`` the DOTA protocol:
  detect on patches, merge into full images, score those and (``dota_task1``) write ``Task1_*.txt``.

Optimisation follows the reference (AdamW, lr 1e-4, weight decay 1e-5, gradient clip 35, lr x0.1
for the deformable sampling offsets and, when it trains, the backbone). The reference's schedule,
36 epochs with the lr x0.1 after epoch 32, is ``epochs: 36``, ``lr_drop_epochs: [32]`` and
``trainer.schedule: step`` (the shipped configs): :func:`resolved_trainer` turns epochs into
optimizer steps from the number of training images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from accord.config import ExistingPath, RunConfig, TrainerConfig
from accord.runs import load_run
from accord.training import (DenseProbeData, OnlineProbe, OnlineProbeOptions, Trainer, steps_per_epoch,
                             trainer_for_epochs)
from accord.utils.files import write_text_atomically

from accord_mutdet.models import DetectorOptions, MutDetOptions, RotatedDETR

__all__ = [
    "EvaluateConfig", "FinetuneConfig", "PretrainConfig", "detector_model", "evaluate", "finetune",
    "label_subset", "pretrain", "pretrain_model", "resolved_trainer",
]

Layout = Literal["auto", "dior_r", "dota"]


class DataOptions(RunConfig):
    """Fields every mutdet task shares (kept in one place, not a separate section)."""

    data: ExistingPath = Field(description="DIOR-R root (ImageSets/Main) or DOTA root (<split>/images)")
    layout: Layout = Field("auto", description="dataset layout; auto: from the folder structure")
    version: str = Field("1.0", description="DOTA version for the class names (1.0 or 1.5)")


class TrainingOptions(DataOptions):
    """Fields of the training tasks: the reference's epoch-based schedule (spec §8), resolved into
    optimizer steps at run start, and the augmentation switch."""

    augment: bool = Field(True, description="the reference's random flips (none / horizontal / vertical / "
                          "diagonal, 0.25 each); false: none (e.g. to compare runs sample for sample)")

    epochs: int | None = Field(
        None, ge=1, description="train for this many passes over the training images: trainer.max_steps = "
        "epochs x floor(images / trainer.batch_size) (the trainer drops an incomplete last batch), replacing "
        "trainer.max_steps (the resolved schedule goes to run_dir/schedule.json); None: trainer.max_steps as given")
    lr_drop_epochs: list[int] = Field(
        [], description="with epochs and trainer.schedule step: epochs after which the lr is multiplied by "
        "trainer.lr_drop_factor (reference: [32] of 36); trainer.lr_drop_steps = epoch x steps per epoch")

    @model_validator(mode="after")
    def _drops_need_epochs(self) -> "TrainingOptions":
        if self.lr_drop_epochs and self.epochs is None:
            raise ValueError("lr_drop_epochs needs epochs (or give trainer.lr_drop_steps directly)")
        if self.lr_drop_epochs and self.trainer.schedule != "step":
            raise ValueError(f"lr_drop_epochs is set but trainer.schedule is {self.trainer.schedule!r}; "
                             "use schedule: step")
        if sorted(set(self.lr_drop_epochs)) != self.lr_drop_epochs or any(
                not 1 <= e < (self.epochs or 0) for e in self.lr_drop_epochs):
            raise ValueError(f"lr_drop_epochs {self.lr_drop_epochs}: expected increasing epochs in "
                             f"[1, epochs={self.epochs})")
        return self


def resolved_trainer(cfg: TrainingOptions, train_images: int) -> TrainerConfig:
    """``cfg.trainer`` with ``max_steps`` and ``lr_drop_steps`` from ``cfg.epochs`` over ``train_images``.

    Epochs become optimizer steps by :func:`accord.training.trainer_for_epochs`. With ``epochs`` set,
    ``trainer.max_steps`` is replaced (the tasks report the resolved schedule in their result and in
    ``run_dir/schedule.json``); a ``trainer.lr_drop_steps`` given beside ``lr_drop_epochs`` is refused.

    Raises:
        ValueError: the images do not fill one batch, or both drop forms are given.
    """
    if cfg.epochs is None:
        return cfg.trainer
    return trainer_for_epochs(cfg.trainer, cfg.epochs, train_images, cfg.lr_drop_epochs, source=str(cfg.data))[0]


def _schedule_record(cfg: TrainingOptions, trainer: TrainerConfig, train_images: int) -> dict[str, Any]:
    """The resolved schedule, written to ``run_dir/schedule.json`` and returned with the task result."""
    record = {"train_images": train_images, "epochs": cfg.epochs,
              "steps_per_epoch": steps_per_epoch(trainer, train_images),
              "max_steps": trainer.max_steps, "schedule": trainer.schedule, "lr_drop_steps": trainer.lr_drop_steps,
              "warmup_steps": trainer.warmup_steps, "warmup_start_factor": trainer.warmup_start_factor}
    _write_json(Path(cfg.run_dir) / "schedule.json", record)
    return record


class BoxProbeOptions(OnlineProbeOptions):
    """Online probe of pretraining: a linear classifier of encoder features at labelled object centres."""

    split: str = Field("val", description="labelled split whose real classes the probe predicts")
    max_images: int = Field(32, ge=1, description="images of that split used (the first ones)")


class PretrainConfig(TrainingOptions):
    split: str = Field("train", description="images to pretrain on (their annotations are not used)")
    pseudo_dir: ExistingPath = Field(description="pseudo-labels, one <image id>.npz per image (pseudolabel task)")
    image_size: int = Field(1024, ge=32, description="square input side (reference: 800 patches resized to 1024)")
    num_pseudo_classes: int = Field(256, ge=1, description="pseudo-classes (k-means clusters) of the class head")
    model: DetectorOptions = DetectorOptions(encoder_layers=2, decoder_layers=2)
    mutdet: MutDetOptions = MutDetOptions()
    trainer: TrainerConfig = TrainerConfig(
        max_steps=1000, batch_size=2, lr=1e-4, weight_decay=1e-5, grad_clip_norm=35.0, warmup_steps=100,
        warmup_start_factor=1 / 3, checkpoint_every=500, lr_multipliers={"sampling_offsets": 0.1})
    probe: BoxProbeOptions | None = Field(None, description="online probe (None: off)")


class FinetuneConfig(TrainingOptions):
    split: str = Field("trainval", description="labelled training split (DIOR-R trainval, DOTA train)")
    label_fraction: float = Field(1.0, gt=0, le=1, description="fraction of the training images used")
    split_seed: int = Field(0, description="seed of the fixed label-fraction subset (independent of the run seed)")
    class_names: list[str] | None = Field(None, description="classes; None: DIOR-R's 20 or DOTA's (by version)")
    image_size: int = Field(800, ge=32, description="square input side (reference: RResize 800)")
    checkpoint: ExistingPath | None = Field(
        None, description="mutdet pretrain checkpoint; None: no detection pretraining")
    layer_mapping: Literal["prefix", "strict"] = Field(
        "prefix", description="prefix: pretrained layers 0..k-1 load where both models have them (reported); "
        "strict: layer counts must match")
    model: DetectorOptions = DetectorOptions()
    trainer: TrainerConfig = TrainerConfig(
        max_steps=1000, batch_size=2, lr=1e-4, weight_decay=1e-5, grad_clip_norm=35.0, warmup_steps=100,
        warmup_start_factor=1 / 3, checkpoint_every=500, lr_multipliers={"sampling_offsets": 0.1, r"^backbone\.": 0.1})


class EvaluateConfig(DataOptions):
    checkpoint: ExistingPath = Field(description="a mutdet finetune checkpoint")
    split: str = Field("test", description="split to score")
    image_size: int | None = Field(None, ge=32, description="input side; None: the fine-tuning run's")
    batch_size: int = Field(2, ge=1)
    rule: Literal["voc", "mmrotate"] = Field("voc", description="VOC07 11-point rule (see accord_mutdet.evaluation)")
    dota_task1: bool = Field(False, description="also write Task1_<class>.txt files under run_dir/task1")
    patch_size: int | None = Field(
        None, ge=16, description="DOTA protocol: cut every image into patch_size windows (run_dir/patches), detect "
        "per patch, merge into full images (score filter, per-class rotated NMS) and score those; None: whole images")
    patch_gap: int = Field(200, ge=0, description="overlap of neighbouring windows (reference: 200)")
    merge_iou: float = Field(0.1, gt=0, le=1, description="cross-patch rotated NMS IoU (reference merge_det: 0.1)")
    merge_score_thr: float = Field(0.05, ge=0, le=1, description="patch detections below it are dropped (0.05)")
    patch_nms_iou: float | None = Field(0.5, gt=0, le=1, description="rotated NMS within each patch before "
                                        "merging (reference merge_det: 0.5; None: none)")

    @model_validator(mode="after")
    def _gap_fits(self) -> "EvaluateConfig":
        if self.patch_size is not None and self.patch_gap >= self.patch_size:
            raise ValueError(f"patch_gap ({self.patch_gap}) must be smaller than patch_size ({self.patch_size})")
        return self


# --- model factories -------------------------------------------------------------------------------

def pretrain_model(cfg: PretrainConfig) -> RotatedDETR:
    """Model factory ``mutdet.pretrain``: the pretraining detector (frozen backbone, pseudo-class head)."""
    return RotatedDETR(cfg.model, cfg.num_pseudo_classes, mutdet=cfg.mutdet, frozen_backbone=True)


def detector_model(cfg: FinetuneConfig, class_names: list[str]) -> RotatedDETR:
    """Model factory ``mutdet.detector``: the plain detector for ``class_names``."""
    return RotatedDETR(cfg.model, len(class_names), class_names=class_names)


# --- helpers ---------------------------------------------------------------------------------------

def _layout(cfg: DataOptions) -> str:
    from accord_mutdet.data.check import is_dior_root, is_dota_root

    if cfg.layout != "auto":
        return cfg.layout
    if is_dior_root(cfg.data):
        return "dior_r"
    if is_dota_root(cfg.data):
        return "dota"
    raise ValueError(f"{cfg.data}: neither a DIOR-R root (ImageSets/Main) nor a DOTA root (<split>/images)")


def _records(cfg: DataOptions, split: str) -> list:
    from accord_mutdet.data import load_checked

    return load_checked(cfg.data, split, layout=_layout(cfg), version=cfg.version)


def _class_names(cfg: DataOptions) -> list[str]:
    from accord_mutdet.data import DIOR_R_CLASSES, dota_classes

    if getattr(cfg, "class_names", None) is not None:
        return list(cfg.class_names)
    return list(DIOR_R_CLASSES) if _layout(cfg) == "dior_r" else list(dota_classes(cfg.version))


def label_subset(records: list, fraction: float, seed: int) -> list:
    """The fixed ``fraction`` of ``records`` (at least one) drawn by ``seed``, in their original order."""
    count = max(1, round(fraction * len(records)))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(records))[:count])
    return [records[i] for i in chosen]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def _check_pseudo_labels(cfg: PretrainConfig, records: list) -> None:
    from accord_mutdet.pseudo.store import read_pseudo_labels

    for record in records:
        path = Path(cfg.pseudo_dir) / f"{record.id}.npz"
        if not path.is_file():
            continue  # DetectionDataset lists every missing file
        pseudo = read_pseudo_labels(path)
        classes, width = pseudo["pseudo_class"], pseudo["embeddings"].shape[1]
        if classes.size and int(classes.max()) >= cfg.num_pseudo_classes:
            raise ValueError(f"{path}: pseudo_class {int(classes.max())} >= num_pseudo_classes "
                             f"{cfg.num_pseudo_classes}; set num_pseudo_classes to the pseudolabel run's cluster count")
        if cfg.mutdet.enhancement and width != cfg.mutdet.object_dim:
            raise ValueError(f"{path}: embeddings have width {width}, mutdet.object_dim is {cfg.mutdet.object_dim}")


def box_probe(cfg: PretrainConfig) -> tuple[OnlineProbe, list[str]]:
    """The online probe: encoder memory at each labelled object's centre (the level-0 token under it),
    objects of even index fit a linear classifier of the real classes, odd ones score it (IoU per class)."""
    from accord_mutdet.data import DetectionDataset, collate_detection

    probe_cfg = cfg.probe
    records = _records(cfg, probe_cfg.split)[: probe_cfg.max_images]
    names = _class_names(cfg)
    present = sorted({name for record in records for name in record.labels})
    batch = collate_detection(list(DetectionDataset(records, image_size=cfg.image_size, train=False,
                                                    class_names=names)))

    @torch.no_grad()
    def extract(model: RotatedDETR) -> DenseProbeData:
        device = next(model.parameters()).device
        encoded = model.encode(batch["images"].to(device))
        height, width = (int(v) for v in encoded["spatial_shapes"][0])
        features, labels = [], []
        for b, (boxes, classes) in enumerate(zip(batch["boxes"], batch["labels"])):
            x = (boxes[:, 0] / cfg.image_size * width).long().clamp(0, width - 1)
            y = (boxes[:, 1] / cfg.image_size * height).long().clamp(0, height - 1)
            features.append(encoded["memory"][b, (y * width + x).to(device)].float().cpu())
            labels.append(torch.tensor([present.index(names[int(c)]) for c in classes], dtype=torch.long))
        features, labels = torch.cat(features), torch.cat(labels)
        return DenseProbeData(features[0::2], labels[0::2], features[1::2], labels[1::2])

    return OnlineProbe(extract, len(present), probe_cfg.every, class_names=present,
                       fit_steps=probe_cfg.fit_steps), present


# --- tasks -----------------------------------------------------------------------------------------

def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """MutDet (or DETReg-style) detection pretraining on pseudo-labels."""
    from accord_mutdet.data import DetectionDataset, collate_detection
    from accord_mutdet.models.backbone import load_backbone_weights

    records = _records(cfg, cfg.split)
    _check_pseudo_labels(cfg, records)
    dataset = DetectionDataset(records, image_size=cfg.image_size, train=cfg.augment, pseudo_dir=cfg.pseudo_dir)
    model = pretrain_model(cfg)
    if cfg.model.backbone_weights is not None:
        load_backbone_weights(model.backbone, cfg.model.backbone_weights)
    callbacks = [box_probe(cfg)[0]] if cfg.probe is not None else []
    options = resolved_trainer(cfg, len(dataset))
    schedule = _schedule_record(cfg, options, len(dataset))
    trainer = Trainer.for_run(cfg, model_factory="mutdet.pretrain", callbacks=callbacks, trainer=options)
    result = trainer.fit(model, dataset, collate_fn=collate_detection)
    return {**result, "method": "mutdet" if cfg.mutdet.enhancement else "detreg", "images": len(records),
            "schedule": schedule}


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune the plain detector on labelled data, from a pretraining checkpoint or not."""
    from accord_mutdet.data import DetectionDataset, collate_detection
    from accord_mutdet.models.backbone import load_backbone_weights
    from accord_mutdet.weights import load_pretrained_detector

    class_names = _class_names(cfg)
    records = _records(cfg, cfg.split)
    subset = label_subset(records, cfg.label_fraction, cfg.split_seed)
    write_text_atomically(Path(cfg.run_dir) / "label_split.txt", "".join(f"{r.id}\n" for r in subset))
    dataset = DetectionDataset(subset, image_size=cfg.image_size, train=cfg.augment, class_names=class_names)
    model = detector_model(cfg, class_names)
    weights: dict[str, Any] = {"init": "random"}
    if cfg.model.backbone_weights is not None:
        load_backbone_weights(model.backbone, cfg.model.backbone_weights)
        weights["backbone"] = str(cfg.model.backbone_weights)
    if cfg.checkpoint is not None:
        weights = {"init": "pretrained", **load_pretrained_detector(model, cfg.checkpoint, cfg.layer_mapping)}
    _write_json(Path(cfg.run_dir) / "weights.json", weights)
    options = resolved_trainer(cfg, len(dataset))
    schedule = _schedule_record(cfg, options, len(dataset))
    trainer = Trainer.for_run(cfg, model_factory="mutdet.detector", model_options={"class_names": class_names},
                              trainer=options)
    result = trainer.fit(model, dataset, collate_fn=collate_detection)
    return {**result, "labelled_images": len(subset), "weights": weights, "schedule": schedule}


@torch.no_grad()
def predict_records(model: RotatedDETR, records: list, image_size: int, batch_size: int) -> dict[str, dict[str, Any]]:
    """Detections of every record in original-image pixels: ``{image id: {boxes, scores, labels}}``."""
    from accord_mutdet.data import DetectionDataset, collate_detection

    dataset = DetectionDataset(records, image_size=image_size, train=False, class_names=model.class_names)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection)
    device = next(model.parameters()).device
    detections = {}
    for batch in loader:
        for image_id, scale, found in zip(batch["image_ids"], batch["scales"].tolist(),
                                          model.predict(batch["images"].to(device))):
            boxes = found["boxes"].cpu().clone()
            boxes[:, :4] /= scale
            detections[image_id] = {"boxes": boxes.numpy(), "scores": found["scores"].cpu().numpy(),
                                    "labels": found["labels"].cpu().numpy()}
    return detections


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """VOC07 rotated AP50 / AP75 per class of a fine-tuned checkpoint on one split.

    With ``patch_size`` (DOTA): the split's images are cut into windows written under
    ``run_dir/patches`` (:func:`accord_mutdet.data.write_patches`), the detector runs per window,
    and :func:`accord_mutdet.evaluation.evaluate_patch_detections` merges the windows' detections
    into full images and scores them against the full-image annotations.
    """
    from accord_mutdet.data import write_patches
    from accord_mutdet.evaluation import evaluate_detections, evaluate_patch_detections, write_dota_task1

    run = load_run(cfg.checkpoint)
    if not isinstance(run.model, RotatedDETR) or run.record.get("task") != "finetune":
        raise ValueError(f"{cfg.checkpoint}: expected a mutdet finetune checkpoint, got task "
                         f"{run.record.get('plugin')}.{run.record.get('task')}")
    model = run.model
    image_size = cfg.image_size or run.config.image_size
    records = _records(cfg, cfg.split)
    unknown = sorted({name for record in records for name in record.labels} - set(model.class_names))
    if unknown:  # scoring them would silently give AP 0
        raise ValueError(f"{cfg.data} ({cfg.split}): classes {unknown} are not among the checkpoint's "
                         f"{len(model.class_names)} classes ({', '.join(model.class_names[:4])}, ...); evaluate a "
                         "detector fine-tuned on this dataset")
    task1_dir = Path(cfg.run_dir) / "task1" if cfg.dota_task1 else None
    extra: dict[str, Any] = {}
    if cfg.patch_size is None:
        detections = predict_records(model, records, image_size, cfg.batch_size)
        scores = evaluate_detections(detections, records, model.class_names, rule=cfg.rule)
        if task1_dir is not None:
            write_dota_task1(detections, model.class_names, task1_dir)
    else:
        patches = write_patches(records, Path(cfg.run_dir) / "patches", size=cfg.patch_size, gap=cfg.patch_gap)
        detections = predict_records(model, patches, image_size, cfg.batch_size)
        scores = evaluate_patch_detections(detections, records, model.class_names, rule=cfg.rule,
                                           nms_iou=cfg.merge_iou, score_thr=cfg.merge_score_thr,
                                           patch_nms_iou=cfg.patch_nms_iou, task1_dir=task1_dir)
        extra = {"patches": len(patches), "patch_size": cfg.patch_size, "patch_gap": cfg.patch_gap}
    result = {
        "AP50": scores["AP50"], "AP75": scores["AP75"], "mean_AP50_AP75": scores["mean_AP50_AP75"],
        "rule": cfg.rule, "images": len(records), **extra,
        "AP50_per_class": {n: (e["AP50"] if e["num_gts"] else None) for n, e in scores["per_class"].items()},
        "AP75_per_class": {n: (e["AP75"] if e["num_gts"] else None) for n, e in scores["per_class"].items()},
    }
    _write_json(Path(cfg.run_dir) / "evaluation.json", {**result, "per_class": scores["per_class"]})
    return result
