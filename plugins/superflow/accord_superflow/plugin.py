"""accord hook implementations of the ``superflow`` plugin.

Heavy imports (devkit, mmdet3d, spconv, transformers) stay inside the hooks' callables, so that
listing plugins stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {
        "domain": "autonomous driving (LiDAR + camera)",
        "description": "SuperFlow spatiotemporal LiDAR-camera distillation on nuScenes: data layer, MinkUNet-34 "
                       "pretraining from DINOv2, lidarseg fine-tuning / linear probing / evaluation with "
                       "SuperFlow++-style temporal voting, mmdet3d export, quick benchmark",
    }


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    # Imported here so that listing plugins does not import the devkit.
    from accord_superflow.data import check_nuscenes, synth_nuscenes

    register("nuscenes", synth=synth_nuscenes, check=check_nuscenes,
             description="nuScenes v1.0 layout: 13 tables, samples/sweeps, lidarseg, superpixels/<kind>/")


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    from accord_superflow import tasks

    # Short descriptions: `accord plugins` shows them in a table; docs/superflow.md has the details.
    register("pretrain", tasks.pretrain, config=tasks.PretrainConfig, description="SuperFlow pretraining, MinkUNet-34")
    register("finetune", tasks.finetune, config=tasks.FinetuneConfig, description="lidarseg fine-tuning / linear probe")
    register("evaluate", tasks.evaluate, config=tasks.EvaluateConfig, description="point mIoU, optional temporal voting")


@hookimpl
def register_benchmarks(register: Callable[..., None]) -> None:
    from accord_superflow import benchmarks, downstream_benchmark

    register("lidarseg", downstream_benchmark.lidarseg, config=downstream_benchmark.SuperFlowBenchmarkConfig,
             description="SuperFlow vs random init: linear probing and low-label fine-tuning mIoU over seeds")
    register("throughput", benchmarks.throughput, config=benchmarks.ThroughputConfig, kind="speed",
             description="pretraining it/s and peak memory, voxelisation and pairing points/s")


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    from accord_superflow.finetune import segmentation_model
    from accord_superflow.pretrain import superflow_model

    register("superflow", superflow_model,
             description="MinkUNet-34 student + frozen DINOv2 teacher + SuperFlow losses (pretrain runs)")
    register("segmentation", segmentation_model, description="MinkUNet-34 + linear head, CE + Lovasz (finetune runs)")


def export_mmdet3d(checkpoint: str | Path, out: str | Path) -> Path:
    """``accord export CKPT --format mmdet3d --out FILE`` (see :mod:`accord_superflow.export`)."""
    from accord_superflow.export import export_mmdet3d as export

    return export(checkpoint, out)


@hookimpl
def register_exporters(register: Callable[..., None]) -> None:
    register("mmdet3d", export_mmdet3d,
             description="SuperFlow backbone -> mmdet3d MinkUNet segmentor checkpoint (backbone.* keys; "
                         "configs/superflow/minkunet34_seg.py)")
