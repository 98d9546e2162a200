"""CT preprocessing as MONAI dictionary transforms, and cached datasets built on it.

The deterministic part of the pipeline (decode, channel-first, reorient, optional resample, HU
window) is what a cache stores; random augmentation handed in as ``augment`` runs after it on
every access. The pipeline follows Alice's ``loader.py`` (window [-125, 225] HU to [0, 1], clipped)
with two deliberate differences: the canonical frame is RAS rather than Alice's ``"RAI"`` (one
documented frame for every method in this plugin), and resampling to a target spacing is
available (Alice has none; pass ``spacing=None`` to be faithful).

Random augmentation is reproducible from a seed: MONAI's random transforms draw from their own
NumPy generators, which a ``Compose`` seeds from OS entropy unless told otherwise, and a
``DataLoader`` worker works on a copy of the dataset, so unless reseeded every worker would repeat
the same stream and every epoch the first one. :func:`build_dataset` seeds them from ``seed`` and
reseeds them in each worker from that seed and the worker's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)
from monai.utils import MAX_SEED

__all__ = ["HU_WINDOW", "CacheMode", "preprocessing", "build_dataset"]

#: Alice's soft-tissue CT window in HU, mapped to [0, 1].
HU_WINDOW = (-125.0, 225.0)
CacheMode = Literal["disk", "memory", "none"]


def preprocessing(
    *,
    with_label: bool = True,
    spacing: Sequence[float] | None = None,
    axcodes: str = "RAS",
    hu_window: tuple[float, float] | None = HU_WINDOW,
) -> Compose:
    """The deterministic CT preprocessing of one ``{"image": path[, "label": path]}`` item.

    Output ``image``: float32 MetaTensor ``(1, X, Y, Z)`` in ``axcodes`` order, windowed to [0, 1];
    ``label``: uint8 MetaTensor ``(1, X, Y, Z)`` on the same grid. Both carry the current
    voxel-to-RAS ``affine`` (and so ``pixdim``) and the source ``filename_or_obj`` in their meta.

    Args:
        with_label: whether items have a ``"label"`` key.
        spacing: target voxel size in mm along the output axes; ``None`` keeps the native grid.
            Images are resampled bilinearly, labels with nearest neighbour.
        axcodes: target orientation; RAS is the plugin's canonical frame.
        hu_window: ``(low, high)`` HU mapped to [0, 1] with clipping; ``None`` leaves raw HU.
    """
    keys = ["image", "label"] if with_label else ["image"]
    transforms: list[MapTransform] = [
        LoadImaged(keys, image_only=True),
        # NIfTI is channel-last for multi-channel volumes and channel-less for 3D ones; MONAI
        # reads the header to tell which and always returns (C, X, Y, Z).
        EnsureChannelFirstd(keys),
        # Explicit labels: MONAI is changing the default to the MetaTensor's "space"; ours is RAS.
        Orientationd(keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing is not None:
        modes = ["bilinear", "nearest"][: len(keys)]
        transforms.append(Spacingd(keys, pixdim=tuple(spacing), mode=modes, dtype=np.float32))
    if hu_window is not None:
        low, high = hu_window
        transforms.append(ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    if with_label:
        # Label ids are small integers; uint8 makes cached volumes 4x smaller than float32.
        transforms.append(CastToTyped("label", dtype=torch.uint8))
    return Compose(transforms)


class _SeededCompose(Compose):
    """A ``Compose`` whose random transforms follow ``seed``, reseeded in each ``DataLoader`` worker.

    In the main process the transforms draw one stream from ``seed``. A worker process reseeds its
    copy on first use from ``seed`` and ``get_worker_info().seed``, which PyTorch derives from the
    loader's generator per worker and per epoch (the core trainer seeds that generator from the run
    seed, rank and epoch), so workers and epochs differ and a rerun repeats them.

    Args:
        transforms: the transforms, as for ``Compose``.
        seed: seed of the random transforms.
    """

    def __init__(self, transforms: Sequence[Callable], seed: int) -> None:
        super().__init__(transforms)
        self.seed = seed
        self._seeded_for_worker: int | None = None
        self.set_random_state(seed=seed)

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        """``Compose.__call__``, after reseeding if this is the first call in a new worker."""
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.seed != self._seeded_for_worker:
            self._seeded_for_worker = worker.seed
            mixed = np.random.SeedSequence([self.seed % MAX_SEED, worker.seed]).generate_state(1)[0]
            self.set_random_state(seed=int(mixed))
        return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)


def build_dataset(
    items: Sequence[dict[str, str]],
    cache: CacheMode = "disk",
    cache_dir: str | Path | None = None,
    spacing: Sequence[float] | None = None,
    *,
    axcodes: str = "RAS",
    hu_window: tuple[float, float] | None = HU_WINDOW,
    augment: Sequence[Callable] = (),
    seed: int = 0,
    num_workers: int = 0,
) -> Dataset:
    """A MONAI dataset over ``items`` that decodes each NIfTI only once when cached.

    Args:
        items: data list from :func:`~accord_medssl.data.layout.decathlon_items` or
            :func:`~accord_medssl.data.layout.nifti_folder_items`; either all items have a
            ``"label"`` or none does.
        cache: ``"disk"`` (MONAI PersistentDataset: preprocessed volumes pickled in ``cache_dir``,
            reused across epochs, processes and runs), ``"memory"`` (MONAI CacheDataset: all
            volumes preprocessed up front and held in RAM), or ``"none"`` (decode on every access).
        cache_dir: directory for ``cache="disk"``; created if missing. The file name of an entry
            hashes the item's paths *and* the preprocessing settings, so changing ``spacing`` or the
            window never serves stale volumes; replacing a source file under the same path does
            (clear the directory then).
        spacing: target voxel size in mm, or ``None`` for the native grid (:func:`preprocessing`).
        axcodes: target orientation (:func:`preprocessing`).
        hu_window: HU range mapped to [0, 1], or ``None`` (:func:`preprocessing`).
        augment: transforms applied after :func:`preprocessing` (crops, augmentation). MONAI caches
            everything up to the first random transform, so random ones run on every access.
        seed: seed of the random ``augment`` transforms (pass the run seed); ``DataLoader`` workers
            reseed from it and their worker seed. The generators' states are not part of a trainer
            checkpoint, so a resumed run draws other augmentations than an uninterrupted one.
        num_workers: threads that fill a memory cache.

    Returns:
        A ``torch.utils.data.Dataset`` of dicts with ``image`` ``(1, X, Y, Z)`` float32 and, when
        labelled, ``label`` ``(1, X, Y, Z)`` uint8 MetaTensors.

    Raises:
        ValueError: unknown ``cache``, ``cache="disk"`` without ``cache_dir``, or items that mix
            labelled and unlabelled entries.
    """
    labelled = {"label" in item for item in items}
    if len(labelled) > 1:
        raise ValueError("items mix labelled and unlabelled entries; build one dataset per kind")
    steps = preprocessing(with_label=labelled == {True}, spacing=spacing, axcodes=axcodes, hu_window=hu_window)
    # One flat Compose: MONAI caches the leading non-random transforms of the top level only, and a
    # nested Compose counts as random, which would silently disable the cache.
    transform = _SeededCompose([*steps.transforms, *augment], seed)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError('cache="disk" needs cache_dir')
        # track_meta keeps the MetaTensor affine in the cache. Loading it back needs full unpickling:
        # with weights_only=True MONAI takes the file for corrupt and silently recomputes it, i.e.
        # no cache at all. Only point cache_dir at a directory you trust (it holds pickles).
        return PersistentDataset(
            items, transform, cache_dir=cache_dir, hash_transform=pickle_hashing, track_meta=True, weights_only=False
        )
    if cache == "memory":
        return CacheDataset(items, transform, num_workers=num_workers, progress=False)
    if cache == "none":
        return Dataset(items, transform)
    raise ValueError(f"cache must be 'disk', 'memory' or 'none', got {cache!r}")
