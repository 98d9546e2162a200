"""What the medssl tasks train on: cached volumes of a dataset and the crops cut from them.

Every task reads volumes through the data layer's MONAI pipeline
(:func:`accord_medssl.data.build_dataset`: decode, RAS, optional resampling, HU window, disk or
memory cache); :class:`VolumeRunConfig` holds those options for every task config. The two
pretraining methods then cut their views from the cached volumes on every access:

- :class:`AnatomyViewPairs` (``method: anatomy_embedding``): two augmented, overlapping crops of one
  volume with each crop's voxel-to-volume affine, as
  :class:`~accord_medssl.anatomy.AnatomyEmbeddingPretraining` expects;
- :class:`AliceViewPairs` (``method: alice``): a query crop around a random foreground voxel of
  volume A and the anchor crop of *another* volume B centred where the anatomy-embedding miner
  matches it (:class:`~accord_medssl.anatomy.AnatomicalViewMiner`).

All randomness (crop centres, scales, the anchor volume, the query points) is drawn from the torch
global RNG, which the core trainer seeds and stores in its checkpoints, so a resumed run cuts the
same crops as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset

from accord.config import ExistingPath, RunConfig, StrictModel
from accord_medssl.anatomy import (
    AnatomicalViewMiner,
    Embedder,
    file_embedder,
    model_embedder,
    sample_view_pairs,
    store_embedder,
)
from accord_medssl.data import build_dataset, decathlon_items, nifti_folder_items
from accord_medssl.data.layout import DATASET_JSON, NIFTI_SUFFIXES, is_msd_root
from accord_medssl.data.pipeline import CacheMode

__all__ = [
    "AliceViewPairs",
    "AnatomyViewOptions",
    "AnatomyViewPairs",
    "MiningOptions",
    "VolumeRunConfig",
    "build_miner",
    "pretraining_items",
    "volume_key",
]


class VolumeRunConfig(RunConfig):
    """Fields of every medssl task config that reads volumes: the dataset and its cache."""

    data: ExistingPath = Field(description="an MSD dataset (dataset.json) or a folder of NIfTI CTs")
    cache: CacheMode = Field("disk", description="preprocessed-volume cache: disk, memory or none")
    cache_dir: Path | None = Field(
        None, description="directory of the disk cache (safetensors, never executed; an entry is rebuilt when its "
                          "source file changes); None: <run_dir>/cache"
    )

    def volumes(
        self,
        items: Sequence[dict[str, str]],
        spacing: Sequence[float] | None,
        augment: Sequence[Callable] = (),
    ) -> Dataset:
        """The data layer's cached dataset over ``items`` resampled to ``spacing`` (None: native grid),
        with ``augment`` run after the cache and seeded from the run ``seed``."""
        cache_dir = self.cache_dir if self.cache_dir is not None else self.run_dir / "cache"
        return build_dataset(items, cache=self.cache, cache_dir=cache_dir, spacing=spacing, augment=augment,
                             seed=self.seed)


def pretraining_items(root: str | Path) -> list[dict[str, str]]:
    """The unlabelled images to pretrain on: ``[{"image": path}]``.

    An MSD dataset contributes its training and test images (labels unused); a plain folder every
    NIfTI under it.
    """
    root = Path(root)
    if not is_msd_root(root):
        return nifti_folder_items(root)
    items = [{"image": item["image"]} for item in decathlon_items(root)]
    if json.loads((root / DATASET_JSON).read_text()).get("test"):
        items += decathlon_items(root, split="test")
    return items


def volume_key(image_path: str | Path, root: str | Path) -> str:
    """A volume's name: its path relative to the dataset root without the NIfTI suffix.

    Unique within a dataset even where every case is ``<case>/ct.nii.gz`` (AbdomenAtlas), and the
    name under which precomputed embeddings are looked up (``<key>_global.npy``).
    """
    relative = os.path.relpath(Path(image_path).absolute(), Path(root).absolute())
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if relative.endswith(suffix):
            return relative[: -len(suffix)]
    return relative


def _image(volumes: Dataset, index: int) -> torch.Tensor:
    """Volume ``index`` as a plain ``(1, X, Y, Z)`` tensor (crops need no MetaTensor bookkeeping)."""
    return volumes[index]["image"].as_subclass(torch.Tensor)


class AnatomyViewOptions(StrictModel):
    """Augmentation of the two crops of ``method: anatomy_embedding`` (:func:`sample_view_pairs`)."""

    scale_range: tuple[float, float] = Field((0.8, 1.25), description="box-to-crop size ratio, isotropic")
    max_shift: float = Field(0.25, ge=0.0, description="largest offset between the crops' centres, in crop sizes")
    intensity_jitter: float = Field(0.1, ge=0.0, description="largest relative gain change and absolute offset")


class AnatomyViewPairs(Dataset):
    """Two augmented, overlapping crops of one volume per sample, with their crop geometry.

    Args:
        volumes: the data layer's dataset of ``{"image": (1, X, Y, Z)}`` volumes.
        crop_size: ``(d, h, w)`` of each crop.
        options: augmentation ranges.

    Returns (per sample):
        ``view_a``, ``view_b``: ``(1, d, h, w)`` float32; ``affine_a``, ``affine_b``: ``(4, 4)``
        float64 maps from crop voxel indices to volume voxel indices.
    """

    def __init__(self, volumes: Dataset, crop_size: Sequence[int], options: AnatomyViewOptions) -> None:
        self.volumes = volumes
        self.crop_size = tuple(crop_size)
        self.options = options

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = sample_view_pairs([_image(self.volumes, index)], self.crop_size, **self.options.model_dump())
        return {key: value[0] for key, value in pair.items()}


class MiningOptions(StrictModel):
    """Where Alice's anatomical embeddings come from and how crop pairs are matched (medssl §1.3)."""

    anatomy_checkpoint: Path | None = Field(
        None, description="checkpoint of a method: anatomy_embedding run; its model embeds each volume once"
    )
    embeddings: Path | None = Field(
        None,
        description="folder of precomputed maps instead: <volume key>_global<suffix> and <volume key>_local<suffix>, "
        "(C, *grid) over the preprocessed volume, or with suffix .anat one embedding store file <volume key>.anat "
        "per volume (it records its own strides); the key is the image path relative to data, without .nii[.gz]",
    )
    embedding_suffix: Literal[".npy", ".nii", ".nii.gz", ".anat"] = ".npy"
    store: Path | None = Field(
        None,
        description="embedding store folder: each volume's embedding is prepared (normalised, float16) once, written "
        "to <store>/<volume key>.anat and memory-mapped from then on, so memory and per-sample cost do not grow with "
        "the dataset; None: prepared embeddings stay in memory (embedding_cache_size volumes)",
    )
    scoring: Literal["reference", "nearest"] = Field(
        "reference",
        description="reference: the global map trilinearly upsampled to the local grid and re-normalised, as the "
        "reference's find_point_in_vol; nearest: each local cell takes its enclosing global cell (stricter)",
    )
    global_stride: int = Field(8, ge=1, description="voxels per cell of the precomputed global maps")
    local_stride: int = Field(2, ge=1, description="voxels per cell of the precomputed local maps (SAM: 2)")
    similarity_threshold: float = Field(0.7, ge=-1.0, lt=1.0, description="accept a pair above this cosine")
    max_attempts: int = Field(100, ge=1, description="query points tried per sample before keeping the best")
    candidates_per_round: int = Field(
        10, ge=1, description="most query points matched in one vectorised search (rounds grow 1, 2, 4, ...)"
    )
    foreground_threshold: float = Field(0.0, description="query points lie above this windowed intensity")
    embedding_cache_size: int = Field(16, ge=1, description="volumes whose embeddings stay in memory")


