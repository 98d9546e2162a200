"""The keyframe info index (SuperFlow's ``superflow_nus_info.pkl``, rebuilt and stored as JSON).

One entry per keyframe (``sample``), scene by scene in scene-table order and in time order inside a
scene (walking ``first_sample_token`` -> ``next``). Each entry holds the LiDAR and camera
calibrations and ego poses, previous LiDAR sweeps with their sweep -> keyframe transform, the
lidarseg label path and, explicitly, the positions of the previous and next keyframes of the same
scene, taken from the sample links (upstream infers them from list order, which silently pairs
unrelated frames when the list is not scene-ordered).

The index is cached as JSON (never pickle: a cache file may come from elsewhere) under a key that
hashes the dataset's tables, so editing the dataset rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from accord_superflow.data.geometry import RigidTransform, sensor_to_sensor
from accord_superflow.data.schema import CAMERA_CHANNELS, LIDAR_CHANNEL, SPLITS_BY_VERSION

if TYPE_CHECKING:
    from nuscenes import NuScenes

__all__ = [
    "LABEL_FRACTIONS",
    "SensorFrame",
    "CameraFrame",
    "SweepFrame",
    "KeyframeInfo",
    "InfoIndex",
    "split_scene_names",
    "build_info_index",
    "dataset_cache_key",
    "load_info_index",
    "label_fraction_scenes",
    "label_fraction_subset",
]

# Bump when the JSON layout changes, so old caches are rebuilt instead of misread.
_FORMAT_VERSION = 1
LABEL_FRACTIONS = (1, 5, 10, 25, 100)


@dataclass(frozen=True, eq=False)
class SensorFrame:
    """One ``sample_data`` of a sensor: file, time, calibration and ego pose.

    Attributes:
        sample_data_token: the ``sample_data`` token.
        path: file path relative to the dataset root.
        timestamp: capture time in microseconds.
        sensor_to_ego: ``calibrated_sensor`` transform (sensor -> ego).
        ego_to_global: ``ego_pose`` at ``timestamp`` (ego -> global).
    """

    sample_data_token: str
    path: str
    timestamp: int
    sensor_to_ego: RigidTransform
    ego_to_global: RigidTransform

    def to_json(self) -> dict[str, Any]:
        return {"sample_data_token": self.sample_data_token, "path": self.path, "timestamp": self.timestamp,
                "sensor_to_ego": self.sensor_to_ego.to_json(), "ego_to_global": self.ego_to_global.to_json()}

    @classmethod
    def _fields_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"sample_data_token": str(data["sample_data_token"]), "path": str(data["path"]),
                "timestamp": int(data["timestamp"]),
                "sensor_to_ego": RigidTransform.from_json(data["sensor_to_ego"]),
                "ego_to_global": RigidTransform.from_json(data["ego_to_global"])}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SensorFrame:
        return cls(**cls._fields_from_json(data))


@dataclass(frozen=True, eq=False, kw_only=True)
class CameraFrame(SensorFrame):
    """A camera image.

    Attributes:
        intrinsic: ``(3, 3)`` camera matrix for the stored image size.
        width: image width in pixels.
        height: image height in pixels.
    """

    intrinsic: np.ndarray
    width: int
    height: int

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "intrinsic": np.asarray(self.intrinsic).tolist(), "width": self.width,
                "height": self.height}

    @classmethod
    def _fields_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._fields_from_json(data),
                "intrinsic": np.asarray(data["intrinsic"], dtype=np.float64).reshape(3, 3),
                "width": int(data["width"]), "height": int(data["height"])}


@dataclass(frozen=True, eq=False, kw_only=True)
class SweepFrame(SensorFrame):
    """A previous LiDAR scan of a keyframe.

    Attributes:
        is_key_frame: whether the scan is itself a keyframe (the chain of previous scans runs
            through earlier keyframes, as in the devkit's multi-sweep loader and mmdet3d).
        sweep_to_keyframe: maps the scan's points into the keyframe LiDAR frame,
            ``p_key = R @ p_sweep + t`` (the composition mmdet3d issue #3054 gets wrong).
    """

    is_key_frame: bool
    sweep_to_keyframe: RigidTransform

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "is_key_frame": self.is_key_frame,
                "sweep_to_keyframe": self.sweep_to_keyframe.to_json()}

    @classmethod
    def _fields_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._fields_from_json(data), "is_key_frame": bool(data["is_key_frame"]),
                "sweep_to_keyframe": RigidTransform.from_json(data["sweep_to_keyframe"])}


@dataclass(frozen=True, eq=False)
class KeyframeInfo:
    """Everything SuperFlow needs about one keyframe.

    Attributes:
        index: position of this entry in its :class:`InfoIndex`.
        sample_token: the ``sample`` token.
        scene_name: e.g. ``"scene-0061"``.
        timestamp: sample time in microseconds.
        prev_index: position of the previous keyframe of the same scene, ``None`` at its start.
        next_index: position of the next keyframe of the same scene, ``None`` at its end.
        lidar: the keyframe LIDAR_TOP scan.
        cameras: channel -> image, in :data:`CAMERA_CHANNELS` order.
        sweeps: previous LiDAR scans of the same scene, nearest first.
        lidarseg_path: ``*_lidarseg.bin`` relative to the dataset root, ``None`` without labels.
    """

    index: int
    sample_token: str
    scene_name: str
    timestamp: int
    prev_index: int | None
    next_index: int | None
    lidar: SensorFrame
    cameras: dict[str, CameraFrame]
    sweeps: list[SweepFrame]
    lidarseg_path: str | None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "sample_token": self.sample_token, "scene_name": self.scene_name,
                "timestamp": self.timestamp, "prev_index": self.prev_index, "next_index": self.next_index,
                "lidar": self.lidar.to_json(), "cameras": {k: v.to_json() for k, v in self.cameras.items()},
                "sweeps": [s.to_json() for s in self.sweeps], "lidarseg_path": self.lidarseg_path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyframeInfo:
        def optional_int(value: Any) -> int | None:
            return None if value is None else int(value)

        return cls(
            index=int(data["index"]), sample_token=str(data["sample_token"]), scene_name=str(data["scene_name"]),
            timestamp=int(data["timestamp"]), prev_index=optional_int(data["prev_index"]),
            next_index=optional_int(data["next_index"]), lidar=SensorFrame.from_json(data["lidar"]),
            cameras={str(k): CameraFrame.from_json(v) for k, v in data["cameras"].items()},
            sweeps=[SweepFrame.from_json(s) for s in data["sweeps"]],
            lidarseg_path=None if data["lidarseg_path"] is None else str(data["lidarseg_path"]),
        )


@dataclass(frozen=True, eq=False)
class InfoIndex:
    """Keyframes of one split, scene by scene.

    Attributes:
        version: e.g. ``"v1.0-mini"``.
        split: official split name (``mini_train``, ``train``, ...).
        max_sweeps: the most previous sweeps stored per keyframe.
        keyframes: the entries; ``keyframes[i].index == i``.
        cache_key: :func:`dataset_cache_key` of the dataset it was built from.
    """

    version: str
    split: str
    max_sweeps: int
    keyframes: list[KeyframeInfo]
    cache_key: str = ""

    def __len__(self) -> int:
        return len(self.keyframes)

    def scene_names(self) -> list[str]:
        """Scene names in index (= scene-table) order."""
        return list(dict.fromkeys(k.scene_name for k in self.keyframes))

    def select_scenes(self, names: Iterable[str]) -> InfoIndex:
        """The keyframes of the named scenes, re-indexed (order and neighbour links preserved)."""
        wanted = set(names)
        kept = [k for k in self.keyframes if k.scene_name in wanted]
        new_position = {k.index: i for i, k in enumerate(kept)}
        keyframes = [
            replace(k, index=i, prev_index=new_position.get(k.prev_index), next_index=new_position.get(k.next_index))
            for i, k in enumerate(kept)
        ]
        return replace(self, keyframes=keyframes)

    def to_json(self) -> dict[str, Any]:
        return {"format": _FORMAT_VERSION, "version": self.version, "split": self.split,
                "max_sweeps": self.max_sweeps, "cache_key": self.cache_key,
                "keyframes": [k.to_json() for k in self.keyframes]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InfoIndex:
        """Parse :meth:`to_json` output.

        Raises:
            ValueError: another format version or a malformed entry.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT_VERSION:
            raise ValueError(f"info index format {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {_FORMAT_VERSION}")
        try:
            keyframes = [KeyframeInfo.from_json(k) for k in data["keyframes"]]
            index = cls(str(data["version"]), str(data["split"]), int(data["max_sweeps"]), keyframes,
                        str(data["cache_key"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed info index: {exc!r}") from None
        if any(k.index != i for i, k in enumerate(keyframes)):
            raise ValueError("malformed info index: entry positions do not match their 'index'")
        for k in keyframes:
            for neighbour in (k.prev_index, k.next_index):
                if neighbour is not None and not (0 <= neighbour < len(keyframes)
                                                  and keyframes[neighbour].scene_name == k.scene_name):
                    raise ValueError(f"malformed info index: keyframe {k.index} links to {neighbour}, "
                                     "not a keyframe of its scene")
        return index


def split_scene_names(version: str, split: str) -> list[str]:
    """Scene names of an official split (``nuscenes.utils.splits.create_splits_scenes``).

    Raises:
        ValueError: the split does not belong to ``version`` (e.g. ``train`` for ``v1.0-mini``).
    """
    from nuscenes.utils.splits import create_splits_scenes

    allowed = SPLITS_BY_VERSION.get(version)
    if allowed is None:
        raise ValueError(f"unknown nuScenes version {version!r}; expected one of {', '.join(SPLITS_BY_VERSION)}")
    if split not in allowed:
        raise ValueError(f"split {split!r} is not a {version} split; expected one of {', '.join(allowed)}")
    return list(create_splits_scenes()[split])


def build_info_index(nusc: NuScenes, split: str, max_sweeps: int = 10) -> InfoIndex:
    """Walk the split's scenes (scene-table order) and their samples (``next`` links).

    Args:
        nusc: a loaded ``NuScenes``.
        split: official split of ``nusc.version``.
        max_sweeps: previous LiDAR scans to keep per keyframe (SuperFlow uses the first 2).

    Returns:
        The index (``cache_key`` empty; :func:`load_info_index` fills it).
    """
    scene_names = set(split_scene_names(nusc.version, split))
    lidarseg_files = {r["sample_data_token"]: r["filename"] for r in getattr(nusc, "lidarseg", [])}
    samples = [
        (scene, sample)
        for scene in nusc.scene
        if scene["name"] in scene_names
        for sample in _scene_samples(nusc, scene)
    ]
    position = {sample["token"]: i for i, (_, sample) in enumerate(samples)}

    def neighbour(scene: dict, token: str) -> int | None:
        # Only a link to a sample of the same scene is a temporal neighbour.
        if not token or nusc.get("sample", token)["scene_token"] != scene["token"]:
            return None
        return position[token]

    keyframes = []
    for i, (scene, sample) in enumerate(samples):
        lidar = _sensor_frame(nusc, sample["data"][LIDAR_CHANNEL])
        keyframes.append(KeyframeInfo(
            index=i, sample_token=sample["token"], scene_name=scene["name"], timestamp=int(sample["timestamp"]),
            prev_index=neighbour(scene, sample["prev"]), next_index=neighbour(scene, sample["next"]),
            lidar=lidar,
            cameras={channel: _camera_frame(nusc, sample["data"][channel]) for channel in CAMERA_CHANNELS},
            sweeps=_previous_sweeps(nusc, lidar, scene["token"], max_sweeps),
            lidarseg_path=lidarseg_files.get(lidar.sample_data_token),
        ))
    return InfoIndex(nusc.version, split, max_sweeps, keyframes)


def _scene_samples(nusc: NuScenes, scene: dict) -> list[dict]:
    """The scene's samples in time order; a ``next`` link into another scene ends the walk."""
    samples, token = [], scene["first_sample_token"]
    while token:
        sample = nusc.get("sample", token)
        if sample["scene_token"] != scene["token"]:
            break
        samples.append(sample)
        token = sample["next"]
    return samples


def _frame_fields(nusc: NuScenes, sample_data: dict) -> dict[str, Any]:
    calibration = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    return {
        "sample_data_token": sample_data["token"], "path": sample_data["filename"],
        "timestamp": int(sample_data["timestamp"]),
        "sensor_to_ego": RigidTransform.from_record(calibration),
        "ego_to_global": RigidTransform.from_record(nusc.get("ego_pose", sample_data["ego_pose_token"])),
    }


def _sensor_frame(nusc: NuScenes, token: str) -> SensorFrame:
    return SensorFrame(**_frame_fields(nusc, nusc.get("sample_data", token)))


def _camera_frame(nusc: NuScenes, token: str) -> CameraFrame:
    sample_data = nusc.get("sample_data", token)
    calibration = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    return CameraFrame(**_frame_fields(nusc, sample_data), intrinsic=np.asarray(calibration["camera_intrinsic"]),
                       width=int(sample_data["width"]), height=int(sample_data["height"]))


def _previous_sweeps(nusc: NuScenes, keyframe: SensorFrame, scene_token: str, max_sweeps: int) -> list[SweepFrame]:
    """Follow ``sample_data.prev`` from the keyframe scan, nearest first, within the scene."""
    sweeps: list[SweepFrame] = []
    token = nusc.get("sample_data", keyframe.sample_data_token)["prev"]
    while token and len(sweeps) < max_sweeps:
        sample_data = nusc.get("sample_data", token)
        if nusc.get("sample", sample_data["sample_token"])["scene_token"] != scene_token:
            break
        fields = _frame_fields(nusc, sample_data)
        sweep_to_keyframe = sensor_to_sensor(fields["sensor_to_ego"], fields["ego_to_global"],
                                             keyframe.sensor_to_ego, keyframe.ego_to_global)
        sweeps.append(SweepFrame(**fields, is_key_frame=bool(sample_data["is_key_frame"]),
                                 sweep_to_keyframe=sweep_to_keyframe))
        token = sample_data["prev"]
    return sweeps


def dataset_cache_key(dataroot: str | Path, version: str) -> str:
    """sha256 over every table file of ``<dataroot>/<version>/`` (names and contents).

    Hashing contents rather than modification times keeps the key right for copies and for edits
    within one mtime tick; it costs about a second per GB of tables, far less than loading them.
    """
    digest = hashlib.sha256()
    table_dir = Path(dataroot) / version
    for path in sorted(table_dir.glob("*.json")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def load_info_index(dataroot: str | Path, version: str, split: str, max_sweeps: int = 10,
                    cache_dir: str | Path | None = None) -> InfoIndex:
    """The split's info index, from the JSON cache when it matches the dataset, else rebuilt.

    Args:
        dataroot: nuScenes root.
        version: ``v1.0-mini``, ``v1.0-trainval`` or ``v1.0-test``.
        split: an official split of ``version``.
        max_sweeps: previous LiDAR scans per keyframe.
        cache_dir: where ``infos_<version>_<split>_sweeps<N>.json`` lives; defaults to
            ``<dataroot>/superflow_cache``.

    Returns:
        The index, with ``cache_key`` set.
    """
    split_scene_names(version, split)  # fail on a bad split before any expensive work
    dataroot = Path(dataroot)
    cache_dir = dataroot / "superflow_cache" if cache_dir is None else Path(cache_dir)
    cache_file = cache_dir / f"infos_{version}_{split}_sweeps{max_sweeps}.json"
    key = dataset_cache_key(dataroot, version)
    cached = _read_cache(cache_file)
    if cached is not None and cached.cache_key == key:
        return cached

    from nuscenes import NuScenes

    index = replace(build_info_index(NuScenes(version=version, dataroot=str(dataroot), verbose=False), split,
                                     max_sweeps), cache_key=key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(index.to_json()))
    partial.replace(cache_file)  # atomic: a concurrent reader never sees half a file
    return index


def _read_cache(path: Path) -> InfoIndex | None:
    """The cached index, or ``None`` when absent or unreadable (then it is rebuilt)."""
    try:
        return InfoIndex.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def label_fraction_scenes(scene_names: Sequence[str], percent: int) -> list[str]:
    """SLidR's label-fraction protocol: keep every ``100 // percent``-th scene.

    Scenes are counted from 1 in scene-table order and a scene is kept when its count is a
    multiple of the step (SLidR ``dataset_skip_step``), so 1 % of the 700 train scenes keeps the
    7 scenes at counts 100, 200, ..., 700.

    Args:
        scene_names: the split's scenes in scene-table order.
        percent: one of :data:`LABEL_FRACTIONS`.

    Raises:
        ValueError: unsupported ``percent``, or too few scenes for any to be kept.
    """
    if percent not in LABEL_FRACTIONS:
        raise ValueError(f"label fraction {percent!r} %; expected one of {LABEL_FRACTIONS}")
    step = 100 // percent
    kept = [name for count, name in enumerate(scene_names, start=1) if count % step == 0]
    if not kept:
        raise ValueError(f"{percent} % of {len(scene_names)} scenes keeps none (every {step}th scene is kept)")
    return kept


def label_fraction_subset(index: InfoIndex, percent: int) -> InfoIndex:
    """The index restricted to :func:`label_fraction_scenes` of its scenes."""
    return index.select_scenes(label_fraction_scenes(index.scene_names(), percent))
