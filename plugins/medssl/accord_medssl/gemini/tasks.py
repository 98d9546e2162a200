"""The GEMINI tasks: ``gemini_pretrain`` (GEMINI-MIP), ``semisup`` (GEMINI-Semi) and ``register``.

They are tasks of their own rather than ``pretrain`` with ``method: gemini``: GEMINI's optimisation
(constant lr 1e-4, no warm-up, no weight decay, batch 1, two steps per iteration) shares no trainer
default with Alice's, and a config section's defaults are merged into the file's values before any
validator runs, so one task could not tell "not set" from "Alice's default".

``gemini_pretrain`` trains on the whole volumes of an MSD dataset or NIfTI folder, each read without
the Alice HU window, normalised by ``gemini.normalisation`` and centre-cropped / zero-padded to
``size``, or (``spatial_dims: 2``) on a chest X-ray folder (:mod:`accord_medssl.data.cxr`);
``semisup`` adds a few labelled cases; ``register`` warps a moving image (and its
label) onto a fixed one with a trained GEMINI deformer and writes the warped image, warped label
and flow (NIfTI, or PNG in 2D).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import cv2
import nibabel as nib
import numpy as np
import torch
from pydantic import Field, model_validator

from accord.config import ExistingPath, RunConfig, TrainerConfig
from accord.training import Trainer
from accord.utils.files import write_atomically
from accord_medssl.data import build_dataset, require_valid
from accord_medssl.data.cxr import CxrTableOptions, check_cxr, cxr_items, read_cxr, read_mask
from accord_medssl.finetune import SplitOptions
from accord_medssl.gemini.data import GeminiPairs, fixed_size, normalise_intensity
from accord_medssl.gemini.model import GeminiModel, GeminiOptions
from accord_medssl.gemini.warp import folding_stats, warp
from accord_medssl.views import VolumeRunConfig, pretraining_items

__all__ = [
    "GEMINI_TRAINER_DEFAULTS",
    "GeminiPretrainConfig",
    "GeminiRegisterConfig",
    "GeminiSemisupConfig",
    "gemini_model",
    "gemini_pretrain",
    "gemini_register",
    "gemini_semisup",
    "gemini_semisup_model",
    "label_dice",
    "read_nifti",
    "volume_pairs",
]

#: The reference's optimisation (medssl §2.8): Adam (AdamW without decay), lr 1e-4, constant, batch 1;
#: 1000 iterations of two steps, checkpoints every 100 iterations.
GEMINI_TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 2000,
    "checkpoint_every": 200,
    "optimizer": "adamw",
    "lr": 1e-4,
    "min_lr": 0.0,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "schedule": "constant",
    "grad_clip_norm": None,
    "batch_size": 1,
}


class GeminiPretrainConfig(VolumeRunConfig):
    """The ``gemini_pretrain`` task: GEMINI-MIP on whole volumes (``gemini.network.spatial_dims: 3``) or on a
    chest X-ray folder (:mod:`accord_medssl.data.cxr`, ``spatial_dims: 2``, ``size: [512, 512]``)."""

    spacing: tuple[float, float, float] | None = Field(None, description="resample to this voxel size (mm); None: native")
    size: tuple[int, ...] = Field(
        (96, 96, 96), description="3D: every volume centre-cropped / zero-padded to this size; 2D: every X-ray resized "
        "to (H, W)")
    gemini: GeminiOptions = GeminiOptions()
    cxr: CxrTableOptions = Field(CxrTableOptions(), description="2D with data a CSV file: its path and group columns")
    trainer: TrainerConfig = Field(
        TrainerConfig(**GEMINI_TRAINER_DEFAULTS),
        description="the reference's Adam lr 1e-4, constant, batch 1; with gemini.loss.optimizer_steps 'two' "
        "max_steps counts both steps of an iteration (2000 = 1000 iterations)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> GeminiPretrainConfig:
        _check_gemini(self.size, self.gemini, self.trainer, allow_2d=True)
        if self.gemini.corruption is None:
            raise ValueError("gemini.corruption: GEMINI-MIP restores the corrupted image; it cannot be null here")
        return self


def gemini_model(cfg: GeminiPretrainConfig) -> GeminiModel:
    """Model factory ``medssl.gemini``: the GEMINI-MIP model of a ``gemini_pretrain`` run."""
    return GeminiModel(cfg.gemini, task="restoration")


def volume_pairs(cfg: GeminiPretrainConfig) -> GeminiPairs:
    """GEMINI-MIP samples over the images of ``cfg.data``: each a different pair of volumes."""
    items = pretraining_items(cfg.data)
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else cfg.run_dir / "cache"
    # Raw intensities: GEMINI normalises each volume itself (min-max or CT clip), not with Alice's window.
    volumes = build_dataset(items, cache=cfg.cache, cache_dir=cache_dir, spacing=cfg.spacing, hu_window=None,
                            seed=cfg.seed)
    resize = fixed_size(cfg.size)

    def load(index: int) -> torch.Tensor:
        image = normalise_intensity(volumes[index]["image"].as_tensor(), cfg.gemini.normalisation)
        return resize(image).as_subclass(torch.Tensor)

    return GeminiPairs(load, len(items), spatial_dims=3, augment=cfg.gemini.augment, corruption=cfg.gemini.corruption)


def _require_valid_cxr(root: Path, table: CxrTableOptions) -> None:
    """Raise ``ValueError`` listing every problem :func:`~accord_medssl.data.cxr.check_cxr` finds."""
    problems = check_cxr(root, **table.model_dump())
    if problems:
        raise ValueError(f"dataset {root} failed {len(problems)} check(s):\n" + "\n".join(map(str, problems)))


def cxr_pairs(cfg: GeminiPretrainConfig) -> GeminiPairs:
    """GEMINI-MIP samples over a chest X-ray folder: two different images of one group, read in [0, 1]."""
    items = cxr_items(cfg.data, cfg.cxr)
    return GeminiPairs(lambda index: read_cxr(items[index]["image"], tuple(cfg.size)), len(items),
                       groups=[item["group"] for item in items], spatial_dims=2, augment=cfg.gemini.augment,
                       corruption=cfg.gemini.corruption)


def gemini_pretrain(cfg: GeminiPretrainConfig) -> dict[str, Any]:
    """Train GEMINI-MIP with the core trainer; returns its last metrics record and ``checkpoint``.

    Raises:
        ValueError: an invalid dataset (every problem the check finds) or fewer than two images (per group).
    """
    if cfg.gemini.network.spatial_dims == 2:
        _require_valid_cxr(cfg.data, cfg.cxr)
        dataset = cxr_pairs(cfg)
    else:
        require_valid(cfg.data)
        dataset = volume_pairs(cfg)
    return Trainer.for_run(cfg, model_factory="medssl.gemini").fit(gemini_model(cfg), dataset)


class GeminiRegisterConfig(RunConfig):
    """The ``register`` task: warp each moving volume (and label) onto the fixed one."""

    checkpoint: ExistingPath = Field(description="a gemini_pretrain (or semisup) checkpoint")
    fixed: ExistingPath = Field(description="fixed image (NIfTI; PNG / JPEG / DICOM for a 2D model)")
    moving: ExistingPath = Field(description="moving image (NIfTI; PNG / JPEG / DICOM for a 2D model)")
    moving_label: ExistingPath | None = Field(
        None, description="label map (2D: binary PNG mask) of the moving image, warped with nearest")
    fixed_label: ExistingPath | None = Field(None, description="label map of the fixed image: Dice before / after")


def read_nifti(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """A 3D NIfTI reoriented to RAS, as training reads it: float32 ``(1, X, Y, Z)`` and its affine.

    Raises:
        ValueError: not a single 3D volume.
    """
    image = nib.load(path)
    if len(image.shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume (X, Y, Z), got shape {image.shape}")
    image = nib.as_closest_canonical(image)
    return torch.as_tensor(np.ascontiguousarray(image.dataobj), dtype=torch.float32)[None], image.affine


def _read_volume(path: Path, cfg: Any, size: tuple[int, ...], normalise: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A NIfTI as a ``(1, *size)`` tensor in the training run's intensity scale, and the affine of that grid."""
    array, affine = read_nifti(path)
    image_shape = array.shape[1:]
    if normalise:
        array = normalise_intensity(array, cfg.gemini.normalisation)
    # Where voxel 0 of the cropped / padded grid lies on the original one (MONAI's centre crop and
    # symmetric pad), so that the outputs keep their place in the scanner frame.
    offset = [old // 2 - new // 2 if old >= new else -((new - old) // 2) for old, new in zip(image_shape, size)]
    shift = np.eye(4)
    shift[:3, 3] = offset
    return fixed_size(size)(array).as_subclass(torch.Tensor), affine @ shift


def label_dice(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Dice per label id present in either map (background 0 excluded)."""
    ids = sorted((set(a.unique().tolist()) | set(b.unique().tolist())) - {0})
    return {str(int(i)): float(2 * ((a == i) & (b == i)).sum() / ((a == i).sum() + (b == i).sum())) for i in ids}


def gemini_register(cfg: GeminiRegisterConfig) -> dict[str, Any]:
    """Register ``moving`` onto ``fixed`` with a trained GEMINI and write the results under ``run_dir``.

    3D (NIfTI inputs): writes ``warped.nii.gz`` (moving image on the fixed grid, in the training
    intensity scale), ``flow.nii.gz`` (``(X, Y, Z, 3)`` displacement in voxels, channel i along axis
    i), with ``moving_label``: ``warped_label.nii.gz`` (nearest); images are brought to the training
    run's ``size`` by the same centre crop / zero pad, and the outputs keep the fixed image's affine,
    shifted by the crop. 2D (chest X-rays, binary PNG masks as labels): ``warped.png``,
    ``warped_label.png`` and ``flow.nii.gz`` ``(H, W, 2)`` at the training ``size``. With
    ``fixed_label`` too, the Dice per label before and after; all of it in ``results.json``.

    Returns:
        ``{"warped", "flow", ["warped_label"], "folding_percent", "min_jacobian", ["dice_before", "dice_after"]}``.
    """
    from accord.runs import load_run

    run = load_run(cfg.checkpoint)
    train_cfg = run.config
    network = run.model.network.eval()
    convention = train_cfg.gemini.loss.warp_convention
    size = tuple(train_cfg.size)
    planar = train_cfg.gemini.network.spatial_dims == 2
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if planar:
        fixed, moving, affine = read_cxr(cfg.fixed, size), read_cxr(cfg.moving, size), np.eye(4)
    else:
        fixed, affine = _read_volume(cfg.fixed, train_cfg, size, normalise=True)
        moving, _ = _read_volume(cfg.moving, train_cfg, size, normalise=True)
    with torch.no_grad():
        flow = network.register(moving[None], fixed[None])
        warped = warp(moving[None], flow, convention=convention)[0, 0]
    result: dict[str, Any] = {**folding_stats(flow)}

    def save(name: str, array: np.ndarray) -> str:
        if name.endswith(".png"):
            payload = cv2.imencode(".png", array)[1].tobytes()
        else:
            payload = gzip.compress(nib.Nifti1Image(array, affine).to_bytes())
        return str(write_atomically(out / name, lambda handle: handle.write(payload)))

    def read_label(path: Path) -> torch.Tensor:
        return read_mask(path, size) if planar else _read_volume(path, train_cfg, size, normalise=False)[0]

    if planar:
        result["warped"] = save("warped.png", np.clip(np.rint(warped.numpy() * 255), 0, 255).astype(np.uint8))
    else:
        result["warped"] = save("warped.nii.gz", warped.numpy())
    result["flow"] = save("flow.nii.gz", flow[0].movedim(0, -1).numpy())
    if cfg.moving_label is not None:
        label = read_label(cfg.moving_label)
        with torch.no_grad():
            warped_label = warp(label[None], flow, mode="nearest", convention=convention)[0, 0]
        stored = warped_label.numpy().astype(np.uint8)
        result["warped_label"] = save("warped_label.png", stored * 255) if planar else save("warped_label.nii.gz", stored)
        if cfg.fixed_label is not None:
            fixed_label = read_label(cfg.fixed_label)
            result["dice_before"] = label_dice(label[0], fixed_label[0])
            result["dice_after"] = label_dice(warped_label, fixed_label[0])
    write_atomically(out / "results.json", lambda handle: handle.write(json.dumps(result, indent=2).encode()))
    return result



class GeminiSemisupConfig(VolumeRunConfig):
    """The ``semisup`` task: GEMINI-Semi, few labelled + many unlabelled images (:func:`gemini_semisup`):
    volumes of an MSD dataset (3D) or a chest X-ray folder with masks (2D)."""

    spacing: tuple[float, float, float] | None = Field(None, description="resample to this voxel size (mm); None: native")
    size: tuple[int, ...] = Field(
        (96, 96, 96), description="3D: every volume centre-cropped / zero-padded to this size; 2D: X-rays resized to (H, W)")
    labelled_cases: int = Field(2, ge=1, description="train cases whose labels are used (few-shot)")
    split: SplitOptions = SplitOptions()
    gemini: GeminiOptions = GeminiOptions(corruption=None)
    cxr: CxrTableOptions = Field(CxrTableOptions(), description="2D with data a CSV file: its path and group columns")
    trainer: TrainerConfig = Field(TrainerConfig(**GEMINI_TRAINER_DEFAULTS),
                                   description="as gemini_pretrain: the reference's Adam, two steps per iteration")

    @model_validator(mode="after")
    def _consistent(self) -> GeminiSemisupConfig:
        _check_gemini(self.size, self.gemini, self.trainer, allow_2d=True)
        return self


def _check_gemini(size: tuple[int, ...], gemini: GeminiOptions, trainer: TrainerConfig, allow_2d: bool = False) -> None:
    """``size`` matches ``spatial_dims`` (3, or 2 where ``allow_2d``) and, with two optimiser steps
    per iteration, the step counts are even."""
    dims = gemini.network.spatial_dims
    if len(size) != dims or (dims == 2 and not allow_2d):
        raise ValueError(f"gemini.network.spatial_dims is {dims} and size {size}: size needs one value per axis"
                         + ("" if allow_2d else "; this task reads volumes (3D)"))
    if gemini.loss.optimizer_steps == "two":
        for name in ("max_steps", "checkpoint_every", "validate_every"):
            value = getattr(trainer, name)
            if value is not None and value % 2:
                raise ValueError(
                    f"trainer.{name} is {value}: with gemini.loss.optimizer_steps 'two' a GEMINI iteration is two "
                    "trainer steps (correspondence, task), so it must be even")


def gemini_semisup_model(cfg: GeminiSemisupConfig) -> GeminiModel:
    """Model factory ``medssl.gemini_semisup`` (``cfg.gemini.network.out_channels`` = the structures,
    resolved by the task): softmax over classes in 3D, a sigmoid per structure in 2D (chest masks overlap)."""
    activation = "sigmoid" if cfg.gemini.network.spatial_dims == 2 else "softmax"
    return GeminiModel(cfg.gemini, task="segmentation", activation=activation)


def _split_labelled(cfg: GeminiSemisupConfig, items: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, labelled, test)``: the split of ``items`` and ``labelled_cases`` train cases drawn with the run seed."""
    from accord_medssl.finetune import split_cases

    splits = split_cases(items, cfg.split)
    train = splits["train"]
    if cfg.labelled_cases > len(train):
        raise ValueError(f"labelled_cases is {cfg.labelled_cases} but the split leaves {len(train)} train cases")
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.labelled_cases]
    return train, [train[i] for i in sorted(chosen.tolist())], splits["test"]


def _semisup_volumes(cfg: GeminiSemisupConfig) -> tuple[GeminiPairs, list[str], Any]:
    """3D: MSD volumes, one-hot labels over the dataset's classes."""
    from monai.networks import one_hot

    from accord_medssl.finetune import labelled_items

    require_valid(cfg.data)
    items, labels = labelled_items(cfg.data)
    train, labelled, test = _split_labelled(cfg, items)
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else cfg.run_dir / "cache"

    def volumes(chosen: list[dict[str, str]], keep_label: bool):
        chosen = chosen if keep_label else [{"image": item["image"]} for item in chosen]
        return build_dataset(chosen, cache=cfg.cache, cache_dir=cache_dir, spacing=cfg.spacing, hu_window=None,
                             seed=cfg.seed)

    resize = fixed_size(cfg.size)
    unlabelled, labelled_volumes, test_volumes = volumes(train, False), volumes(labelled, True), volumes(test, True)

    def image_of(case: dict) -> torch.Tensor:
        return resize(normalise_intensity(case["image"].as_tensor(), cfg.gemini.normalisation)).as_subclass(torch.Tensor)

    def masks_of(case: dict) -> torch.Tensor:
        label = resize(case["label"].as_tensor().long()).as_subclass(torch.Tensor)
        return one_hot(label[None], len(labels))[0].float()

    def labelled_sample() -> dict[str, torch.Tensor]:
        case = labelled_volumes[int(torch.randint(len(labelled_volumes), ()))]
        return {"labelled_image": image_of(case), "label": masks_of(case)}

    dataset = GeminiPairs(lambda index: image_of(unlabelled[index]), len(train), spatial_dims=3,
                          augment=cfg.gemini.augment, corruption=None, labelled=labelled_sample)
    names = [labels[index] for index in range(len(labels))]
    cases = ((image_of(test_volumes[i]), masks_of(test_volumes[i])) for i in range(len(test_volumes)))
    return dataset, names, cases


def _semisup_cxr(cfg: GeminiSemisupConfig) -> tuple[GeminiPairs, list[str], Any]:
    """2D: chest X-rays, one binary mask per structure; only images with every structure's mask are labelled."""
    _require_valid_cxr(cfg.data, cfg.cxr)
    items = cxr_items(cfg.data, cfg.cxr)
    names = sorted({name for item in items for name in item["masks"]})
    annotated = [item for item in items if names and sorted(item["masks"]) == names]
    if not annotated:
        raise ValueError(f"{cfg.data}: no image has a mask for every structure under masks/ (GEMINI-Semi needs labels)")
    _, labelled, test = _split_labelled(cfg, annotated)
    size = tuple(cfg.size)
    held_out = {item["image"] for item in test}
    pool = [item for item in items if item["image"] not in held_out]

    def masks_of(item: dict) -> torch.Tensor:
        return torch.cat([read_mask(item["masks"][name], size) for name in names])

    def labelled_sample() -> dict[str, torch.Tensor]:
        item = labelled[int(torch.randint(len(labelled), ()))]
        return {"labelled_image": read_cxr(item["image"], size), "label": masks_of(item)}

    dataset = GeminiPairs(lambda index: read_cxr(pool[index]["image"], size), len(pool),
                          groups=[item["group"] for item in pool], spatial_dims=2, augment=cfg.gemini.augment,
                          corruption=None, labelled=labelled_sample)
    cases = ((read_cxr(item["image"], size), masks_of(item)) for item in test)
    return dataset, ["background", *names], cases


def gemini_semisup(cfg: GeminiSemisupConfig) -> dict[str, Any]:
    """Train GEMINI-Semi, then score the test cases: Dice per structure.

    3D: an MSD dataset, softmax over its classes (argmax segmentation). 2D: a chest X-ray folder
    with ``masks/<structure>/``, a sigmoid per structure (thresholded at 0.5). The labelled cases
    split into train / validation / test as ``finetune`` splits them; ``labelled_cases`` train cases
    keep their labels, the other images (test ones excepted) form the unlabelled pool.

    Returns:
        The trainer's last record plus ``dice`` (mean over structures), ``dice_per_class``,
        ``labelled_cases`` and ``test_cases``; the scores also go to ``<run_dir>/results.json``.

    Raises:
        ValueError: an invalid dataset, too few cases, or label ids that are not 0..K-1.
    """
    planar = cfg.gemini.network.spatial_dims == 2
    dataset, names, test_cases = (_semisup_cxr if planar else _semisup_volumes)(cfg)
    channels = len(names) - 1 if planar else len(names)
    resolved = cfg.model_copy(update={"gemini": cfg.gemini.model_copy(
        update={"network": cfg.gemini.network.model_copy(update={"out_channels": channels})})})
    model = gemini_semisup_model(resolved)
    result = Trainer.for_run(resolved, model_factory="medssl.gemini_semisup").fit(model, dataset)

    structures = names[1:]
    per_class: dict[str, list[float]] = {name: [] for name in structures}
    network = model.network.eval()
    device = next(network.parameters()).device
    test_count = 0
    with torch.no_grad():
        for image, truth in test_cases:
            test_count += 1
            logits = network.task(image[None].to(device))[0].cpu()
            if planar:
                predicted, truth = logits.sigmoid() > 0.5, truth > 0.5
            else:
                classes = logits.argmax(0)
                predicted = torch.stack([classes == k for k in range(1, len(names))])
                truth = truth[1:] > 0.5
            for name, guess, actual in zip(structures, predicted, truth):
                if actual.any():  # a structure absent from a case's ground truth does not count for it
                    per_class[name].append(2 * float((guess & actual).sum()) / float(guess.sum() + actual.sum()))
    dice = {name: (sum(values) / len(values) if values else None) for name, values in per_class.items()}
    present = [value for value in dice.values() if value is not None]
    scores = {"dice": sum(present) / len(present) if present else None, "dice_per_class": dice,
              "labelled_cases": cfg.labelled_cases, "test_cases": test_count}
    write_atomically(cfg.run_dir / "results.json", lambda handle: handle.write(json.dumps(scores, indent=2).encode()))
    return {**result, **scores}
