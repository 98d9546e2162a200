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

The disk cache stores safetensors files (tensors and string metadata, nothing executable), so a
file planted in a shared cache directory cannot run code; an entry is reused only while its
source files keep their size, modification and change times, so a replaced NIfTI is read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import monai
import numpy as np
import safetensors.torch
import torch
from monai.data import CacheDataset, Dataset, MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    apply_transform,
)
from monai.utils import MAX_SEED
from safetensors import SafetensorError, safe_open

__all__ = ["HU_WINDOW", "CacheMode", "preprocessing", "build_dataset"]

#: Alice's soft-tissue CT window in HU, mapped to [0, 1].
HU_WINDOW = (-125.0, 225.0)
CacheMode = Literal["disk", "memory", "none"]
#: Layout of a disk-cache entry; part of every entry's identity, so changing it rebuilds the cache.
_CACHE_FORMAT = 1

log = logging.getLogger(__name__)


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
    keys = _volume_keys(with_label)
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


def _volume_keys(with_label: bool) -> list[str]:
    """The item keys :func:`preprocessing` loads."""
    return ["image", "label"] if with_label else ["image"]


class _SeededCompose(Compose):
    """A ``Compose`` whose random transforms follow the run's random streams, in the main process and in workers.

    In the main process each call reseeds the transforms from the global NumPy RNG, which the
    trainer seeds from the run seed and saves in every checkpoint: a rerun repeats the crops, and a
    resumed run continues them exactly where the killed one stopped (a stream of the transforms' own
    would restart from its seed). A worker process reseeds its copy on first use from ``seed`` and
    ``get_worker_info().seed``, which PyTorch derives from the loader's generator per worker and per
    epoch (the core trainer seeds that generator from the run seed, rank and epoch), so workers and
    epochs differ and a rerun repeats them.

    Args:
        transforms: the transforms, as for ``Compose``.
        seed: seed of the random transforms in ``DataLoader`` workers.
    """

    def __init__(self, transforms: Sequence[Callable], seed: int) -> None:
        super().__init__(transforms)
        self.seed = seed
        self._seeded_for_worker: int | None = None

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        """``Compose.__call__``, after reseeding (every call in the main process, once per worker)."""
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            self.set_random_state(seed=int(np.random.randint(MAX_SEED)))
        elif worker.seed != self._seeded_for_worker:
            self._seeded_for_worker = worker.seed
            mixed = np.random.SeedSequence([self.seed % MAX_SEED, worker.seed]).generate_state(1)[0]
            self.set_random_state(seed=int(mixed))
        return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)


