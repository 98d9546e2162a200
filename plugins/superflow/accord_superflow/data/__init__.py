"""nuScenes data layer of the SuperFlow plugin.

* :func:`synth_nuscenes` writes a synthetic dataset in the exact ``v1.0-mini`` layout;
* :func:`check_nuscenes` / :func:`require_valid` validate a dataset on disk;
* :func:`load_info_index` builds (and caches as JSON) the per-keyframe info index, with
  :func:`label_fraction_subset` for the 1/5/10/25/100 % fine-tuning subsets;
* :func:`pair_points_with_cameras` is the LiDAR -> pixel projection chain;
* :mod:`~accord_superflow.data.superpixels` reads and generates per-image superpixels.
"""

from __future__ import annotations

from accord_superflow.data.check import check_nuscenes, require_valid
from accord_superflow.data.geometry import RigidTransform, sensor_to_sensor
from accord_superflow.data.index import (
    LABEL_FRACTIONS,
    CameraFrame,
    InfoIndex,
    KeyframeInfo,
    SensorFrame,
    SweepFrame,
    build_info_index,
    dataset_cache_key,
    label_fraction_scenes,
    label_fraction_subset,
    load_info_index,
    split_scene_names,
)
from accord_superflow.data.projection import PointPixelPairs, pair_points_with_cameras
from accord_superflow.data.superpixels import (
    SlicParams,
    cached_slic_superpixels,
    generate_slic_superpixels,
    load_semantic_superpixels,
    load_superpixels,
    slic_superpixels,
    superpixel_dir,
)
from accord_superflow.data.synth import synth_nuscenes

__all__ = [
    "LABEL_FRACTIONS",
    "CameraFrame",
    "InfoIndex",
    "KeyframeInfo",
    "PointPixelPairs",
    "RigidTransform",
    "SensorFrame",
    "SlicParams",
    "SweepFrame",
    "build_info_index",
    "cached_slic_superpixels",
    "check_nuscenes",
    "dataset_cache_key",
    "generate_slic_superpixels",
    "label_fraction_scenes",
    "label_fraction_subset",
    "load_info_index",
    "load_semantic_superpixels",
    "load_superpixels",
    "pair_points_with_cameras",
    "require_valid",
    "sensor_to_sensor",
    "slic_superpixels",
    "split_scene_names",
    "superpixel_dir",
    "synth_nuscenes",
]
