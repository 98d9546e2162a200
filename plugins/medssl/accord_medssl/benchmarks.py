"""Data-loader throughput: decoding NIfTI every epoch versus reading MONAI's disk cache."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from accord_medssl.data.layout import decathlon_items
from accord_medssl.data.phantom import DEFAULT_SHAPE, synth
from accord_medssl.data.pipeline import build_dataset

__all__ = ["loader_throughput"]


def _epoch_seconds(dataset: Dataset, num_workers: int) -> float:
    """Wall time of one full pass over ``dataset`` (batch 1, as the medssl methods train)."""
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def loader_throughput(
    root: str | Path | None = None,
    *,
    spacing: Sequence[float] | None = None,
    num_workers: int = 0,
    num_cases: int = 8,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
) -> dict[str, float]:
    """Volumes per second through the preprocessing pipeline: uncached, disk-cache cold and warm.

    Three passes over the training split: plain decoding (what every epoch costs without a cache),
    the first pass of a fresh disk cache (decode + preprocess + write), and its second pass (read
    the preprocessed tensors back).

    Args:
        root: an MSD dataset; ``None`` synthesises ``num_cases`` phantoms of ``shape`` in a
            temporary directory.
        spacing: target spacing handed to the pipeline (``None``: native grid).
        num_workers: DataLoader worker processes.
        num_cases: phantoms to synthesise when ``root`` is None.
        shape: phantom shape when ``root`` is None.

    Returns:
        ``volumes``, ``uncached_volumes_per_s``, ``cold_volumes_per_s``,
        ``cached_volumes_per_s``, ``cache_speedup`` (cached over uncached) and ``cache_mb``.
    """
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as scratch:
        scratch_dir = Path(scratch)
        if root is None:
            root = synth(scratch_dir / "data", num_train=num_cases, num_test=0, shape=shape)
        items = decathlon_items(root)
        cache_dir = scratch_dir / "cache"
        uncached_dataset = build_dataset(items, cache="none", spacing=spacing)
        # One untimed read, so lazy imports and first-call set-up do not count against a pass.
        uncached_dataset[0]
        uncached = _epoch_seconds(uncached_dataset, num_workers)
        disk = build_dataset(items, cache="disk", cache_dir=cache_dir, spacing=spacing)
        cold = _epoch_seconds(disk, num_workers)
        cached = _epoch_seconds(disk, num_workers)
        cache_bytes = sum(path.stat().st_size for path in cache_dir.iterdir())
    volumes = len(items)
    return {
        "volumes": volumes,
        "uncached_volumes_per_s": volumes / uncached,
        "cold_volumes_per_s": volumes / cold,
        "cached_volumes_per_s": volumes / cached,
        "cache_speedup": uncached / cached,
        "cache_mb": cache_bytes / 2**20,
    }
