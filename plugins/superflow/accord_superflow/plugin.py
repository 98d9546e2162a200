"""accord hook implementations of the ``superflow`` plugin.

Heavy imports (devkit, mmdet3d, spconv, transformers) stay inside the hooks' callables, so that
listing plugins stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from accord import hookimpl

if TYPE_CHECKING:
    from torch import nn


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
    from accord_superflow.tasks import TASKS

    for task in TASKS:
        register(task.name, task.run, config=task.config, description=task.description)


def build_minkunet(**options) -> nn.Module:
    """``SFMinkUNetBackbone`` from :class:`~accord_superflow.models.BackboneConfig` options (default MinkUNet-34)."""
    from accord_superflow.models import BackboneConfig
    from accord_superflow.models.backbone import build_backbone

    return build_backbone(BackboneConfig(**options))


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    register("minkunet34", build_minkunet,
             description="MinkUNet-34 (mmdet3d MinkUNetBackbone on spconv, padded spatial shape); options: "
                         "BackboneConfig fields")


def export_mmdet3d(checkpoint: str | Path, out: str | Path) -> Path:
    """``accord export CKPT --format mmdet3d --out FILE`` (see :mod:`accord_superflow.export`)."""
    from accord_superflow.export import export_mmdet3d as export

    return export(checkpoint, out)


@hookimpl
def register_exporters(register: Callable[..., None]) -> None:
    register("mmdet3d", export_mmdet3d,
             description="SuperFlow backbone -> mmdet3d MinkUNet segmentor checkpoint (backbone.* keys; "
                         "configs/superflow/minkunet34_seg.py)")
