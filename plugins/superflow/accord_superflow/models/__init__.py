"""SuperFlow networks: cylindrical voxeliser, MinkUNet-34 (mmdet3d on spconv), DINOv2 teacher, heads.

The backbone lives in :mod:`accord_superflow.models.backbone`, which imports mmdet3d and spconv;
this package's top level stays import-light (no mmdet3d, spconv or transformers).
"""

from __future__ import annotations

from accord_superflow.models.config import BackboneConfig, TeacherConfig
from accord_superflow.models.heads import PixelHead, PointHead
from accord_superflow.models.teacher import DinoV2Teacher, build_teacher, random_dinov2_config
from accord_superflow.models.voxelize import (
    DEFAULT_VOXEL_SIZE,
    SHAPE_MULTIPLE,
    VoxelBatch,
    cylindrical_coordinates,
    cylindrical_voxelize,
    padded_spatial_shape,
)

__all__ = [
    "BackboneConfig",
    "DEFAULT_VOXEL_SIZE",
    "DinoV2Teacher",
    "PixelHead",
    "PointHead",
    "SHAPE_MULTIPLE",
    "TeacherConfig",
    "VoxelBatch",
    "build_teacher",
    "cylindrical_coordinates",
    "cylindrical_voxelize",
    "padded_spatial_shape",
    "random_dinov2_config",
]
