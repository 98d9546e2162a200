"""Throughput and memory of SuperFlow pretraining and of its data-side hot spots.

* :func:`benchmark_pretraining`: optimizer steps per second and peak memory of the full model
  (3 frames + dense cloud through MinkUNet, all images through the teacher, three losses) on a fixed
  collated batch, plus the time to build one sample (loading, pairing, augmentation);
* :func:`benchmark_voxelization`: cylindrical voxelisation, points per second, against SuperFlow's
  per-cloud NumPy voxeliser (:func:`reference_voxelize`);
* :func:`benchmark_pairing`: the LiDAR -> camera projection chain, points per second, against the
  devkit chain (:func:`reference_pairing`).

Every time is a median with min and max over repeats (:mod:`accord.utils.timing`); comparisons
alternate both sides in one process, and ``threads=1`` gives stable ratios on a shared machine.

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
from accord.utils.timing import machine_state, ratio, time_alternating, time_repeats, torch_threads
from accord.config import BenchmarkConfig
from accord_superflow.downstream_benchmark import QUICK
from accord_superflow.losses import SuperFlowLossConfig
from accord_superflow.models.voxelize import DEFAULT_VOXEL_SIZE, cylindrical_voxelize
from accord_superflow.pretrain import (
    PretrainDataConfig,
    SuperFlowModelConfig,
    SuperFlowPretrainDataset,
    build_superflow,
    collate_pretrain,
    load_lidar_points,
)

__all__ = ["ThroughputConfig", "benchmark_pairing", "benchmark_pretraining", "benchmark_voxelization",
           "reference_pairing", "reference_voxelize", "run_benchmarks", "throughput"]


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
        ``iterations_per_s``, ``samples_per_s`` (from the median step), ``seconds_per_iteration``
        (median and min-max over the timed steps), ``peak_memory_mb``
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
    losses: list[float] = []
    timing = time_repeats(lambda: losses.append(step()), repeats=steps, warmup=0,
                          synchronize=lambda: _synchronize(target))
    peak = (torch.cuda.max_memory_allocated(target) / 2**20 if target.type == "cuda" else _peak_host_memory_mb())
    return {
        "device": str(target),
        "batch_size": batch_size,
        "iterations_per_s": 1 / timing.median,
        "samples_per_s": batch_size / timing.median,
        "seconds_per_iteration": timing.describe(1.0, "s"),
        "peak_memory_mb": peak,
        "sample_build_s": sample_build_s,
        "points_per_batch": int(batch["points"].shape[0]),
        "pairs_per_batch": int(batch["pair_point"].shape[0]),
        "images_per_batch": int(batch["images"].shape[0]),
        "parameters_3d": sum(p.numel() for p in network.backbone_3d.parameters()),
        "loss": losses[-1],
    }


def reference_voxelize(points: np.ndarray, cloud_index: np.ndarray, num_clouds: int,
                       voxel_size: tuple[float, float, float] = DEFAULT_VOXEL_SIZE
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """SuperFlow's voxeliser as written (``SuperflowDataPreprocessor.voxelize_single``), one cloud at a time.

    Per cloud: cylindrical coordinates, ``round`` by the voxel size, minus the cloud's minimum; a
    ravel hash of the integer triple (mmdet3d's ``ravel_hash``) and ``np.unique(return_index,
    return_inverse)``; the voxel's coordinates and features are its first point's.

    Returns:
        Per cloud ``(coords (V, 3) int64, features (V, C), point_to_voxel (n,))``.
    """
    results = []
    for cloud in range(num_clouds):
        cloud_points = points[cloud_index == cloud]
        rho = np.sqrt(cloud_points[:, 0] ** 2 + cloud_points[:, 1] ** 2)
        phi = np.arctan2(cloud_points[:, 1], cloud_points[:, 0]) * 180 / np.pi
        polar = np.stack([rho, phi, cloud_points[:, 2]], axis=1)
        coords = np.round(polar / np.asarray(voxel_size, dtype=polar.dtype)).astype(np.int64)
        coords -= coords.min(axis=0)
        unsigned = coords.astype(np.uint64)
        extent = unsigned.max(axis=0) + 1
        keys = np.zeros(len(unsigned), dtype=np.uint64)
        for axis in range(2):
            keys += unsigned[:, axis]
            keys *= extent[axis + 1]
        keys += unsigned[:, 2]
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        results.append((coords[first], cloud_points[first], inverse))
    return results


def _ring_clouds(num_points: int, num_clouds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring-like clouds: range 1..60 m, heights -2..4 m, intensity 0..255; ``(N, 4)`` and cloud ids."""
    generator = torch.Generator().manual_seed(0)
    rho = 1 + 59 * torch.rand(num_clouds * num_points, generator=generator).square()
    phi = torch.rand(num_clouds * num_points, generator=generator) * 2 * np.pi
    z = -2 + 6 * torch.rand(num_clouds * num_points, generator=generator)
    intensity = 255 * torch.rand(num_clouds * num_points, generator=generator)
    points = torch.stack([rho * phi.cos(), rho * phi.sin(), z, intensity], dim=1)
    return points, torch.arange(num_clouds).repeat_interleave(num_points)


