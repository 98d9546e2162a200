"""Validate a nuScenes dataset on disk without the devkit, reporting every problem at once.

``NuScenes()`` stops at the first inconsistency, and many (missing sensor files, label counts,
broken calibrations) only surface deep inside training. This checker reads the JSON tables
directly and names the table record (``<version>/<table>.json[<token>]``) or file of each problem.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accord.registry import Problem
from PIL import Image

from accord_superflow.data.index import split_scene_names
from accord_superflow.data.schema import LIDARSEG_CLASSES, POINT_DIMS, SPLITS_BY_VERSION, TABLES
from accord_superflow.data.superpixels import (
    META_FILE,
    SEMANTIC_KIND,
    SUPERPIXELS_DIR,
    load_superpixels,
    read_superpixel_meta,
)

__all__ = ["check_nuscenes", "require_valid"]

log = logging.getLogger(__name__)

# (table, field, referenced table, how): "one" must resolve, "link" may be '' (chain ends),
# "many" is a list of tokens.
_FOREIGN_KEYS = (
    ("calibrated_sensor", "sensor_token", "sensor", "one"),
    ("sample_data", "sample_token", "sample", "one"),
    ("sample_data", "ego_pose_token", "ego_pose", "one"),
    ("sample_data", "calibrated_sensor_token", "calibrated_sensor", "one"),
    ("sample_data", "prev", "sample_data", "link"),
    ("sample_data", "next", "sample_data", "link"),
    ("sample", "scene_token", "scene", "one"),
    ("sample", "prev", "sample", "link"),
    ("sample", "next", "sample", "link"),
    ("scene", "log_token", "log", "one"),
    ("scene", "first_sample_token", "sample", "one"),
    ("scene", "last_sample_token", "sample", "one"),
    ("instance", "category_token", "category", "one"),
    ("instance", "first_annotation_token", "sample_annotation", "one"),
    ("instance", "last_annotation_token", "sample_annotation", "one"),
    ("sample_annotation", "sample_token", "sample", "one"),
    ("sample_annotation", "instance_token", "instance", "one"),
    ("sample_annotation", "visibility_token", "visibility", "one"),
    ("sample_annotation", "attribute_tokens", "attribute", "many"),
    ("sample_annotation", "prev", "sample_annotation", "link"),
    ("sample_annotation", "next", "sample_annotation", "link"),
    ("map", "log_tokens", "log", "many"),
    ("lidarseg", "sample_data_token", "sample_data", "one"),
)
_UNIT_TOLERANCE = 1e-3
_POINT_BYTES = POINT_DIMS * 4


def require_valid(root: str | Path, version: str | None = None, splits: Sequence[str] = ()) -> None:
    """Raise if :func:`check_nuscenes` finds anything.

    Args:
        root: dataset root.
        version: the table version training will load (``data.version``); ``None``: every one present.
        splits: the official splits training will read (``data.split`` ...), all of ``version``.

    Raises:
        ValueError: one line per problem.
    """
    log.info("checking %s (version %s, splits %s)", root, version or "all", ", ".join(splits) or "all")
    problems = check_nuscenes(root, version=version, splits=splits)
    if problems:
        raise ValueError(f"{root}: nuScenes dataset check failed ({len(problems)} problems):\n"
                         + "\n".join(map(str, problems)))


def check_nuscenes(root: str | Path, version: str | None = None, splits: Sequence[str] = ()) -> list[Problem]:
    """Check the table directory of ``version`` (default: every ``v1.0-*`` one) and the superpixels.

    Reports: a missing ``version`` directory (naming the versions present) or an unknown one;
    splits that are not splits of ``version`` or none of whose scenes is in ``scene.json``;
    missing or unreadable tables (and then nothing else of that version: every other check
    resolves records across tables and would repeat the cause dozens of times); records without a
    token; tokens that do not resolve; logs without a map; samples linked across scenes; missing
    sensor, map and lidarseg files; keyframe camera images that do not decode completely (what
    training reads; other camera images only need to exist) or whose size differs from their
    record; LiDAR files that are empty, not rows of 5 float32 or hold NaN or Inf values; lidarseg
    label counts that differ from the point count; lidarseg records not keyed by their LiDAR
    token; categories without a valid lidarseg ``index``; rotations that are not unit quaternions;
    malformed camera intrinsics; superpixel maps with a wrong size or ids out of range.

    Every LiDAR file and keyframe image is read in full, so on the full dataset this takes as long
    as reading those files once.

    Args:
        root: dataset root.
        version: the table version training will load; ``None`` checks every one present.
        splits: official splits of ``version`` that training will read.

    Returns:
        One :class:`Problem` per issue; empty when the dataset is valid.

    Raises:
        ValueError: ``splits`` without a ``version``.
    """
    root = Path(root)
    if splits and version is None:
        raise ValueError(f"splits {list(splits)} need the version they belong to")
    if not root.is_dir():
        return [Problem(str(root), "dataset root is not a directory")]
    present = sorted(v for v in SPLITS_BY_VERSION if (root / v).is_dir())
    if version is not None and version not in SPLITS_BY_VERSION:
        return [Problem(str(root), f"unknown nuScenes version {version!r}; expected one of "
                                   f"{', '.join(SPLITS_BY_VERSION)}")]
    if version is not None and version not in present:
        found = f"this dataset has {', '.join(present)}" if present else "this dataset has no version directory"
        return [Problem(str(root / version), f"missing table directory of the requested version {version}; {found}")]
    if not present:
        return [Problem(str(root), f"no table directory; expected one of {', '.join(SPLITS_BY_VERSION)}")]
    problems: list[Problem] = []
    camera_sizes: dict[str, tuple[int, int]] = {}
    keyframe_cameras: set[str] = set()
    tables_complete = True
    for checked in present if version is None else [version]:
        checker = _VersionChecker(root, checked, splits)
        problems += checker.run()
        camera_sizes.update(checker.camera_sizes)
        keyframe_cameras |= checker.keyframe_cameras
        tables_complete &= checker.tables_complete
    if tables_complete:  # else no camera is known and every superpixel map would be reported
        problems += _check_superpixels(root, camera_sizes, keyframe_cameras)
    return problems


class _VersionChecker:
    """The checks of one ``<root>/<version>/`` table directory."""

    def __init__(self, root: Path, version: str, splits: Sequence[str]) -> None:
        self.root = root
        self.version = version
        self.splits = tuple(splits)
        self.problems: list[Problem] = []
        self.tables: dict[str, dict[str, dict]] = {}
        self.camera_sizes: dict[str, tuple[int, int]] = {}
        self.keyframe_cameras: set[str] = set()
        self.tables_complete = False

    def report(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def record(self, table: str, token: str) -> str:
        return f"{self.version}/{table}.json[{token}]"

    def run(self) -> list[Problem]:
        for table in TABLES:
            self._load(table, required=True)
        self.tables_complete = all(table in self.tables for table in TABLES)
        self._check_splits()
        if not self.tables_complete:
            return self.problems
        self._load("lidarseg", required=False)
        self._check_references()
        self._check_maps_and_logs()
        self._check_scene_links()
        self._check_rotations()
        self._check_categories()
        self._check_sample_data_files()
        self._check_lidarseg()
        return self.problems

    def _load(self, table: str, required: bool) -> None:
        path = self.root / self.version / f"{table}.json"
        if not path.is_file():
            if required:
                self.report(str(path), "missing table; NuScenes() needs all 13 tables")
            return
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.report(str(path), f"unreadable JSON ({exc})")
            return
        if not isinstance(records, list):
            self.report(str(path), "expected a JSON list of records")
            return
        by_token = {}
        for position, record in enumerate(records):
            token = record.get("token") if isinstance(record, dict) else None
            if not isinstance(token, str) or not token:
                self.report(f"{self.version}/{table}.json[{position}]", "record without a string 'token'")
                continue
            by_token[token] = record
        self.tables[table] = by_token

    def _check_splits(self) -> None:
        """Each split is one of this version's, and at least one of its scenes is in scene.json."""
        names = {record.get("name") for record in self.tables.get("scene", {}).values()}
        for split in self.splits:
            try:
                scenes = split_scene_names(self.version, split)
            except ValueError as exc:
                self.report(str(self.root / self.version), str(exc))
                continue
            if "scene" in self.tables and not names & set(scenes):
                self.report(f"{self.version}/scene.json", f"none of the {len(scenes)} scenes of split {split!r} is "
                                                          "in the table; training on it would find no keyframes")

    def _check_references(self) -> None:
        for table, field, target, how in _FOREIGN_KEYS:
            if table not in self.tables:
                continue  # lidarseg, the one optional table
            targets = self.tables[target]
            for token, record in self.tables[table].items():
                if field not in record:
                    self.report(self.record(table, token), f"missing field '{field}'")
                    continue
                value = record[field]
                values = value if how == "many" and isinstance(value, list) else [value]
                if how == "many" and not isinstance(value, list):
                    self.report(self.record(table, token), f"'{field}' must be a list of {target} tokens")
                    continue
                for ref in values:
                    if how == "link" and ref == "":
                        continue
                    if not isinstance(ref, str) or ref not in targets:
                        self.report(self.record(table, token),
                                    f"{field} {ref!r} does not resolve to a token of {target}.json")

    def _check_maps_and_logs(self) -> None:
        if not self.tables["map"]:
            self.report(f"{self.version}/map.json", "empty; NuScenes() needs at least one map")
        mapped = {log for m in self.tables["map"].values() if isinstance(m.get("log_tokens"), list)
                  for log in m["log_tokens"]}
        for token in self.tables["log"]:
            if token not in mapped:
                self.report(self.record("log", token), "log is in no map's log_tokens")
        for token, record in self.tables["map"].items():
            self._require_file(record.get("filename"), f"map {token}")

    def _check_scene_links(self) -> None:
        samples = self.tables.get("sample", {})
        for token, record in samples.items():
            for link in ("prev", "next"):
                neighbour = samples.get(record.get(link, ""))
                if neighbour is not None and neighbour.get("scene_token") != record.get("scene_token"):
                    self.report(self.record("sample", token),
                                f"{link} sample {record[link]} belongs to another scene")

    def _check_rotations(self) -> None:
        for table in ("calibrated_sensor", "ego_pose"):
            for token, record in self.tables.get(table, {}).items():
                where = self.record(table, token)
                message = _quaternion_problem(record.get("rotation"))
                if message:
                    self.report(where, message)
                if not _is_finite_vector(record.get("translation"), 3):
                    self.report(where, f"translation {record.get('translation')!r} is not 3 finite numbers")
        sensors = self.tables.get("sensor", {})
        for token, record in self.tables.get("calibrated_sensor", {}).items():
            if sensors.get(record.get("sensor_token"), {}).get("modality") == "camera":
                message = _intrinsic_problem(record.get("camera_intrinsic"))
                if message:
                    self.report(self.record("calibrated_sensor", token), message)

    def _check_categories(self) -> None:
        if "lidarseg" not in self.tables:
            return
        for token, record in self.tables.get("category", {}).items():
            name, index = record.get("name"), record.get("index")
            if name not in LIDARSEG_CLASSES:
                self.report(self.record("category", token), f"name {name!r} is not a lidarseg class")
            elif index != LIDARSEG_CLASSES.index(name):
                official = LIDARSEG_CLASSES.index(name)
                self.report(self.record("category", token),
                            f"lidarseg index {index!r} of {name!r}; the official index is {official}")

    def _sensor_of(self, sample_data: dict) -> dict:
        calibration = self.tables.get("calibrated_sensor", {}).get(sample_data.get("calibrated_sensor_token"), {})
        return self.tables.get("sensor", {}).get(calibration.get("sensor_token"), {})

    def _check_sample_data_files(self) -> None:
        for token, record in self.tables.get("sample_data", {}).items():
            if "is_key_frame" not in record:
                self.report(self.record("sample_data", token), "missing field 'is_key_frame'")
            path = self._require_file(record.get("filename"), f"sample_data {token}")
            modality = self._sensor_of(record).get("modality")
            if modality == "camera":
                image_size = (record.get("width"), record.get("height"))
                known_size = all(isinstance(v, int) and v > 0 for v in image_size)
                if known_size:
                    self.camera_sizes[token] = image_size
                    if record.get("is_key_frame"):
                        self.keyframe_cameras.add(token)
                else:
                    self.report(self.record("sample_data", token),
                                f"camera width/height {image_size} are not positive integers")
                # Training reads the keyframe images only.
                if path is not None and record.get("is_key_frame"):
                    self._check_image(record["filename"], path, image_size if known_size else None)
            if modality != "lidar" or path is None:
                continue
            size = path.stat().st_size
            if size == 0:
                self.report(record["filename"], f"empty LiDAR scan (sample_data {token})")
            elif size % _POINT_BYTES:
                self.report(record["filename"], f"{size} bytes is not a whole number of {POINT_DIMS}-float32 points")
            else:
                points = np.fromfile(path, dtype=np.float32).reshape(-1, POINT_DIMS)
                bad = int((~np.isfinite(points)).any(axis=1).sum())
                if bad:
                    self.report(record["filename"], f"{bad} of {len(points)} points hold NaN or Inf values "
                                                    f"(sample_data {token}); every value must be finite")

    def _check_image(self, relative: str, path: Path, expected_size: tuple[int, int] | None) -> None:
        """Decode a camera image completely, as training does: PIL decodes lazily, so a cut-off or
        corrupt JPEG opens fine and fails only in ``load()``."""
        try:
            with Image.open(path) as image:
                image.load()
                size = image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            self.report(relative, f"camera image does not decode ({type(exc).__name__}: {exc})")
            return
        if expected_size is not None and size != expected_size:
            self.report(relative, f"camera image is {size[0]}x{size[1]}, its sample_data record says "
                                  f"{expected_size[0]}x{expected_size[1]}")

    def _check_lidarseg(self) -> None:
        if "lidarseg" not in self.tables:
            return
        sample_data = self.tables.get("sample_data", {})
        label_dir = self.root / "lidarseg" / self.version
        n_files = len(list(label_dir.glob("*.bin"))) + len(list(label_dir.glob("*.npz"))) if label_dir.is_dir() else 0
        if n_files != len(self.tables["lidarseg"]):
            self.report(str(label_dir), f"{n_files} label files for {len(self.tables['lidarseg'])} lidarseg records "
                                        "(NuScenes() asserts they are equal)")
        for token, record in self.tables["lidarseg"].items():
            where = self.record("lidarseg", token)
            lidar_token = record.get("sample_data_token")
            if token != lidar_token:
                self.report(where, f"token differs from sample_data_token {lidar_token!r}; the devkit looks "
                                   "lidarseg up by the LiDAR sample_data token")
            labels = self._require_file(record.get("filename"), f"lidarseg {token}")
            lidar = sample_data.get(lidar_token)
            if labels is None or lidar is None:
                continue
            points_file = self.root / str(lidar.get("filename", ""))
            if not points_file.is_file() or points_file.stat().st_size % _POINT_BYTES:
                continue  # reported with the sample_data
            n_points = points_file.stat().st_size // _POINT_BYTES
            n_labels = labels.stat().st_size
            if n_labels != n_points:
                self.report(record["filename"], f"{n_labels} labels for {n_points} points in {lidar['filename']}")

    def _require_file(self, relative: Any, owner: str) -> Path | None:
        """The existing file ``root/relative``, or ``None`` after reporting it."""
        if not isinstance(relative, str) or not relative:
            self.report(owner, "missing 'filename'")
            return None
        path = self.root / relative
        if not path.is_file():
            self.report(relative, f"missing file referenced by {owner}")
            return None
        return path


