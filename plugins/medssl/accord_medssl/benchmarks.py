"""Speed of the medssl pipeline: data-loader throughput (uncached vs MONAI's disk cache) and
pretraining steps per second with peak memory."""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from accord_medssl.data.layout import decathlon_items
from accord_medssl.data.phantom import DEFAULT_SHAPE, synth
from accord_medssl.data.pipeline import build_dataset

__all__ = ["loader_throughput", "pretraining_speed"]


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


def pretraining_speed(
    method: Literal["alice", "anatomy_embedding"] = "alice",
    *,
    crop_size: int = 64,
    batch_size: int = 2,
    steps: int = 6,
    warmup_steps: int = 2,
    options: dict[str, Any] | None = None,
    num_cases: int = 4,
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> dict[str, float]:
    """Optimizer steps per second and peak memory of ``pretrain`` on synthesised phantoms.

    Each step is a full trainer step: view cutting (and, for Alice, anatomy matching against cached
    embeddings), forward, backward, optimizer and EMA update. The first ``warmup_steps`` are not
    timed (one-off kernel selection, and the first embedding of each volume for Alice). Alice mines
    with an anatomy-embedding network trained for one step first (untimed).

    Args:
        method: the pretraining stage to time.
        crop_size: edge of the cubic views (Alice: a multiple of 32).
        batch_size: view pairs per step.
        steps: steps to run, timed ones included.
        warmup_steps: leading steps left out of the rate.
        options: the method's options section (``alice`` / ``anatomy_embedding``); None: the
            defaults, i.e. the reference sizes (SwinUNETR feature size 48, 512 prototypes).
        num_cases: phantoms of 96 x 96 x 64 voxels to cut the views from.
        device: the trainer's device.

    Returns:
        ``steps_per_s`` and ``seconds_per_step`` (timed steps), ``peak_memory_mb``: on CUDA the
        peak allocated by torch, on the CPU the peak resident size of the whole process (run it in
        a fresh process), ``device``.
    """
    from accord.config import TrainerConfig
    from accord.training.progress import read_metrics
    from accord_medssl.tasks import PretrainConfig, pretrain

    if steps <= warmup_steps:
        raise ValueError(f"steps ({steps}) must exceed warmup_steps ({warmup_steps})")
    crop = (crop_size,) * 3
    trainer = TrainerConfig(max_steps=steps, batch_size=batch_size, checkpoint_every=steps, log_every=1, device=device)
    with tempfile.TemporaryDirectory(prefix="medssl-speed-") as scratch:
        scratch_dir = Path(scratch)
        data = synth(scratch_dir / "data", num_train=num_cases, num_test=0)
        shared = {"plugin": "medssl", "task": "pretrain", "data": data, "cache_dir": scratch_dir / "cache", "crop_size": crop}
        timed = {"method": method, "run_dir": scratch_dir / method, "trainer": trainer, method: options or {}}
        if method == "alice":
            anatomy = pretrain(PretrainConfig(**shared, method="anatomy_embedding", run_dir=scratch_dir / "anatomy",
                                              trainer=trainer.model_copy(update={"max_steps": 1, "checkpoint_every": 1})))
            timed["mining"] = {"anatomy_checkpoint": anatomy["checkpoint"]}
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        pretrain(PretrainConfig(**shared, **timed))
        records = read_metrics(scratch_dir / method / "metrics.jsonl")[warmup_steps:]
    seconds = sum(batch_size / record["samples_per_s"] for record in records)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        # ru_maxrss is in KiB on Linux.
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "steps_per_s": len(records) / seconds,
        "seconds_per_step": seconds / len(records),
        "peak_memory_mb": peak_mb,
        "device": "cuda" if cuda else "cpu",
    }