def benchmark_voxelization(num_points: int = 34_000, num_clouds: int = 8, repeats: int = 15,
                           device: str = "auto") -> dict[str, Any]:
    """Cylindrical voxelisation of ``num_clouds`` nuScenes-sized clouds: accord's batched voxeliser
    vs :func:`reference_voxelize` (NumPy, cloud by cloud), alternated in this process.

    The reference runs on the CPU as upstream does its ``np.unique``; on a GPU accord's timing
    includes moving nothing (the points are already there) and a final synchronisation.

    Returns:
        ``points_per_s`` (at the median time), ``accord_ms`` and ``reference_ms`` per batch
        (median (min-max)), ``speedup`` (ratio of the medians, range of the per-repeat ratios),
        ``voxels_per_cloud`` (mean).
    """
    target = _device(device)
    points, cloud = _ring_clouds(num_points, num_clouds)
    points_on_device, cloud_on_device = points.to(target), cloud.to(target)
    points_numpy, cloud_numpy = points.numpy(), cloud.numpy()
    timings = time_alternating({
        "accord": lambda: cylindrical_voxelize(points_on_device, cloud_on_device, num_clouds),
        "reference": lambda: reference_voxelize(points_numpy, cloud_numpy, num_clouds),
    }, repeats=repeats, synchronize=lambda: _synchronize(target))
    voxels = cylindrical_voxelize(points_on_device, cloud_on_device, num_clouds)
    return {"device": str(target), "points": len(points),
            "points_per_s": len(points) / timings["accord"].median,
            "accord_ms": timings["accord"].describe(1e3, "ms"),
            "reference_ms": timings["reference"].describe(1e3, "ms"),
            "speedup": ratio(timings["reference"], timings["accord"]),
            "voxels_per_cloud": len(voxels) / num_clouds}