def _is_finite_vector(value: Any, length: int) -> bool:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return array.shape == (length,) and bool(np.isfinite(array).all())


def _quaternion_problem(rotation: Any) -> str | None:
    """Why ``rotation`` is not a unit ``(w, x, y, z)`` quaternion, or ``None``."""
    if not _is_finite_vector(rotation, 4):
        return f"rotation {rotation!r} is not a (w, x, y, z) quaternion of 4 finite numbers"
    norm = float(np.linalg.norm(rotation))
    if abs(norm - 1.0) > _UNIT_TOLERANCE:
        return f"rotation quaternion has norm {norm:.6g}; a rotation needs a unit quaternion"
    return None


def _intrinsic_problem(intrinsic: Any) -> str | None:
    """Why ``intrinsic`` is not a pinhole camera matrix, or ``None``."""
    try:
        matrix = np.asarray(intrinsic, dtype=np.float64)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        return f"camera_intrinsic {intrinsic!r} is not a finite 3x3 matrix"
    if matrix[0, 0] <= 0 or matrix[1, 1] <= 0 or not np.allclose(matrix[2], [0.0, 0.0, 1.0]):
        return "camera_intrinsic needs positive focal lengths and a last row of [0, 0, 1]"
    return None


#: Missing semantic maps are listed one per line up to this many, then counted (a partial
#: directory of full nuScenes would otherwise print hundreds of thousands of lines).
_MAX_LISTED_MISSING_MAPS = 20