def _source_fingerprint(path: str) -> list[int]:
    """Size, modification and change time of ``path`` (ns): a new value means new content.

    The change time also moves when a file is replaced by a copy that kept the old modification
    time (``cp -p``, ``rsync -a``); hashing the content would cost a full read on every access.
    """
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class _DiskCache(Dataset):
    """``preprocess`` outputs kept as one safetensors file per item in ``cache_dir``; ``augment`` runs on every access.

    An entry's file name hashes the item's resolved paths and the preprocessing ``settings``; the
    entry also stores the sources' fingerprints and is used only while they are unchanged, so an
    edited or replaced source overwrites its entry instead of leaving stale ones behind. safetensors
    files hold tensors and string metadata only: a file that is not a valid entry (corrupt, or
    planted) cannot run code when read, and is logged and rebuilt. Each volume keeps the
    metadata training reads: its affine (and so its spacing), original ``spatial_shape`` and
    ``filename_or_obj``.

    Args:
        items: ``{"image": path[, "label": path]}`` dicts; other keys pass through unchanged.
        keys: the item keys ``preprocess`` loads.
        preprocess: the deterministic transforms whose output is cached.
        augment: the transforms run after the cache.
        cache_dir: where entries live; created if missing.
        settings: JSON-serialisable preprocessing options; a change gives new entries.
    """

    def __init__(self, items: Sequence[dict[str, str]], keys: Sequence[str], preprocess: Compose, augment: Compose,
                 cache_dir: Path, settings: dict[str, Any]) -> None:
        super().__init__(items, augment)
        self.keys = tuple(keys)
        self.preprocess = preprocess
        self.cache_dir = cache_dir
        self.settings = settings
        cache_dir.mkdir(parents=True, exist_ok=True)

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        return apply_transform(self.transform, {**item, **self._volumes(item)})

    def _volumes(self, item: dict[str, str]) -> dict[str, MetaTensor]:
        """The preprocessed volumes of ``item``, from its entry when that is current, else built and stored."""
        # MONAI's version too: a release may change how its transforms resample or reorient.
        identity = json.dumps({"format": _CACHE_FORMAT, "monai": monai.__version__, "settings": self.settings,
                               "files": {key: str(Path(item[key]).resolve()) for key in self.keys}}, sort_keys=True)
        sources = json.dumps({key: _source_fingerprint(item[key]) for key in self.keys}, sort_keys=True)
        path = self.cache_dir / f"{hashlib.sha256(identity.encode()).hexdigest()}.safetensors"
        if path.exists():
            cached = self._read(path, identity, sources)
            if cached is not None:
                return cached
        log.info("caching %s in %s", item[self.keys[0]], self.cache_dir)
        built = self.preprocess({key: item[key] for key in self.keys})
        tensors = {}
        for key in self.keys:
            volume = built[key]
            tensors[key] = volume.as_tensor().contiguous()
            tensors[f"{key}.affine"] = volume.affine.contiguous()
            tensors[f"{key}.spatial_shape"] = torch.as_tensor(np.asarray(volume.meta["spatial_shape"], dtype=np.int64))
        filenames = json.dumps({key: str(built[key].meta["filename_or_obj"]) for key in self.keys})
        self._write(path, tensors, {"identity": identity, "sources": sources, "filenames": filenames})
        # The reduced form also on a miss, so that fresh and cached items collate alike.
        return self._as_volumes(tensors, filenames)

    def _read(self, path: Path, identity: str, sources: str) -> dict[str, MetaTensor] | None:
        """The entry's volumes, or ``None`` when it is stale or not a valid entry (logged)."""
        try:
            with safe_open(path, framework="pt") as entry:
                metadata = entry.metadata() or {}
                if metadata.get("identity") != identity or metadata.get("sources") != sources:
                    log.info("%s: its source files changed since they were cached; preprocessing them again", path)
                    return None
                tensors = {name: entry.get_tensor(name) for name in entry.keys()}
            return self._as_volumes(tensors, metadata["filenames"])
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: not a valid disk-cache entry (%s: %s); rebuilding it", path, type(exc).__name__, exc)
            return None

    def _as_volumes(self, tensors: dict[str, torch.Tensor], filenames: str) -> dict[str, MetaTensor]:
        names = json.loads(filenames)
        return {
            key: MetaTensor(tensors[key], affine=tensors[f"{key}.affine"],
                            meta={"filename_or_obj": names[key],
                                  "spatial_shape": tensors[f"{key}.spatial_shape"].numpy()})
            for key in self.keys
        }

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Write the entry under a temporary name and rename it: readers (other workers, runs) see
        the old entry or the whole new one, never part of it."""
        payload = safetensors.torch.save(tensors, metadata)
        handle, temp = tempfile.mkstemp(dir=self.cache_dir, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(payload)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


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
        cache: ``"disk"`` (preprocessed volumes stored as safetensors files in ``cache_dir``,
            reused across epochs, processes and runs), ``"memory"`` (MONAI CacheDataset: all
            volumes preprocessed up front and held in RAM), or ``"none"`` (decode on every access).
        cache_dir: directory for ``cache="disk"``; created if missing. The file name of an entry
            hashes the item's paths *and* the preprocessing settings, so changing ``spacing`` or the
            window never serves stale volumes, and an entry is rebuilt when a source file's size,
            modification or change time differs. Entries cannot run code when read (an invalid one
            is logged and rebuilt), but whoever can write there can still change the volumes.
        spacing: target voxel size in mm, or ``None`` for the native grid (:func:`preprocessing`).
        axcodes: target orientation (:func:`preprocessing`).
        hu_window: HU range mapped to [0, 1], or ``None`` (:func:`preprocessing`).
        augment: transforms applied after :func:`preprocessing` (crops, augmentation) on every
            access; the memory cache also keeps those before the first random one.
        seed: seed of the random ``augment`` transforms (pass the run seed); ``DataLoader`` workers
            reseed from it and their worker seed. The generators' states are not part of a trainer
            checkpoint, so a resumed run draws other augmentations than an uninterrupted one.
        num_workers: threads that fill a memory cache.

    Returns:
        A ``torch.utils.data.Dataset`` of dicts with ``image`` ``(1, X, Y, Z)`` float32 and, when
        labelled, ``label`` ``(1, X, Y, Z)`` uint8 MetaTensors. From the disk cache their meta holds
        only ``affine``, ``spatial_shape`` and ``filename_or_obj``.

    Raises:
        ValueError: unknown ``cache``, ``cache="disk"`` without ``cache_dir``, or items that mix
            labelled and unlabelled entries.
    """
    labelled = {"label" in item for item in items}
    if len(labelled) > 1:
        raise ValueError("items mix labelled and unlabelled entries; build one dataset per kind")
    with_label = labelled == {True}
    steps = preprocessing(with_label=with_label, spacing=spacing, axcodes=axcodes, hu_window=hu_window)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError('cache="disk" needs cache_dir')
        settings = {"with_label": with_label, "axcodes": axcodes,
                    "spacing": None if spacing is None else [float(size) for size in spacing],
                    "hu_window": None if hu_window is None else [float(bound) for bound in hu_window]}
        return _DiskCache(items, _volume_keys(with_label), steps, _SeededCompose(list(augment), seed),
                          Path(cache_dir), settings)
    # One flat Compose: MONAI caches the leading non-random transforms of the top level only, and a
    # nested Compose counts as random, which would silently disable the cache.
    transform = _SeededCompose([*steps.transforms, *augment], seed)
    if cache == "memory":
        return CacheDataset(items, transform, num_workers=num_workers, progress=False)
    if cache == "none":
        return Dataset(items, transform)
    raise ValueError(f"cache must be 'disk', 'memory' or 'none', got {cache!r}")