def _checkpoint_embedder(checkpoint: Path) -> Embedder:
    """The embedder of an ``anatomy_embedding`` run's checkpoint, rebuilt from the checkpoint alone.

    Raises:
        ValueError: a checkpoint of another run or one that does not record its run.
    """
    from accord.runs import load_run

    from accord_medssl.weights import run_description

    run = load_run(checkpoint)
    if getattr(run.config, "method", None) != "anatomy_embedding":
        raise ValueError(f"{checkpoint}: written by {run_description(run.record)}, expected a medssl.pretrain run of "
                         "method 'anatomy_embedding'")
    return model_embedder(run.model.model)


def build_miner(options: MiningOptions, crop_size: Sequence[int]) -> AnatomicalViewMiner:
    """The view miner with the embedding source ``options`` names.

    Raises:
        ValueError: not exactly one embedding source, or one that does not exist (the message
            names the key).
    """
    if (options.anatomy_checkpoint is None) == (options.embeddings is None):
        raise ValueError("mining: set exactly one of anatomy_checkpoint and embeddings")
    for name in ("anatomy_checkpoint", "embeddings"):
        path = getattr(options, name)
        if path is not None and not path.exists():
            raise ValueError(f"mining.{name}: path does not exist: {path}")
    if options.anatomy_checkpoint is not None:
        embedder = _checkpoint_embedder(options.anatomy_checkpoint)
    elif options.embedding_suffix == ".anat":
        embedder = store_embedder(options.embeddings)
    else:
        embedder = file_embedder(options.embeddings, options.global_stride, options.local_stride, options.embedding_suffix)
    if options.store is not None:
        embedder = store_embedder(options.store, fallback=embedder)
    return AnatomicalViewMiner(
        embedder,
        crop_size=tuple(crop_size),
        similarity_threshold=options.similarity_threshold,
        max_attempts=options.max_attempts,
        candidates_per_round=options.candidates_per_round,
        foreground_threshold=options.foreground_threshold,
        cache_size=options.embedding_cache_size,
        scoring=options.scoring,
    )


