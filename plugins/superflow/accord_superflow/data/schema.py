"""Names and numbers fixed by the nuScenes on-disk format (devkit ``docs/schema_nuscenes.md``)."""

from __future__ import annotations

__all__ = [
    "TABLES",
    "LIDAR_CHANNEL",
    "CAMERA_CHANNELS",
    "LIDARSEG_CLASSES",
    "SEMANTIC_SUPERPIXEL_CLASSES",
    "LIDARSEG_TO_SEMANTIC",
    "SEMANTIC_IGNORE_ID",
    "POINT_DIMS",
    "SPLITS_BY_VERSION",
]

# The 13 tables NuScenes() reads; a missing one is a FileNotFoundError at load time.
TABLES = (
    "attribute",
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "log",
    "map",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
    "visibility",
)

LIDAR_CHANNEL = "LIDAR_TOP"
CAMERA_CHANNELS = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)

# The official lidarseg classes; position == the ``index`` field of category.json (and the uint8
# value in *_lidarseg.bin). The devkit's colormap has exactly these keys in this order.
LIDARSEG_CLASSES = (
    "noise",
    "animal",
    "human.pedestrian.adult",
    "human.pedestrian.child",
    "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer",
    "human.pedestrian.stroller",
    "human.pedestrian.wheelchair",
    "movable_object.barrier",
    "movable_object.debris",
    "movable_object.pushable_pullable",
    "movable_object.trafficcone",
    "static_object.bicycle_rack",
    "vehicle.bicycle",
    "vehicle.bus.bendy",
    "vehicle.bus.rigid",
    "vehicle.car",
    "vehicle.construction",
    "vehicle.emergency.ambulance",
    "vehicle.emergency.police",
    "vehicle.motorcycle",
    "vehicle.trailer",
    "vehicle.truck",
    "flat.driveable_surface",
    "flat.other",
    "flat.sidewalk",
    "flat.terrain",
    "static.manmade",
    "static.other",
    "static.vegetation",
    "vehicle.ego",
)

# Class-level ("semantic") superpixel ids as SuperFlow's openseed_inst17 uses them: the 16 nuScenes
# lidarseg evaluation classes plus one id for everything else. The same id means the same class in
# every camera and at every time, which the spatial and temporal losses rely on.
SEMANTIC_SUPERPIXEL_CLASSES = (
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction_vehicle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "trailer",
    "truck",
    "driveable_surface",
    "other_flat",
    "sidewalk",
    "terrain",
    "manmade",
    "vegetation",
    "other",
)
SEMANTIC_IGNORE_ID = len(SEMANTIC_SUPERPIXEL_CLASSES) - 1

_LIDARSEG_TO_SEMANTIC_NAME = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
    "flat.driveable_surface": "driveable_surface",
    "flat.other": "other_flat",
    "flat.sidewalk": "sidewalk",
    "flat.terrain": "terrain",
    "static.manmade": "manmade",
    "static.vegetation": "vegetation",
}
# lidarseg index (0..31) -> semantic superpixel id (0..16); the standard 32 -> 16 + ignore mapping.
LIDARSEG_TO_SEMANTIC = tuple(
    SEMANTIC_SUPERPIXEL_CLASSES.index(_LIDARSEG_TO_SEMANTIC_NAME.get(name, "other"))
    for name in LIDARSEG_CLASSES
)

# *.pcd.bin rows: x, y, z, intensity (0..255), ring index, all float32.
POINT_DIMS = 5

# Official scene splits (nuscenes.utils.splits.create_splits_scenes keys) valid for each version.
SPLITS_BY_VERSION = {
    "v1.0-mini": ("mini_train", "mini_val"),
    "v1.0-trainval": ("train", "val", "train_detect", "train_track"),
    "v1.0-test": ("test",),
}
