"""Throughput and memory of SuperFlow pretraining and of its data-side hot spots.

* :func:`benchmark_pretraining`: optimizer steps per second and peak memory of the full model
  (3 frames + dense cloud through MinkUNet, all images through the teacher, three losses) on a fixed
  collated batch, plus the time to build one sample (loading, pairing, augmentation);
* :func:`benchmark_voxelization`: cylindrical voxelisation, points per second;
* :func:`benchmark_pairing`: the LiDAR -> camera projection chain, points per second.

All return plain dicts of numbers. Without a dataset root a synthetic nuScenes is generated.
:func:`throughput` runs the three as the speed benchmark ``throughput`` (``accord benchmark
superflow --speed throughput``).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from accord.benchmarking import BenchmarkResult, preset
from accord.config import BenchmarkConfig
from accord_superflow.downstream_benchmark import QUICK
from accord_superflow.losses import SuperFlowLossConfig
from accord_superflow.models.voxelize import cylindrical_voxelize
from accord_superflow.pretrain import (
    PretrainDataConfig,
    SuperFlowModelConfig,
    SuperFlowPretrainDataset,
    build_superflow,
    collate_pretrain,
    load_lidar_points,
)

__all__ = ["ThroughputConfig", "benchmark_pretraining", "benchmark_voxelization", "benchmark_pairing", "run_benchmarks",
           "throughput"]


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_root(root: str | Path | None, work_dir: Path) -> Path:
    if root is not None:
        return Path(root)
    from accord_superflow.data import synth_nuscenes

    # 1084 columns x 32 beams: the nuScenes HDL-32E scan density.
    return synth_nuscenes(work_dir / "nuscenes", scene_names=("scene-0061",), keyframes_per_scene=3,
                          lidar_azimuth_steps=1084)


def _peak_host_memory_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark_pretraining(root: str | Path | None = None, *, version: str = "v1.0-mini", split: str = "mini_train",
                          batch_size: int = 2, steps: int = 5, warmup_steps: int = 1,
                          image_size: tuple[int, int] = (224, 448),
                          model: SuperFlowModelConfig = SuperFlowModelConfig(),
                          device: str = "auto") -> dict[str, Any]:
    """Time full SuperFlow optimizer steps on one collated batch.

    Args:
        root: nuScenes root; ``None`` generates a one-scene synthetic dataset.
        version: table directory.
        split: split to draw keyframes from.
        batch_size: samples per step (each: 3 frames + a dense cloud, ``3 x 3`` images).
        steps: timed optimizer steps.
        warmup_steps: untimed steps first (allocator and kernel warm-up).
        image_size: teacher input ``(height, width)``.
        model: networks (default: MinkUNet-34 and a small random ViT; set ``teacher.weights`` or
            ViT-B-sized ``random_*`` for the real teacher cost).
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        ``iterations_per_s``, ``samples_per_s``, ``seconds_per_iteration``, ``peak_memory_mb``
        (CUDA peak allocated on a GPU, process peak RSS on the CPU), ``sample_build_s`` (mean time to
        build one sample), ``points_per_batch``, ``pairs_per_batch``, ``images_per_batch``,
        ``parameters_3d`` and the final ``loss``.
    """
    target = _device(device)
    with tempfile.TemporaryDirectory() as work_dir:
        data_root = _default_root(root, Path(work_dir))
        options = PretrainDataConfig(root=data_root, version=version, split=split, image_size=image_size,
                                     cache_dir=Path(work_dir) / "index")
        dataset = SuperFlowPretrainDataset(options)
        torch.manual_seed(0)
        started = time.perf_counter()
        samples = [dataset[i % len(dataset)] for i in range(batch_size)]
        sample_build_s = (time.perf_counter() - started) / batch_size
        batch = {name: value.to(target) for name, value in collate_pretrain(samples).items()}
        network = build_superflow(model, SuperFlowLossConfig(), dataset.groups_per_sample).to(target)
    network.train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-3)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = network(batch)["loss"]
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for _ in range(warmup_steps):
        step()
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    _synchronize(target)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _synchronize(target)
    elapsed = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(target) / 2**20 if target.type == "cuda" else _peak_host_memory_mb())
    return {
        "device": str(target),
        "batch_size": batch_size,
        "iterations_per_s": steps / elapsed,
        "samples_per_s": steps * batch_size / elapsed,
        "seconds_per_iteration": elapsed / steps,
        "peak_memory_mb": peak,
        "sample_build_s": sample_build_s,
        "points_per_batch": int(batch["points"].shape[0]),
        "pairs_per_batch": int(batch["pair_point"].shape[0]),
        "images_per_batch": int(batch["images"].shape[0]),
        "parameters_3d": sum(p.numel() for p in network.backbone_3d.parameters()),
        "loss": loss,
    }


def benchmark_voxelization(num_points: int = 34_000, num_clouds: int = 8, repeats: int = 5,
                           device: str = "auto") -> dict[str, Any]:
    """Cylindrical voxelisation of ``num_clouds`` nuScenes-sized clouds at once.

    Returns:
        ``points_per_s``, ``seconds_per_batch``, ``voxels_per_cloud`` (mean).
    """
    target = _device(device)
    generator = torch.Generator().manual_seed(0)
    # Ring-like clouds: range 1..60 m, heights -2..4 m, intensity 0..255.
    rho = 1 + 59 * torch.rand(num_clouds * num_points, generator=generator).square()
    phi = torch.rand(num_clouds * num_points, generator=generator) * 2 * np.pi
    z = -2 + 6 * torch.rand(num_clouds * num_points, generator=generator)
    intensity = 255 * torch.rand(num_clouds * num_points, generator=generator)
    points = torch.stack([rho * phi.cos(), rho * phi.sin(), z, intensity], dim=1).to(target)
    cloud = torch.arange(num_clouds).repeat_interleave(num_points).to(target)
    voxels = cylindrical_voxelize(points, cloud, num_clouds)
    _synchronize(target)
    started = time.perf_counter()
    for _ in range(repeats):
        voxels = cylindrical_voxelize(points, cloud, num_clouds)
    _synchronize(target)
    elapsed = (time.perf_counter() - started) / repeats
    return {"device": str(target), "points_per_s": len(points) / elapsed, "seconds_per_batch": elapsed,
            "voxels_per_cloud": len(voxels) / num_clouds}


def benchmark_pairing(root: str | Path | None = None, *, version: str = "v1.0-mini", split: str = "mini_train",
                      repeats: int = 20) -> dict[str, Any]:
    """The projection of one keyframe cloud into its 6 cameras (NumPy, one process).

    Returns:
        ``points_per_s``, ``seconds_per_cloud``, ``pairs_per_cloud``.
    """
    from accord_superflow.data import load_info_index, pair_points_with_cameras

    with tempfile.TemporaryDirectory() as work_dir:
        data_root = _default_root(root, Path(work_dir))
        index = load_info_index(data_root, version, split, max_sweeps=0, cache_dir=Path(work_dir) / "index")
        keyframe = index.keyframes[0]
        points = load_lidar_points(data_root / keyframe.lidar.path)
    cameras = list(keyframe.cameras.values())
    started = time.perf_counter()
    for _ in range(repeats):
        pairs = pair_points_with_cameras(points, keyframe.lidar, cameras, min_depth=1.0, margin_px=0.0)
    elapsed = (time.perf_counter() - started) / repeats
    return {"points_per_s": len(points) / elapsed, "seconds_per_cloud": elapsed, "pairs_per_cloud": len(pairs),
            "points_per_cloud": len(points)}


def run_benchmarks(root: str | Path | None = None, *, version: str = "v1.0-mini", split: str = "mini_train",
                   device: str = "auto", **pretraining_options: Any) -> dict[str, dict[str, Any]]:
    """All three benchmarks on one table version and split (``pretraining_options`` go to
    :func:`benchmark_pretraining`)."""
    return {
        "pretraining": benchmark_pretraining(root, version=version, split=split, device=device, **pretraining_options),
        "voxelization": benchmark_voxelization(device=device),
        "pairing": benchmark_pairing(root, version=version, split=split),
    }


class ThroughputConfig(BenchmarkConfig):
    """``accord benchmark superflow --speed throughput [--data NUSCENES_ROOT]``: :func:`run_benchmarks`."""

    version: str = Field("v1.0-mini", description="table directory of --data")
    split: str = Field("mini_train", description="split to draw keyframes from")
    batch_size: int = Field(2, ge=1, description="samples per pretraining step")
    steps: int = Field(5, ge=1, description="timed pretraining steps (quick: 1)")
    warmup_steps: int = Field(1, ge=0, description="untimed steps first (quick: 0)")
    image_size: tuple[int, int] = Field((224, 448), description="teacher input (height, width) (quick: the quick "
                                                                "pipeline's 28 x 56)")
    device: Literal["auto", "cpu", "cuda"] = "auto"


def throughput(cfg: ThroughputConfig) -> BenchmarkResult:
    """MinkUNet-34 and a small random ViT at nuScenes density; quick: the quick pipeline's tiny networks."""
    model = (SuperFlowModelConfig(backbone=QUICK.backbone, teacher=QUICK.teacher, embed_dim=QUICK.embed_dim,
                                  voxel_size=QUICK.voxel_size) if cfg.quick else SuperFlowModelConfig())
    values = run_benchmarks(cfg.data, version=cfg.version, split=cfg.split, batch_size=cfg.batch_size,
                            steps=preset(cfg, "steps", 1), warmup_steps=preset(cfg, "warmup_steps", 0),
                            image_size=preset(cfg, "image_size", QUICK.image_size), model=model, device=cfg.device)
    return BenchmarkResult.measured("superflow: pretraining, voxelisation and pairing throughput", values)