def reference_pairing(points: np.ndarray, lidar: Any, cameras: list[Any], min_depth: float = 1.0) -> np.ndarray:
    """The devkit's ``map_pointcloud_to_image`` chain as SLidR / SuperFlow run it, camera by camera.

    Four rigid steps on a ``(3, N)`` copy of the cloud (LiDAR -> ego -> global -> camera-time ego
    -> camera), ``view_points`` with normalisation, then the depth and in-image mask.

    Returns:
        ``(M, 4)`` int64 rows ``(point, camera slot, row, col)``.
    """
    pairs = []
    for slot, camera in enumerate(cameras):
        cloud = np.asarray(points, dtype=np.float64)[:, :3].T.copy()
        cloud = lidar.sensor_to_ego.rotation @ cloud + lidar.sensor_to_ego.translation[:, None]
        cloud = lidar.ego_to_global.rotation @ cloud + lidar.ego_to_global.translation[:, None]
        cloud = camera.ego_to_global.rotation.T @ (cloud - camera.ego_to_global.translation[:, None])
        cloud = camera.sensor_to_ego.rotation.T @ (cloud - camera.sensor_to_ego.translation[:, None])
        depth = cloud[2]
        view = np.eye(4)
        view[:3, :3] = camera.intrinsic
        projected = view @ np.vstack([cloud, np.ones(cloud.shape[1])])
        uv = projected[:2] / projected[2:3]
        mask = ((depth > min_depth) & (uv[0] > 0) & (uv[0] < camera.width - 1) & (uv[1] > 0)
                & (uv[1] < camera.height - 1))
        kept = np.nonzero(mask)[0]
        pairs.append(np.stack([kept, np.full(len(kept), slot), np.round(uv[1, kept]), np.round(uv[0, kept])], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def benchmark_pairing(root: str | Path | None = None, *, version: str = "v1.0-mini", split: str = "mini_train",
                      repeats: int = 20) -> dict[str, Any]:
    """The projection of one keyframe cloud into its 6 cameras: accord's composed projection vs
    :func:`reference_pairing` (the devkit chain), alternated in this process (NumPy / torch CPU).

    Returns:
        ``points_per_s`` (at the median time), ``accord_ms`` and ``reference_ms`` per cloud, ``speedup``,
        ``pairs_per_cloud`` of each side and ``points_per_cloud``.
    """
    from accord_superflow.data import load_info_index, pair_points_with_cameras

    with tempfile.TemporaryDirectory() as work_dir:
        data_root = _default_root(root, Path(work_dir))
        index = load_info_index(data_root, version, split, max_sweeps=0, cache_dir=Path(work_dir) / "index")
        keyframe = index.keyframes[0]
        points = load_lidar_points(data_root / keyframe.lidar.path)
    cameras = list(keyframe.cameras.values())
    timings = time_alternating({
        "accord": lambda: pair_points_with_cameras(points, keyframe.lidar, cameras, min_depth=1.0, margin_px=0.0),
        "reference": lambda: reference_pairing(points, keyframe.lidar, cameras),
    }, repeats=repeats)
    pairs = pair_points_with_cameras(points, keyframe.lidar, cameras, min_depth=1.0, margin_px=0.0)
    return {"points_per_s": len(points) / timings["accord"].median, "accord_ms": timings["accord"].describe(1e3, "ms"),
            "reference_ms": timings["reference"].describe(1e3, "ms"),
            "speedup": ratio(timings["reference"], timings["accord"]), "pairs_per_cloud": len(pairs),
            "reference_pairs_per_cloud": len(reference_pairing(points, keyframe.lidar, cameras)),
            "points_per_cloud": len(points)}


def run_benchmarks(root: str | Path | None = None, *, version: str = "v1.0-mini", split: str = "mini_train",
                   device: str = "auto", threads: int | None = None,
                   **pretraining_options: Any) -> dict[str, dict[str, Any]]:
    """All three benchmarks on one table version and split (``pretraining_options`` go to
    :func:`benchmark_pretraining`), with ``threads`` torch threads; ``machine`` records the
    conditions (:func:`accord.utils.timing.machine_state`)."""
    with torch_threads(threads):
        return {
            "pretraining": benchmark_pretraining(root, version=version, split=split, device=device,
                                                 **pretraining_options),
            "voxelization": benchmark_voxelization(device=device),
            "pairing": benchmark_pairing(root, version=version, split=split),
            "machine": machine_state(),
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
                            image_size=preset(cfg, "image_size", QUICK.image_size), model=model, device=cfg.device,
                            threads=cfg.threads)
    return BenchmarkResult.measured(
        "superflow: pretraining, voxelisation and pairing throughput", values,
        notes=["Times: median (min-max) over repeats; voxelisation and pairing alternate accord with the reference "
               "formulation in this process (speedup: ratio of medians, range of the per-repeat ratios)."])
