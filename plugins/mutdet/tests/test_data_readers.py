"""DIOR-R XML and DOTA txt readers: real layouts, one annotation format, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.boxes import le90_to_polygon
from accord_mutdet.data import (
    DIOR_R_CLASSES,
    DOTA_V1_CLASSES,
    DOTA_V15_CLASSES,
    AnnotationError,
    load_dior_r,
    load_dota,
)

DIOR_XML = """<annotation>
  <filename>00042.jpg</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  <object>
    <name>Expressway-Service-area</name>
    <difficult>1</difficult>
    <robndbox>
      <x_left_top>10</x_left_top><y_left_top>10</y_left_top>
      <x_right_top>40</x_right_top><y_right_top>10</y_right_top>
      <x_right_bottom>40</x_right_bottom><y_right_bottom>20</y_right_bottom>
      <x_left_bottom>10</x_left_bottom><y_left_bottom>20</y_left_bottom>
    </robndbox>
  </object>
  <object>
    <name>vehicle</name>
    <robndbox>
      <x_left_top>30</x_left_top><y_left_top>20</y_left_top>
      <x_right_top>40</x_right_top><y_right_top>30</y_right_top>
      <x_right_bottom>35</x_right_bottom><y_right_bottom>35</y_right_bottom>
      <x_left_bottom>25</x_left_bottom><y_left_bottom>25</y_left_bottom>
    </robndbox>
  </object>
</annotation>
"""


def _image(path: Path, width: int = 64, height: int = 48) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 100, 80)).save(path)


def _dior(root: Path, xml: str = DIOR_XML) -> Path:
    _image(root / "JPEGImages-test" / "00042.jpg")
    (root / "Annotations" / "Oriented Bounding Boxes").mkdir(parents=True)
    (root / "Annotations" / "Oriented Bounding Boxes" / "00042.xml").write_text(xml)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("00042\n")
    return root


def test_class_lists():
    assert len(DIOR_R_CLASSES) == 20 and len(set(DIOR_R_CLASSES)) == 20
    assert len(DOTA_V1_CLASSES) == 15 and DOTA_V15_CLASSES == DOTA_V1_CLASSES + ("container-crane",)


def test_dior_r_hand_made(tmp_path: Path):
    (record,) = load_dior_r(_dior(tmp_path), "test")
    assert (record.id, record.width, record.height) == ("00042", 64, 48)
    assert record.labels == ["expressway-service-area", "vehicle"]  # names matched lower-cased
    assert record.difficult.tolist() == [True, False]
    assert record.boxes.dtype == np.float32 and record.boxes.shape == (2, 5)
    np.testing.assert_allclose(record.boxes[0], [25, 15, 30, 10, 0], atol=1e-5)
    # the 45-degree vehicle: long side from (30,20) to (40,30) -> theta = +pi/4 (y down), w = 10 sqrt 2
    np.testing.assert_allclose(record.boxes[1], [32.5, 27.5, 10 * math.sqrt(2), 5 * math.sqrt(2), math.pi / 4], atol=1e-4)


def test_dior_r_errors_name_file_and_line(tmp_path: Path):
    bad = DIOR_XML.replace("<name>vehicle</name>", "<name>spaceship</name>").replace("<x_left_top>10<", "<x_left_top>ten<")
    with pytest.raises(AnnotationError) as error:
        load_dior_r(_dior(tmp_path, bad), "test")
    lines = error.value.lines
    assert len(lines) == 2
    assert "00042.xml:4:" in lines[0] and "robndbox" in lines[0]
    assert "00042.xml:14:" in lines[1] and "unknown class 'spaceship'" in lines[1]


def test_dota_reader_headers_and_versions(tmp_path: Path):
    _image(tmp_path / "train" / "images" / "P0001.png")
    label = tmp_path / "train" / "labelTxt" / "P0001.txt"
    label.parent.mkdir(parents=True)
    label.write_text("imagesource:GoogleEarth\ngsd:0.15\n10 10 40 10 40 20 10 20 plane 0\n"
                     "30 20 40 30 35 35 25 25 container-crane 1\n")
    with pytest.raises(AnnotationError, match=r"P0001.txt:4: unknown class 'container-crane'"):
        load_dota(tmp_path, "train")
    (record,) = load_dota(tmp_path, "train", version="1.5")
    assert record.labels == ["plane", "container-crane"] and record.difficult.tolist() == [False, True]
    np.testing.assert_allclose(record.boxes[0], [25, 15, 30, 10, 0], atol=1e-5)


def test_dota_test_split_without_labels(tmp_path: Path):
    _image(tmp_path / "test" / "images" / "P0002.png", 32, 16)
    (record,) = load_dota(tmp_path, "test")
    assert (record.width, record.height, record.boxes.shape) == (32, 16, (0, 5))


def test_both_layouts_of_the_sample_agree_with_their_polygons(synth_root: Path):
    dior = load_dior_r(synth_root / "DIOR-R", "trainval")
    dota = load_dota(synth_root / "DOTA", "train")
    assert len(dior) == 4 and len(dota) == 3
    for record in dior + dota:
        assert record.boxes.shape[1] == 5 and len(record.labels) == len(record.boxes) > 0
        assert np.all(record.boxes[:, 2] >= record.boxes[:, 3])
        assert np.all((record.boxes[:, 4] >= -math.pi / 2) & (record.boxes[:, 4] < math.pi / 2))
        assert set(record.labels) <= set(DIOR_R_CLASSES) | set(DOTA_V1_CLASSES)
    # DOTA keeps one decimal: its polygons come back to the written ones
    text = (synth_root / "DOTA" / "train" / "labelTxt" / f"{dota[0].id}.txt").read_text().splitlines()[2:]
    written = np.array([[float(v) for v in line.split()[:8]] for line in text])
    back = le90_to_polygon(torch.from_numpy(dota[0].boxes).double()).numpy()
    for polygon, again in zip(written, back):
        # same rectangle up to the starting corner
        assert min(np.abs(np.roll(again.reshape(4, 2), s, 0) - polygon.reshape(4, 2)).max() for s in range(4)) < 0.2
