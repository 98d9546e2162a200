"""Superpixels: SLIC generated once per image, semantic maps read with validated id ranges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import accord_superflow.data.superpixels as superpixels_module
from accord_superflow.data import (
    SlicParams,
    generate_slic_superpixels,
    load_info_index,
    load_semantic_superpixels,
    load_superpixels,
    pair_points_with_cameras,
    slic_superpixels,
    superpixel_dir,
)
from accord_superflow.data.schema import LIDARSEG_CLASSES, LIDARSEG_TO_SEMANTIC, SEMANTIC_SUPERPIXEL_CLASSES
from accord_superflow.data.superpixels import read_superpixel_meta, save_superpixels

VERSION = "v1.0-mini"


def test_semantic_superpixels_share_class_ids_across_cameras_and_time(nuscenes_root: Path, tmp_path: Path) -> None:
    index = load_info_index(nuscenes_root, VERSION, "mini_train", max_sweeps=0, cache_dir=tmp_path)
    directory = superpixel_dir(nuscenes_root, "semantic")
    assert read_superpixel_meta(directory)["num_ids"] == len(SEMANTIC_SUPERPIXEL_CLASSES) == 17
    car_id = SEMANTIC_SUPERPIXEL_CLASSES.index("car")
    agree, car_images = [], 0
    for keyframe in index.keyframes:
        points = np.fromfile(nuscenes_root / keyframe.lidar.path, dtype=np.float32).reshape(-1, 5)
        expected_ids = np.asarray(LIDARSEG_TO_SEMANTIC)[np.fromfile(nuscenes_root / keyframe.lidarseg_path, np.uint8)]
        for camera in keyframe.cameras.values():
            path = directory / f"{camera.sample_data_token}.png"
            ids = load_semantic_superpixels(path, (camera.width, camera.height))
            car_images += bool((ids == car_id).any())
            pairs = pair_points_with_cameras(points, keyframe.lidar, [camera])
            rows, cols = pairs.pixel_rc.T
            agree.append(ids[rows, cols] == expected_ids[pairs.point_index])
    assert car_images > 12  # the same id marks cars in many cameras and keyframes
    assert np.concatenate(agree).mean() > 0.9
    assert LIDARSEG_TO_SEMANTIC[LIDARSEG_CLASSES.index("vehicle.car")] == car_id
    assert LIDARSEG_TO_SEMANTIC[LIDARSEG_CLASSES.index("noise")] == SEMANTIC_SUPERPIXEL_CLASSES.index("other")


def test_load_superpixels_validates(tmp_path: Path) -> None:
    ids = np.zeros((9, 16), dtype=np.uint8)
    ids[2, 3] = 16
    path = tmp_path / "ok.png"
    save_superpixels(path, ids)
    np.testing.assert_array_equal(load_semantic_superpixels(path, (16, 9)), ids)

    ids[4, 5] = 20
    save_superpixels(tmp_path / "high.png", ids)
    with pytest.raises(ValueError, match=r"high.png: superpixel id 20 out of range; ids must be < 17"):
        load_semantic_superpixels(tmp_path / "high.png")
    with pytest.raises(ValueError, match=r"is 16x9, its camera image is 32x18"):
        load_superpixels(path, 17, expected_size=(32, 18))
    Image.new("RGB", (16, 9)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode L"):
        load_superpixels(tmp_path / "rgb.png", 17)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="unreadable"):
        load_superpixels(tmp_path / "junk.png", 17)
    with pytest.raises(ValueError, match="0..255"):
        save_superpixels(tmp_path / "big.png", np.full((2, 2), 300))


def test_slic_generated_once_per_image(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = load_info_index(tiny_root, VERSION, "mini_val", max_sweeps=0, cache_dir=tmp_path / "cache")
    params = SlicParams(n_segments=60)
    calls = []
    original = superpixels_module.slic_superpixels

    def counting_slic(image: np.ndarray, params: SlicParams) -> np.ndarray:
        calls.append(image.shape)
        return original(image, params)

    monkeypatch.setattr(superpixels_module, "slic_superpixels", counting_slic)
    paths = generate_slic_superpixels(tiny_root, index, params=params)
    assert len(paths) == len(calls) == 3 * 6 and len(set(paths)) == 18
    front = index.keyframes[0].cameras["CAM_FRONT"]
    assert paths[0] == superpixel_dir(tiny_root, "slic") / f"{front.sample_data_token}.png"
    meta = json.loads((paths[0].parent / "meta.json").read_text())
    assert meta == {"kind": "slic", "num_ids": 60, "n_segments": 60, "compactness": 6.0, "sigma": 3.0}
    camera = index.keyframes[0].cameras["CAM_FRONT"]
    ids = load_superpixels(paths[0], meta["num_ids"], (camera.width, camera.height))
    assert ids.min() == 0 and 10 < ids.max() < 60

    # Cached: nothing is recomputed, except an image whose file went missing.
    paths[5].unlink()
    assert generate_slic_superpixels(tiny_root, index, params=params) == paths
    assert len(calls) == 19
    # Other parameters are refused rather than mixed with the cached ones.
    with pytest.raises(ValueError, match="other parameters|made with"):
        generate_slic_superpixels(tiny_root, index, params=SlicParams(n_segments=100))


def test_slic_ids_start_at_zero() -> None:
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), 12, 0), 12, 1)
    ids = slic_superpixels(image)
    assert ids.dtype == np.uint8 and ids.shape == image.shape[:2] and ids.min() == 0 and ids.max() < 150
    # skimage seeds a regular grid that can hold more cells than asked for (66 for 60 here); such
    # ids would overflow the loss's id block, so they are refused.
    with pytest.raises(ValueError, match="66 segments, more than n_segments=60"):
        slic_superpixels(np.full((54, 96, 3), 128, dtype=np.uint8), SlicParams(n_segments=60))
