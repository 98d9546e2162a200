"""Write a small synthetic dataset in the exact nuScenes ``v1.0-mini`` layout (with lidarseg).

Everything comes from one synthetic street per scene (:mod:`accord_superflow.data.world`): LiDAR
scans are ray cast from the ego pose at each scan's time and camera images are rendered through the
real calibration chain (intrinsics, camera -> ego, ego -> global at the image's time), so the
devkit's projection puts LiDAR points on the pixels of the object they hit. The output loads with
``NuScenes(version="v1.0-mini", dataroot=out_dir)`` and the devkit's renderers run on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pyquaternion import Quaternion

from accord_superflow.data.geometry import RigidTransform, yaw_pitch_roll_quaternion
from accord_superflow.data.schema import (
    CAMERA_CHANNELS,
    LIDAR_CHANNEL,
    LIDARSEG_CLASSES,
    LIDARSEG_TO_SEMANTIC,
    SEMANTIC_IGNORE_ID,
    SEMANTIC_SUPERPIXEL_CLASSES,
    SPLITS_BY_VERSION,
    TABLES,
)
from accord_superflow.data.superpixels import SEMANTIC_KIND, save_superpixels, superpixel_dir, write_superpixel_meta
from accord_superflow.data.world import StreetLayout, World, make_world

__all__ = ["VERSION", "FULL_IMAGE_SIZE", "synth_nuscenes"]

VERSION = "v1.0-mini"
FULL_IMAGE_SIZE = (1600, 900)
# nuScenes-like intrinsics at 1600x900; scaled with the rendered image width.
_FULL_INTRINSIC = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
# Camera optical frame (x right, y down, z forward) -> ego (x forward, y left, z up), for CAM_FRONT.
_OPTICAL_TO_FORWARD = (0.5, -0.5, 0.5, -0.5)
# Mounting: ego-frame position (m) and yaw (deg) of each camera, close to the nuScenes rig.
_CAMERA_MOUNTS = {
    "CAM_FRONT": ((1.70, 0.02, 1.51), 0.0),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.49), -55.0),
    "CAM_BACK_RIGHT": ((1.04, -0.48, 1.56), -110.0),
    "CAM_BACK": ((0.03, 0.00, 1.58), 180.0),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0),
}
_LIDAR_MOUNT = ((0.94, 0.0, 1.84), -90.0)
# HDL-32E: 32 beams from -30.67 to +10.67 degrees elevation, 20 Hz.
_LIDAR_ELEVATIONS = np.deg2rad(np.linspace(-30.67, 10.67, 32))
_LIDAR_MAX_RANGE = 80.0
_KEYFRAME_INTERVAL_US = 500_000
_LIDAR_PERIOD_US = 50_000
_MAP_RESOLUTION = 0.1  # metres per pixel, fixed by the devkit's MapMask
_MAP_SIZE_PX = 1600
_ROAD_Y = 80.0
_EGO_LANE_OFFSET = -2.0
_LIGHT = np.array([0.3, -0.5, 0.81]) / np.linalg.norm([0.3, -0.5, 0.81])
_ATTRIBUTES = (
    "vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
    "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving",
)
_VISIBILITY_LEVELS = ("v0-40", "v40-60", "v60-80", "v80-100")
# Two recording sites, alternated between scenes (each scene gets its own log, as in nuScenes).
_SITES = (
    {"location": "singapore-onenorth", "vehicle": "n015", "date": "2018-07-24", "start_us": 1532402927647951},
    {"location": "boston-seaport", "vehicle": "n008", "date": "2018-08-01", "start_us": 1533151603547590},
)


@dataclass(frozen=True)
class _EgoTrajectory:
    """Ego drives along +x in its lane with a gentle weave (so it turns a little), on z = 0."""

    start_x: float
    lane_y: float
    speed: float
    weave_amplitude: float = 0.3
    weave_period_s: float = 4.0

    def yaw(self, time_s: float) -> float:
        omega = 2 * np.pi / self.weave_period_s
        return float(np.arctan2(self.weave_amplitude * omega * np.cos(omega * time_s), self.speed))

    def rotation(self, time_s: float) -> Quaternion:
        """Ego -> global rotation (stored in ``ego_pose`` as ``(w, x, y, z)``)."""
        return yaw_pitch_roll_quaternion(self.yaw(time_s))

    def pose(self, time_s: float) -> RigidTransform:
        """Ego -> global transform at ``time_s``."""
        y = self.lane_y + self.weave_amplitude * np.sin(2 * np.pi / self.weave_period_s * time_s)
        return RigidTransform(self.rotation(time_s).rotation_matrix, [self.start_x + self.speed * time_s, y, 0.0])


def _token(*parts: Any) -> str:
    """A deterministic 32-hex token, so the same arguments always give the same dataset."""
    return hashlib.md5("|".join(map(str, parts)).encode()).hexdigest()


def synth_nuscenes(
    out_dir: str | Path,
    *,
    scene_names: Sequence[str] = ("scene-0061", "scene-0103"),
    keyframes_per_scene: int = 4,
    sweeps_between_keyframes: int = 9,
    image_width: int = 400,
    lidar_azimuth_steps: int = 720,
    seed: int = 0,
) -> Path:
    """Write a synthetic nuScenes ``v1.0-mini`` dataset (tables, LiDAR, cameras, lidarseg, map).

    Besides the official layout it writes class-level superpixels rendered from the scene
    (``superpixels/semantic/<camera token>.png``, ids as in SuperFlow's openseed_inst17).

    Args:
        out_dir: dataset root (``dataroot``).
        scene_names: official mini scene names (``create_splits_scenes`` puts them in mini_train
            or mini_val).
        keyframes_per_scene: samples (2 Hz keyframes) per scene.
        sweeps_between_keyframes: non-keyframe LiDAR sweeps between two keyframes (9 = 20 Hz).
        image_width: rendered camera width; height and intrinsics follow the 1600x900 rig.
        lidar_azimuth_steps: LiDAR columns per revolution (nuScenes has about 1084).
        seed: randomness of the scenes; the output is a pure function of the arguments.

    Returns:
        ``out_dir``.
    """
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    mini_scenes = [name for split in SPLITS_BY_VERSION[VERSION] for name in splits[split]]
    unknown = [name for name in scene_names if name not in mini_scenes]
    if unknown or len(set(scene_names)) != len(scene_names):
        raise ValueError(f"scene_names must be distinct official mini scenes ({', '.join(mini_scenes)}); "
                         f"got {list(scene_names)}")
    if keyframes_per_scene < 2:
        raise ValueError(f"keyframes_per_scene must be >= 2, got {keyframes_per_scene}")
    writer = _DatasetWriter(Path(out_dir), image_width, lidar_azimuth_steps, seed)
    for scene_number, name in enumerate(scene_names):
        writer.write_scene(scene_number, name, keyframes_per_scene, sweeps_between_keyframes)
    writer.finish()
    return Path(out_dir)


class _DatasetWriter:
    """Accumulates table records while writing sensor files; ``finish`` writes the tables."""

    def __init__(self, root: Path, image_width: int, lidar_azimuth_steps: int, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.tables: dict[str, list[dict]] = {name: [] for name in (*TABLES, "lidarseg")}
        scale = image_width / FULL_IMAGE_SIZE[0]
        self.image_size = (image_width, int(round(FULL_IMAGE_SIZE[1] * scale)))
        self.intrinsic = _FULL_INTRINSIC * np.array([[scale], [scale], [1.0]])
        azimuths = np.linspace(0.0, 2 * np.pi, lidar_azimuth_steps, endpoint=False)
        # Azimuth-major order (all 32 beams of one column together), like a spinning sensor; the
        # ray caster relies on this coherence to cull objects per chunk.
        az, el = np.meshgrid(azimuths, _LIDAR_ELEVATIONS, indexing="ij")
        self.lidar_directions = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)],
                                         -1).reshape(-1, 3)
        self.lidar_rings = np.tile(np.arange(len(_LIDAR_ELEVATIONS), dtype=np.float32), lidar_azimuth_steps)
        self.pixel_rows, self.pixel_cols = _tiled_pixel_grid(*self.image_size)
        self.map_tokens: dict[str, str] = {}
        self._write_static_tables()
        write_superpixel_meta(superpixel_dir(root, SEMANTIC_KIND), SEMANTIC_KIND, len(SEMANTIC_SUPERPIXEL_CLASSES),
                              classes=list(SEMANTIC_SUPERPIXEL_CLASSES))

    # -- static tables -------------------------------------------------------------------------

    def _write_static_tables(self) -> None:
        self.tables["category"] = [
            {"token": _token("category", name), "name": name, "description": f"lidarseg class {name}", "index": index}
            for index, name in enumerate(LIDARSEG_CLASSES)
        ]
        self.tables["attribute"] = [
            {"token": _token("attribute", name), "name": name, "description": name} for name in _ATTRIBUTES
        ]
        self.tables["visibility"] = [
            {"token": str(level), "level": name, "description": f"visibility of whole object is {name}"}
            for level, name in enumerate(_VISIBILITY_LEVELS, start=1)
        ]
        self.tables["sensor"] = [
            {"token": _token("sensor", channel), "channel": channel,
             "modality": "lidar" if channel == LIDAR_CHANNEL else "camera"}
            for channel in (LIDAR_CHANNEL, *CAMERA_CHANNELS)
        ]

    def _write_map(self, location: str, log_token: str) -> None:
        """One semantic-prior map per location; the road band is foreground (255)."""
        if location in self.map_tokens:
            existing = next(m for m in self.tables["map"] if m["token"] == self.map_tokens[location])
            existing["log_tokens"].append(log_token)
            return
        token = _token("map", location)
        filename = f"maps/{token}.png"
        # Devkit map pixel (row r) covers global y = (size - r) * resolution.
        y = (_MAP_SIZE_PX - np.arange(_MAP_SIZE_PX)) * _MAP_RESOLUTION
        road = np.abs(y - _ROAD_Y) < StreetLayout(_ROAD_Y).road_half_width
        mask = np.repeat(np.where(road, 255, 0).astype(np.uint8)[:, None], _MAP_SIZE_PX, axis=1)
        (self.root / "maps").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(self.root / filename)
        self.map_tokens[location] = token
        self.tables["map"].append({"token": token, "log_tokens": [log_token], "category": "semantic_prior",
                                   "filename": filename})

    def _calibrations(self, log_token: str, rng: np.random.Generator) -> dict[str, dict]:
        """``calibrated_sensor`` records of one vehicle; small roll/pitch errors as in real rigs."""
        records = {}
        for channel in (LIDAR_CHANNEL, *CAMERA_CHANNELS):
            position, yaw_deg = _LIDAR_MOUNT if channel == LIDAR_CHANNEL else _CAMERA_MOUNTS[channel]
            roll, pitch = np.deg2rad(rng.normal(0.0, 0.3, 2))
            mount = yaw_pitch_roll_quaternion(np.deg2rad(yaw_deg), pitch, roll)
            rotation = mount if channel == LIDAR_CHANNEL else mount * Quaternion(_OPTICAL_TO_FORWARD)
            records[channel] = {
                "token": _token("calibrated_sensor", log_token, channel),
                "sensor_token": _token("sensor", channel),
                "translation": list(position),
                "rotation": list(rotation.normalised.elements),
                "camera_intrinsic": [] if channel == LIDAR_CHANNEL else self.intrinsic.tolist(),
            }
        self.tables["calibrated_sensor"].extend(records.values())
        return records

    # -- one scene -----------------------------------------------------------------------------

    def write_scene(self, scene_number: int, name: str, n_keyframes: int, n_sweeps: int) -> None:
        rng = np.random.default_rng([self.seed, scene_number])
        site = _SITES[scene_number % len(_SITES)]
        start_us = site["start_us"] + scene_number * 3_600_000_000
        log_name = f"{site['vehicle']}-{site['date']}-{10 + scene_number:02d}-{rng.integers(60):02d}-00"
        log_token = _token("log", log_name)
        self.tables["log"].append({"token": log_token, "logfile": log_name, "vehicle": site["vehicle"],
                                   "date_captured": site["date"], "location": site["location"]})
        self._write_map(site["location"], log_token)
        calibrations = self._calibrations(log_token, rng)
        trajectory = _EgoTrajectory(start_x=rng.uniform(70.0, 75.0), lane_y=_ROAD_Y + _EGO_LANE_OFFSET,
                                    speed=rng.uniform(4.0, 6.0))
        world, instances = make_world(rng, StreetLayout(_ROAD_Y), (trajectory.start_x - 75, trajectory.start_x + 85),
                                      trajectory.lane_y)

        scene_token = _token("scene", name)
        sample_tokens = [_token("sample", name, k) for k in range(n_keyframes)]
        keyframe_us = [start_us + k * _KEYFRAME_INTERVAL_US for k in range(n_keyframes)]
        samples = [{"token": token, "timestamp": keyframe_us[k], "scene_token": scene_token, "prev": "", "next": ""}
                   for k, token in enumerate(sample_tokens)]
        _link(samples)
        self.tables["sample"].extend(samples)
        self.tables["scene"].append({
            "token": scene_token, "log_token": log_token, "nbr_samples": n_keyframes, "name": name,
            "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
            "description": "synthetic street: parked and oncoming cars, pedestrians, road works",
        })

        def seconds(timestamp_us: int) -> float:
            return (timestamp_us - start_us) / 1e6

        # LiDAR: keyframes plus evenly spaced sweeps in between; a sweep belongs to the next sample.
        lidar_frames = []
        for k in range(n_keyframes):
            lidar_frames.append((keyframe_us[k], k, True))
            if k + 1 < n_keyframes:
                step = _KEYFRAME_INTERVAL_US // (n_sweeps + 1)
                lidar_frames += [(keyframe_us[k] + j * step, k + 1, False) for j in range(1, n_sweeps + 1)]
        keyframe_hits = {}
        lidar_records = []
        for timestamp, sample_index, is_key in lidar_frames:
            record, hits = self._write_lidar(log_name, calibrations[LIDAR_CHANNEL], trajectory, world, timestamp,
                                             seconds(timestamp), sample_tokens[sample_index], is_key)
            lidar_records.append(record)
            if is_key:
                keyframe_hits[sample_index] = hits
        _link(lidar_records)

        # Cameras: keyframes only; each camera fires as the spinning LiDAR sweeps across it.
        for channel in CAMERA_CHANNELS:
            camera_records = []
            for k in range(n_keyframes):
                timestamp = keyframe_us[k] + _camera_delay_us(_CAMERA_MOUNTS[channel][1])
                camera_records.append(self._write_camera(log_name, channel, calibrations[channel], trajectory, world,
                                                         timestamp, seconds(timestamp), sample_tokens[k]))
            _link(camera_records)

        self._write_annotations(name, world, instances, trajectory, sample_tokens,
                                [seconds(t) for t in keyframe_us], keyframe_hits)

    def _ego_pose(self, sample_data_token: str, trajectory: _EgoTrajectory, timestamp: int, time_s: float) -> str:
        """Write the ego pose of one sample_data (one pose per sample_data, as in nuScenes)."""
        token = _token("ego_pose", sample_data_token)
        self.tables["ego_pose"].append({
            "token": token, "timestamp": timestamp, "rotation": list(trajectory.rotation(time_s).elements),
            "translation": trajectory.pose(time_s).translation.tolist(),
        })
        return token

    def _write_lidar(self, log_name: str, calibration: dict, trajectory: _EgoTrajectory, world: World,
                     timestamp: int, time_s: float, sample_token: str, is_key: bool) -> tuple[dict, np.ndarray]:
        lidar_to_global = trajectory.pose(time_s) @ RigidTransform.from_record(calibration)
        hits = world.cast(lidar_to_global.translation, self.lidar_directions @ lidar_to_global.rotation.T, time_s)
        kept = hits.hit & (hits.distance < _LIDAR_MAX_RANGE)
        # Rays leave the sensor origin, so a hit in the LiDAR frame is its direction times its range.
        xyz = self.lidar_directions[kept] * hits.distance[kept, None]
        intensity = hits.intensity(self.lidar_directions @ lidar_to_global.rotation.T)[kept]
        points = np.column_stack([xyz, intensity, self.lidar_rings[kept]]).astype(np.float32)
        folder = "samples" if is_key else "sweeps"
        filename = f"{folder}/{LIDAR_CHANNEL}/{log_name}__{LIDAR_CHANNEL}__{timestamp}.pcd.bin"
        self._write_bytes(filename, points.tobytes())
        token = _token("sample_data", log_name, LIDAR_CHANNEL, timestamp)
        if is_key:
            lidarseg_file = f"lidarseg/{VERSION}/{token}_lidarseg.bin"
            self._write_bytes(lidarseg_file, hits.label[kept].astype(np.uint8).tobytes())
            # The devkit, SLidR and mmdet3d look lidarseg up by the LiDAR sample_data token.
            self.tables["lidarseg"].append({"token": token, "sample_data_token": token, "filename": lidarseg_file})
        ego_pose_token = self._ego_pose(token, trajectory, timestamp, time_s)
        record = self._sample_data(token, sample_token, ego_pose_token, calibration, filename, "pcd", timestamp,
                                   is_key, (0, 0))
        points_per_instance = np.bincount(hits.instance[kept & (hits.instance >= 0)], minlength=world.n_instances)
        return record, points_per_instance

    def _write_camera(self, log_name: str, channel: str, calibration: dict, trajectory: _EgoTrajectory,
                      world: World, timestamp: int, time_s: float, sample_token: str) -> dict:
        camera_to_global = trajectory.pose(time_s) @ RigidTransform.from_record(calibration)
        # Pixel (row, col) is the continuous image point (u, v) = (col, row): the devkit's
        # projection followed by rounding lands on the pixel whose ray was cast here.
        pixels = np.stack([self.pixel_cols, self.pixel_rows, np.ones(len(self.pixel_rows))], -1)
        rays = pixels @ np.linalg.inv(self.intrinsic).T
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        directions = rays @ camera_to_global.rotation.T
        hits = world.cast(camera_to_global.translation, directions, time_s)
        width, height = self.image_size
        rgb = np.zeros((height, width, 3), dtype=np.uint8)
        rgb[self.pixel_rows, self.pixel_cols] = hits.shaded_colours(_LIGHT)
        semantic = np.full((height, width), SEMANTIC_IGNORE_ID, dtype=np.uint8)
        hit = hits.hit
        semantic[self.pixel_rows[hit], self.pixel_cols[hit]] = np.asarray(LIDARSEG_TO_SEMANTIC)[hits.label[hit]]

        filename = f"samples/{channel}/{log_name}__{channel}__{timestamp}.jpg"
        (self.root / filename).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(self.root / filename, quality=92)
        token = _token("sample_data", log_name, channel, timestamp)
        save_superpixels(superpixel_dir(self.root, SEMANTIC_KIND) / f"{token}.png", semantic)
        ego_pose_token = self._ego_pose(token, trajectory, timestamp, time_s)
        return self._sample_data(token, sample_token, ego_pose_token, calibration, filename, "jpg", timestamp, True,
                                 self.image_size)

    def _sample_data(self, token: str, sample_token: str, ego_pose_token: str, calibration: dict, filename: str,
                     fileformat: str, timestamp: int, is_key: bool, size: tuple[int, int]) -> dict:
        record = {
            "token": token, "sample_token": sample_token, "ego_pose_token": ego_pose_token,
            "calibrated_sensor_token": calibration["token"], "timestamp": timestamp, "fileformat": fileformat,
            "is_key_frame": is_key, "height": size[1], "width": size[0], "filename": filename,
            "prev": "", "next": "",
        }
        self.tables["sample_data"].append(record)
        return record

    def _write_annotations(self, scene_name: str, world: World, instances: list[dict], trajectory: _EgoTrajectory,
                           sample_tokens: list[str], times_s: list[float], keyframe_hits: dict[int, np.ndarray],
                           max_distance: float = 50.0) -> None:
        """One box per annotated object within ``max_distance`` of the ego at each keyframe."""
        attribute_token = {name: _token("attribute", name) for name in _ATTRIBUTES}
        for instance_id, info in enumerate(instances):
            obj = next(o for o in world.objects if o.instance == instance_id)
            records = []
            for k, (sample_token, time_s) in enumerate(zip(sample_tokens, times_s)):
                position = obj.position_at(time_s)
                centre = position + np.array([0.0, 0.0, obj.size[2] / 2]) if obj.shape == "cylinder" else position
                if np.linalg.norm(centre[:2] - trajectory.pose(time_s).translation[:2]) > max_distance:
                    continue
                category = info["category"]
                if category.startswith("vehicle."):
                    attributes = [attribute_token["vehicle.moving" if info["moving"] else "vehicle.parked"]]
                elif category.startswith("human."):
                    attributes = [attribute_token["pedestrian.moving" if info["moving"] else "pedestrian.standing"]]
                else:
                    attributes = []
                records.append({
                    "token": _token("sample_annotation", scene_name, instance_id, k),
                    "sample_token": sample_token, "instance_token": _token("instance", scene_name, instance_id),
                    "visibility_token": "4", "attribute_tokens": attributes,
                    "translation": centre.tolist(), "size": obj.size.tolist(),
                    "rotation": list(yaw_pitch_roll_quaternion(obj.yaw).elements),
                    "num_lidar_pts": int(keyframe_hits[k][instance_id]), "num_radar_pts": 0,
                    "prev": "", "next": "",
                })
            if not records:
                continue
            _link(records)
            self.tables["sample_annotation"].extend(records)
            self.tables["instance"].append({
                "token": _token("instance", scene_name, instance_id),
                "category_token": _token("category", info["category"]), "nbr_annotations": len(records),
                "first_annotation_token": records[0]["token"], "last_annotation_token": records[-1]["token"],
            })

    # -- output --------------------------------------------------------------------------------

    def _write_bytes(self, relative: str, payload: bytes) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)

    def finish(self) -> None:
        table_dir = self.root / VERSION
        table_dir.mkdir(parents=True, exist_ok=True)
        for name, records in self.tables.items():
            (table_dir / f"{name}.json").write_text(json.dumps(records, indent=1))


def _link(records: list[dict]) -> None:
    """Fill ``prev``/``next`` of time-ordered records of one chain ('' at both ends)."""
    for before, after in zip(records, records[1:]):
        before["next"], after["prev"] = after["token"], before["token"]


def _camera_delay_us(yaw_deg: float) -> int:
    """Delay after the LiDAR keyframe at which a camera fires: when the sensor's 20 Hz spin
    (clockwise, starting 30 degrees left of the front) crosses the camera's viewing direction."""
    return int(round(((30.0 - yaw_deg) % 360.0) / 360.0 * _LIDAR_PERIOD_US))


def _tiled_pixel_grid(width: int, height: int, tile: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of every pixel, ``(H*W,)`` each, ordered tile by tile so that consecutive
    camera rays point in nearly the same direction (see ``World.cast``)."""
    rows, cols = np.mgrid[0:height, 0:width]
    tile_id = (rows // tile) * ((width + tile - 1) // tile) + cols // tile
    order = np.argsort(tile_id.ravel(), kind="stable")
    return rows.ravel()[order], cols.ravel()[order]

