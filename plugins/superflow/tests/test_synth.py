"""synth_nuscenes(): the official v1.0-mini layout, loadable and renderable by nuscenes-devkit, with
LiDAR and images of one consistent scene."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from accord_superflow.data import load_info_index, pair_points_with_cameras, synth_nuscenes
from accord_superflow.data.schema import CAMERA_CHANNELS, LIDAR_CHANNEL, LIDARSEG_CLASSES, TABLES
from accord_superflow.data.world import CLASS_COLOURS, SKY_COLOUR

VERSION = "v1.0-mini"
TOKEN = re.compile(r"^[0-9a-f]{32}$")


def _table(root: Path, name: str) -> list[dict]:
    return json.loads((root / VERSION / f"{name}.json").read_text())


def test_layout_tables_and_files(nuscenes_root: Path) -> None:
    for name in (*TABLES, "lidarseg"):
        assert (nuscenes_root / VERSION / f"{name}.json").is_file(), name
    categories = _table(nuscenes_root, "category")
    assert [(c["name"], c["index"]) for c in categories] == [(n, i) for i, n in enumerate(LIDARSEG_CLASSES)]
    assert [s["name"] for s in _table(nuscenes_root, "scene")] == ["scene-0061", "scene-0103"]
    for name in ("sample", "sample_data", "ego_pose", "calibrated_sensor", "instance", "sample_annotation", "scene"):
        assert all(TOKEN.match(r["token"]) for r in _table(nuscenes_root, name)), name
    for map_record in _table(nuscenes_root, "map"):
        assert (nuscenes_root / map_record["filename"]).is_file()
    sample_data = _table(nuscenes_root, "sample_data")
    assert any(r["filename"].startswith(f"sweeps/{LIDAR_CHANNEL}/") for r in sample_data)
    for channel in (LIDAR_CHANNEL, *CAMERA_CHANNELS):
        assert any(r["filename"].startswith(f"samples/{channel}/") for r in sample_data), channel
    # Every lidarseg record is keyed by its LiDAR token and has one uint8 label per point.
    by_token = {r["token"]: r for r in sample_data}
    for record in _table(nuscenes_root, "lidarseg"):
        assert record["token"] == record["sample_data_token"]
        points = np.fromfile(nuscenes_root / by_token[record["token"]]["filename"], dtype=np.float32).reshape(-1, 5)
        labels = np.fromfile(nuscenes_root / record["filename"], dtype=np.uint8)
        assert len(labels) == len(points) > 5000
        assert np.all(points[:, 4] < 32) and np.all((points[:, 3] >= 0) & (points[:, 3] <= 255))
        assert {"flat.driveable_surface", "static.manmade", "static.vegetation", "vehicle.car"} <= {
            LIDARSEG_CLASSES[i] for i in np.unique(labels)}


def test_time_and_links(nusc) -> None:
    for scene in nusc.scene:
        samples, token = [], scene["first_sample_token"]
        while token:
            samples.append(nusc.get("sample", token))
            token = samples[-1]["next"]
        assert len(samples) == scene["nbr_samples"] == 4
        assert samples[-1]["token"] == scene["last_sample_token"]
        times = [s["timestamp"] for s in samples]
        assert np.allclose(np.diff(times), 500_000)  # microseconds, 2 Hz keyframes
        # LiDAR chain: keyframes with 9 sweeps between them (20 Hz), sweeps belong to the next sample.
        chain, token = [], samples[-1]["data"][LIDAR_CHANNEL]
        while token:
            chain.append(nusc.get("sample_data", token))
            token = chain[-1]["prev"]
        chain.reverse()
        assert [r["is_key_frame"] for r in chain].count(True) == 4 and len(chain) == 4 + 3 * 9
        assert np.allclose(np.diff([r["timestamp"] for r in chain]), 50_000)
        keyframe_samples = [r["sample_token"] for r in chain if r["is_key_frame"]]
        assert keyframe_samples == [s["token"] for s in samples]
        assert all(nusc.get("sample", r["sample_token"])["timestamp"] >= r["timestamp"] for r in chain)
        # Cameras fire after the LiDAR keyframe, as the LiDAR sweeps across them.
        for sample in samples:
            for channel in CAMERA_CHANNELS:
                delay = nusc.get("sample_data", sample["data"][channel])["timestamp"] - sample["timestamp"]
                assert 0 < delay < 50_000


# The devkit's ego-centric map crop converts 1-element arrays with int() (numpy >= 1.25 warns).
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_devkit_renders(nusc, tmp_path: Path) -> None:
    from nuscenes.utils.data_classes import LidarPointCloud

    sample = nusc.sample[1]
    nusc.render_pointcloud_in_image(sample["token"], camera_channel="CAM_FRONT", show_lidarseg=True,
                                    out_path=str(tmp_path / "pc.png"), verbose=False)
    nusc.render_sample_data(sample["data"][LIDAR_CHANNEL], show_lidarseg=True, out_path=str(tmp_path / "bev.png"),
                            verbose=False)
    nusc.render_sample_data(sample["data"][LIDAR_CHANNEL], nsweeps=3, out_path=str(tmp_path / "sweeps.png"),
                            verbose=False)
    nusc.render_sample_data(sample["data"]["CAM_BACK_LEFT"], out_path=str(tmp_path / "cam.png"), verbose=False)
    for name in ("pc", "bev", "sweeps", "cam"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    _, boxes, _ = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
    assert boxes  # annotations are visible in the front camera
    cloud, _ = LidarPointCloud.from_file_multisweep(nusc, sample, LIDAR_CHANNEL, LIDAR_CHANNEL, nsweeps=3)
    assert cloud.points.shape[0] == 4 and cloud.points.shape[1] > 3 * 5000


def _pixel_classes(image: np.ndarray) -> np.ndarray:
    """Nearest rendering colour by chromaticity (shading only scales a colour)."""
    palette = np.array([*CLASS_COLOURS.values(), SKY_COLOUR], dtype=np.float64)
    labels = np.array([*CLASS_COLOURS.keys(), -1])
    chroma = image / np.maximum(image.sum(-1, keepdims=True), 1.0)
    palette_chroma = palette / palette.sum(-1, keepdims=True)
    distance = ((chroma[..., None, :] - palette_chroma) ** 2).sum(-1)
    return labels[distance.argmin(-1)]


def test_projected_points_land_on_their_class(nuscenes_root: Path, tmp_path: Path) -> None:
    index = load_info_index(nuscenes_root, VERSION, "mini_train", max_sweeps=0, cache_dir=tmp_path)
    hits = {label: [] for label in CLASS_COLOURS}
    for keyframe in index.keyframes:
        points = np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
        labels = np.fromfile(nuscenes_root / keyframe.lidarseg_path, dtype=np.uint8)
        cameras = list(keyframe.cameras.values())
        pairs = pair_points_with_cameras(points, keyframe.lidar, cameras)
        rows, cols = pairs.pixel_rc.T
        for slot, camera in enumerate(cameras):
            in_camera = pairs.camera_index == slot
            image = np.asarray(Image.open(nuscenes_root / camera.path).convert("RGB"))
            seen = _pixel_classes(image[rows[in_camera], cols[in_camera]].astype(np.float64))
            for label, pixel_label in zip(labels[pairs.point_index[in_camera]], seen):
                if label in hits:
                    hits[label].append(pixel_label == label)
    car = LIDARSEG_CLASSES.index("vehicle.car")
    assert len(hits[car]) > 500
    assert np.mean(hits[car]) > 0.9
    # The rest mostly differs by parallax: the LiDAR (1.84 m high) sees facades over parked cars
    # that hide them from the cameras (about 1.5 m high).
    assert np.mean(np.concatenate([v for v in hits.values() if v])) > 0.9


def test_deterministic_and_validated_arguments(tmp_path: Path) -> None:
    options = dict(scene_names=("scene-0553",), keyframes_per_scene=2, sweeps_between_keyframes=1,
                   image_width=96, lidar_azimuth_steps=90)
    first = synth_nuscenes(tmp_path / "a", **options)
    second = synth_nuscenes(tmp_path / "b", **options)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    camera = next(r for r in _table(first, "sample_data") if r["fileformat"] == "jpg")
    assert Image.open(first / camera["filename"]).size == (camera["width"], camera["height"]) == (96, 54)
    with pytest.raises(ValueError, match="official mini scenes"):
        synth_nuscenes(tmp_path / "c", scene_names=("scene-9999",))