class AliceViewPairs(Dataset):
    """Alice's anatomy-matched crop pairs: sample ``i`` queries volume ``i`` against another volume.

    The anchor volume is drawn uniformly among the *other* volumes (the reference pairs each CT with
    the previous iteration's, medssl §1.3; any other volume is the same idea without tying the
    pairs to the batch order).

    Args:
        volumes: the data layer's dataset of ``{"image": (1, X, Y, Z)}`` volumes, at least two.
        keys: one name per volume (:func:`volume_key`); the miner caches embeddings by it.
        miner: matches the query point and cuts both crops.

    Returns (per sample):
        ``query``, ``anchor``: ``(1, d, h, w)`` crops; ``query_points``, ``anchor_points``: ``(3,)``
        crop centres; ``query_boxes``, ``anchor_boxes``: ``(2, 3)``; ``scores``: ``()`` cosine of the
        pair; ``accepted``: ``()`` bool, whether it passed the threshold; ``attempts``: ``()``.

    Raises:
        ValueError: fewer than two volumes, or ``keys`` of another length.
    """

    def __init__(self, volumes: Dataset, keys: Sequence[str], miner: AnatomicalViewMiner) -> None:
        if len(volumes) < 2:
            raise ValueError(f"alice pairs crops of two different volumes; the dataset has {len(volumes)}")
        if len(keys) != len(volumes):
            raise ValueError(f"keys: expected one per volume ({len(volumes)}), got {len(keys)}")
        self.volumes = volumes
        self.keys = list(keys)
        self.miner = miner

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        other = int(torch.randint(len(self) - 1, ()))
        other += other >= index  # skip the query volume itself
        mined = self.miner.mine(
            [_image(self.volumes, index)], [_image(self.volumes, other)], [self.keys[index]], [self.keys[other]]
        )
        return {key: value[0] for key, value in mined.as_batch().items()}