def _check_superpixels(root: Path, camera_sizes: dict[str, tuple[int, int]],
                       keyframe_cameras: set[str]) -> list[Problem]:
    """Every ``<root>/superpixels/<kind>/<token>.png``: a camera token, its image's size, ids in range.

    The semantic maps are an input (made elsewhere), so each keyframe camera image needs one;
    SLIC maps are a cache that pretraining fills, so missing ones are fine.
    """
    problems: list[Problem] = []
    base = root / SUPERPIXELS_DIR
    for directory in sorted(d for d in base.iterdir() if d.is_dir()) if base.is_dir() else ():
        relative = directory.relative_to(root)
        try:
            num_ids = read_superpixel_meta(directory)["num_ids"]
        except ValueError as exc:
            problems.append(_problem_from(exc, directory / META_FILE, root))
            continue
        pngs = sorted(directory.glob("*.png"))
        for path in pngs:
            size = camera_sizes.get(path.stem)
            if size is None:
                problems.append(Problem(str(path.relative_to(root)), "not named after a camera sample_data token"))
                continue
            try:
                load_superpixels(path, num_ids, expected_size=size)
            except ValueError as exc:
                problems.append(_problem_from(exc, path, root))
        if directory.name == SEMANTIC_KIND:
            missing = sorted(keyframe_cameras - {path.stem for path in pngs})
            problems += [Problem(str(relative / f"{token}.png"), f"missing semantic superpixel map of keyframe camera "
                                 f"sample_data {token}") for token in missing[:_MAX_LISTED_MISSING_MAPS]]
            if len(missing) > _MAX_LISTED_MISSING_MAPS:
                problems.append(Problem(str(relative), f"{len(missing) - _MAX_LISTED_MISSING_MAPS} more keyframe camera "
                                        f"images have no semantic superpixel map ({len(missing)} in all)"))
    return problems


def _problem_from(exc: ValueError, path: Path, root: Path) -> Problem:
    """A :class:`Problem` at ``path`` relative to ``root`` from a reader's ``"<path>: <message>"`` error."""
    return Problem(str(path.relative_to(root)), str(exc).removeprefix(f"{path}: "))
