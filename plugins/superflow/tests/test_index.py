"""The info index: entries, temporal neighbours, sweeps, splits, label fractions and the JSON cache."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pyquaternion import Quaternion

import accord_superflow.data.index as index_module
from accord_superflow.data import (
    InfoIndex,
    RigidTransform,
    dataset_cache_key,
    label_fraction_scenes,
    label_fraction_subset,
    load_info_index,
    sensor_to_sensor,
    split_scene_names,
)
from accord_superflow.data.schema import CAMERA_CHANNELS, LIDAR_CHANNEL

VERSION = "v1.0-mini"


def _rz(degrees: float) -> np.ndarray:
    return Quaternion(axis=[0, 0, 1], degrees=degrees).rotation_matrix


def _tables(root: Path, name: str) -> list[dict]:
    return json.loads((root / VERSION / f"{name}.json").read_text())


def _write_table(root: Path, name: str, records: list[dict]) -> None:
    (root / VERSION / f"{name}.json").write_text(json.dumps(records))


def test_entries_match_the_tables(nusc, nuscenes_root: Path, tmp_path: Path) -> None:
    index = load_info_index(nuscenes_root, VERSION, "mini_val", max_sweeps=10, cache_dir=tmp_path)
    assert index.scene_names() == ["scene-0103"] and len(index) == 4
    for position, keyframe in enumerate(index.keyframes):
        sample = nusc.get("sample", keyframe.sample_token)
        assert keyframe.index == position and keyframe.timestamp == sample["timestamp"]
        lidar = nusc.get("sample_data", sample["data"][LIDAR_CHANNEL])
        assert keyframe.lidar.sample_data_token == lidar["token"] and keyframe.lidar.path == lidar["filename"]
        calibration = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
        np.testing.assert_allclose(keyframe.lidar.sensor_to_ego.rotation,
                                   Quaternion(calibration["rotation"]).rotation_matrix)
        pose = nusc.get("ego_pose", lidar["ego_pose_token"])
        np.testing.assert_allclose(keyframe.lidar.ego_to_global.translation, pose["translation"])
        assert list(keyframe.cameras) == list(CAMERA_CHANNELS)
        for channel, camera in keyframe.cameras.items():
            record = nusc.get("sample_data", sample["data"][channel])
            assert camera.sample_data_token == record["token"] and (camera.width, camera.height) == (400, 225)
            calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
            np.testing.assert_allclose(camera.intrinsic, calibration["camera_intrinsic"])
            assert camera.ego_to_global.translation[0] != keyframe.lidar.ego_to_global.translation[0]  # own timestamp
        assert keyframe.lidarseg_path == nusc.get("lidarseg", lidar["token"])["filename"]
        # Previous scans, nearest first, 20 Hz, running through the previous keyframe.
        assert len(keyframe.sweeps) == (0 if position == 0 else 10)
        if position:
            gaps = keyframe.timestamp - np.array([s.timestamp for s in keyframe.sweeps])
            np.testing.assert_array_equal(gaps, 50_000 * np.arange(1, 11))
            assert [s.is_key_frame for s in keyframe.sweeps] == [False] * 9 + [True]
            assert keyframe.sweeps[0].path.startswith(f"sweeps/{LIDAR_CHANNEL}/")


def test_sweep_transform_hand_computed() -> None:
    """sweep LiDAR -> ego(t_s) -> global -> ego(t_k) -> keyframe LiDAR, worked by hand."""
    lidar_to_ego = RigidTransform(_rz(-90), [1.0, 0.0, 2.0])
    sweep_pose = RigidTransform(_rz(90), [10.0, 0.0, 0.0])
    key_pose = RigidTransform(np.eye(3), [10.0, 5.0, 0.0])
    sweep_to_key = sensor_to_sensor(lidar_to_ego, sweep_pose, lidar_to_ego, key_pose)
    # (1,2,0) -> ego (3,-1,2) -> global (11,3,2) -> key ego (1,-2,2) -> key LiDAR (2,0,0).
    np.testing.assert_allclose(sweep_to_key.apply(np.array([[1.0, 2.0, 0.0]])), [[2.0, 0.0, 0.0]], atol=1e-12)
    # mmdet3d's sweep formula (issue #3054) evaluates to R p + R^T t, which is wrong here.
    rotation, translation = sweep_to_key.rotation, sweep_to_key.translation
    assert not np.allclose(rotation @ [1.0, 2.0, 0.0] + rotation.T @ translation, [2.0, 0.0, 0.0])


def test_sweeps_align_like_devkit_multisweep(nusc, nuscenes_root: Path, tmp_path: Path) -> None:
    from nuscenes.utils.data_classes import LidarPointCloud

    keyframe = load_info_index(nuscenes_root, VERSION, "mini_train", max_sweeps=2, cache_dir=tmp_path).keyframes[2]
    clouds = [np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)[:, :3]]
    for sweep in keyframe.sweeps:
        points = np.fromfile(nuscenes_root / sweep.path, dtype=np.float32).reshape(-1, 5)[:, :3]
        clouds.append(sweep.sweep_to_keyframe.apply(points))
    ours = np.concatenate(clouds)
    sample = nusc.get("sample", keyframe.sample_token)
    theirs, _ = LidarPointCloud.from_file_multisweep(nusc, sample, LIDAR_CHANNEL, LIDAR_CHANNEL, nsweeps=3,
                                                     min_distance=0.0)
    assert theirs.points.shape[1] == len(ours)
    np.testing.assert_allclose(theirs.points[:3].T, ours, atol=1e-3)


def test_neighbours_follow_links_and_stay_in_their_scene(tiny_root: Path, tmp_path: Path) -> None:
    index = load_info_index(tiny_root, VERSION, "mini_train", cache_dir=tmp_path / "a")
    assert index.scene_names() == ["scene-0061", "scene-0553"] and len(index) == 6
    links = [(k.prev_index, k.next_index) for k in index.keyframes]
    assert links == [(None, 1), (0, 2), (1, None), (None, 4), (3, 5), (4, None)]
    for keyframe in index.keyframes:
        for neighbour in (keyframe.prev_index, keyframe.next_index):
            if neighbour is not None:
                assert index.keyframes[neighbour].scene_name == keyframe.scene_name
    assert not index.keyframes[3].sweeps

    # Table order does not matter: shuffled samples and sample_data give the same index.
    for name in ("sample", "sample_data"):
        records = _tables(tiny_root, name)
        random.Random(0).shuffle(records)
        _write_table(tiny_root, name, records)
    shuffled = load_info_index(tiny_root, VERSION, "mini_train", cache_dir=tmp_path / "b")
    assert shuffled.cache_key != index.cache_key
    assert json.dumps([k.to_json() for k in shuffled.keyframes]) == json.dumps([k.to_json() for k in index.keyframes])

    # Links into another scene (sample or LiDAR chain) are neither neighbours nor sweeps, and do
    # not pull that scene's samples into this one.
    samples = {s["token"]: s for s in _tables(tiny_root, "sample")}
    samples[index.keyframes[2].sample_token]["next"] = index.keyframes[3].sample_token
    samples[index.keyframes[3].sample_token]["prev"] = index.keyframes[2].sample_token
    _write_table(tiny_root, "sample", list(samples.values()))
    sample_data = {r["token"]: r for r in _tables(tiny_root, "sample_data")}
    sample_data[index.keyframes[3].lidar.sample_data_token]["prev"] = index.keyframes[2].lidar.sample_data_token
    _write_table(tiny_root, "sample_data", list(sample_data.values()))
    corrupted = load_info_index(tiny_root, VERSION, "mini_train", cache_dir=tmp_path / "c")
    assert [(k.prev_index, k.next_index) for k in corrupted.keyframes] == links
    assert not corrupted.keyframes[3].sweeps


def test_official_splits(tiny_root: Path, tmp_path: Path) -> None:
    assert "scene-0061" in split_scene_names(VERSION, "mini_train")
    assert split_scene_names(VERSION, "mini_val") == ["scene-0103", "scene-0916"]
    assert len(split_scene_names("v1.0-trainval", "train")) == 700
    val = load_info_index(tiny_root, VERSION, "mini_val", cache_dir=tmp_path)
    assert val.scene_names() == ["scene-0103"] and val.split == "mini_val"
    with pytest.raises(ValueError, match="not a v1.0-mini split"):
        load_info_index(tiny_root, VERSION, "train", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown nuScenes version"):
        split_scene_names("v2.0", "train")


def test_label_fraction_scenes_follow_slidr_skip() -> None:
    names = [f"scene-{i:04d}" for i in range(1, 701)]
    assert label_fraction_scenes(names, 1) == [names[i] for i in range(99, 700, 100)]
    assert [len(label_fraction_scenes(names, p)) for p in (1, 5, 10, 25, 100)] == [7, 35, 70, 175, 700]
    assert label_fraction_scenes(names, 25)[:2] == ["scene-0004", "scene-0008"]
    with pytest.raises(ValueError, match="expected one of"):
        label_fraction_scenes(names, 50)
    with pytest.raises(ValueError, match="keeps none"):
        label_fraction_scenes(names[:8], 10)


def test_label_fraction_subset_reindexes(tiny_root: Path, tmp_path: Path) -> None:
    index = load_info_index(tiny_root, VERSION, "mini_train", cache_dir=tmp_path)
    # Eight scenes: the two real ones, copied under new names.
    keyframes = [replace(k, index=k.index + 6 * copy, scene_name=f"{k.scene_name}-{copy}",
                         prev_index=None if k.prev_index is None else k.prev_index + 6 * copy,
                         next_index=None if k.next_index is None else k.next_index + 6 * copy)
                 for copy in range(4) for k in index.keyframes]
    eight = replace(index, keyframes=keyframes)
    subset = label_fraction_subset(eight, 25)
    assert subset.scene_names() == ["scene-0553-1", "scene-0553-3"]
    assert [k.index for k in subset.keyframes] == list(range(6))
    assert [(k.prev_index, k.next_index) for k in subset.keyframes] == [(None, 1), (0, 2), (1, None),
                                                                        (None, 4), (3, 5), (4, None)]
    assert subset.keyframes[0].sample_token == index.keyframes[3].sample_token
    assert label_fraction_subset(index, 100).to_json() == index.to_json()


def test_cache_round_trip_and_invalidation(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    original_build = index_module.build_info_index

    def counting_build(*args, **kwargs):
        built.append(args[1:])
        return original_build(*args, **kwargs)

    monkeypatch.setattr(index_module, "build_info_index", counting_build)
    first = load_info_index(tiny_root, VERSION, "mini_train", max_sweeps=2, cache_dir=tmp_path)
    cache_file = tmp_path / f"infos_{VERSION}_mini_train_sweeps2.json"
    stored = json.loads(cache_file.read_text())  # plain JSON, nothing executable
    assert stored["cache_key"] == first.cache_key == dataset_cache_key(tiny_root, VERSION)

    second = load_info_index(tiny_root, VERSION, "mini_train", max_sweeps=2, cache_dir=tmp_path)
    assert len(built) == 1
    assert second.to_json() == first.to_json()
    np.testing.assert_array_equal(second.keyframes[1].sweeps[0].sweep_to_keyframe.rotation,
                                  first.keyframes[1].sweeps[0].sweep_to_keyframe.rotation)

    # Another parameter is another cache file; the first one stays valid.
    load_info_index(tiny_root, VERSION, "mini_train", max_sweeps=1, cache_dir=tmp_path)
    load_info_index(tiny_root, VERSION, "mini_train", max_sweeps=2, cache_dir=tmp_path)
    assert len(built) == 2

    # Editing a table changes the key and rebuilds.
    scenes = _tables(tiny_root, "scene")
    scenes[0]["description"] += " (edited)"
    _write_table(tiny_root, "scene", scenes)
    rebuilt = load_info_index(tiny_root, VERSION, "mini_train", max_sweeps=2, cache_dir=tmp_path)
    assert len(built) == 3 and rebuilt.cache_key != first.cache_key

    # A damaged or foreign cache file is rebuilt, never trusted.
    cache_file.write_text('{"format": 1, "cache_key": "' + rebuilt.cache_key + '", "keyframes": [{"index": "x"}]}')
    load_info_index(tiny_root, VERSION, "mini_train", max_sweeps=2, cache_dir=tmp_path)
    assert len(built) == 4
    with pytest.raises(ValueError, match="format"):
        InfoIndex.from_json({"format": 0})
    foreign = rebuilt.to_json()
    foreign["keyframes"][2]["next_index"] = 3  # into the next scene
    with pytest.raises(ValueError, match="not a keyframe of its scene"):
        InfoIndex.from_json(foreign)
