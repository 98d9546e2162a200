"""``accord data synth mutdet OUT``: aerial-like sample data in the exact DIOR-R and DOTA layouts.

Each canvas is textured ground (low-frequency colour blotches plus grain) with non-overlapping
rotated objects of five classes, drawn so that a tiny detector can tell them apart in a few CPU
minutes: planes (grey crosses), ships (pale pointed hulls with a dark deck line), vehicles (small
saturated rectangles with a dark windscreen), storage tanks (white discs with a grey ring and a
shadow) and tennis courts (green rectangles with white lines). Every object's label is its drawn
footprint's rotated rectangle, and an instance mask PNG (pixel value k = the k-th object of the
label file, 0 = ground) stands in for SAM's masks in the pseudo-label step.

Written tree::

    OUT/DIOR-R/JPEGImages-{trainval,test}/<id>.jpg, Annotations/Oriented Bounding Boxes/<id>.xml,
              ImageSets/Main/{train,val,trainval,test}.txt, Masks/<id>.png
    OUT/DOTA/{train,val}/images/<id>.png, labelTxt/<id>.txt, masks/<id>.png
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accord.utils.files import write_text_atomically
from accord_mutdet.data.dior import ANNOTATION_DIR, IMAGE_DIRS, write_dior_xml
from accord_mutdet.data.dota import write_dota_labels
from accord_mutdet.data.records import write_image

#: Synthetic object kinds -> (DIOR-R name, DOTA name).
SYNTH_CLASSES: dict[str, tuple[str, str]] = {
    "plane": ("airplane", "plane"),
    "ship": ("ship", "ship"),
    "vehicle": ("vehicle", "small-vehicle"),
    "storage_tank": ("storagetank", "storage-tank"),
    "court": ("tenniscourt", "tennis-court"),
}
# (long side range, aspect ratio h/w range) in pixels at object_scale 1.
_SIZES = {"plane": ((30, 46), (0.8, 0.95)), "ship": ((30, 50), (0.2, 0.3)), "vehicle": ((11, 15), (0.45, 0.55)),
          "storage_tank": ((16, 28), (1.0, 1.0)), "court": ((30, 40), (0.45, 0.55))}


@dataclass
class SynthObject:
    """One drawn object: its kind and le90 box ``(cx, cy, w, h, theta)``."""

    kind: str
    box: np.ndarray
    difficult: bool


def _to_image(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Local points (x along ``w``, y along ``h``, origin at the centre) to image pixels (le90 rotation)."""
    cx, cy, _, _, theta = box
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return points @ rotation.T + np.array([cx, cy])


def _shapes(kind: str, w: float, h: float, rng: np.random.Generator) -> list[tuple[np.ndarray, tuple, bool]]:
    """Polygons in the local frame as ``(points, colour, part_of_mask)``, drawn in order."""
    def rect(x0, y0, x1, y1):
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)

    hw, hh = w / 2, h / 2
    if kind == "plane":
        grey = tuple(int(v) for v in rng.integers(200, 240, 3))
        return [(rect(-hw, -0.08 * h, hw, 0.08 * h), grey, True),  # fuselage
                (np.array([[0.15 * w, -0.06 * h], [0.15 * w, 0.06 * h], [-0.1 * w, hh], [-0.2 * w, hh],
                           [-0.2 * w, -hh], [-0.1 * w, -hh]]), grey, True),  # swept wings
                (rect(-hw, -0.2 * h, -0.38 * w, 0.2 * h), grey, True)]  # tail plane
    if kind == "ship":
        hull = np.array([[-hw, -hh], [0.3 * w, -hh], [hw, 0.0], [0.3 * w, hh], [-hw, hh]])
        return [(hull, (235, 235, 225), True), (rect(-0.4 * w, -0.12 * h, 0.25 * w, 0.12 * h), (60, 60, 70), True)]
    if kind == "vehicle":
        colour = [(200, 30, 30), (30, 60, 200), (230, 200, 30), (240, 240, 240)][int(rng.integers(4))]
        return [(rect(-hw, -hh, hw, hh), colour, True), (rect(0.15 * w, -0.4 * h, 0.3 * w, 0.4 * h), (20, 20, 30), True)]
    if kind == "storage_tank":
        angles = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        circle = np.stack([np.cos(angles), np.sin(angles)], -1)
        return [(circle * hw + [0.12 * w, 0.12 * w], (45, 45, 40), False),  # shadow, not the object
                (circle * hw, (150, 150, 150), True), (circle * 0.8 * hw, (250, 250, 250), True)]
    court = [(rect(-hw, -hh, hw, hh), (70, 140, 80), True)]
    white = (245, 245, 245)
    line = 0.04 * h
    return court + [(rect(-hw, -hh, hw, -hh + line), white, True), (rect(-hw, hh - line, hw, hh), white, True),
                    (rect(-hw, -hh, -hw + line, hh), white, True), (rect(hw - line, -hh, hw, hh), white, True),
                    (rect(-line / 2, -hh, line / 2, hh), white, True), (rect(-0.25 * w, -line / 2, 0.25 * w, line / 2), white, True)]


def _ground(size: int, rng: np.random.Generator) -> np.ndarray:
    """Textured ground ``(size, size, 3)`` uint8 RGB: a soil/grass base, blotches and grain."""
    import cv2

    base = np.array([[120, 110, 80], [100, 115, 75], [135, 125, 105]][int(rng.integers(3))], float)
    coarse = cv2.resize(rng.normal(0, 18, (max(2, size // 32), max(2, size // 32), 3)), (size, size),
                        interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 6, (size, size, 3))
    return np.clip(base + coarse + grain, 0, 255).astype(np.uint8)


def render(size: int, rng: np.random.Generator, *, min_objects: int = 4, max_objects: int = 10,
           object_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, list[SynthObject]]:
    """One canvas: RGB ``(size, size, 3)`` uint8, instance mask ``(size, size)`` uint16, objects."""
    import cv2
    from shapely.geometry import Polygon

    image, mask = _ground(size, rng), np.zeros((size, size), np.uint16)
    objects: list[SynthObject] = []
    placed: list[Polygon] = []
    target = int(rng.integers(min_objects, max_objects + 1))
    kinds = list(SYNTH_CLASSES)
    for _ in range(target * 20):
        if len(objects) == target:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        (long_lo, long_hi), (ratio_lo, ratio_hi) = _SIZES[kind]
        w = rng.uniform(long_lo, long_hi) * object_scale
        h = w * rng.uniform(ratio_lo, ratio_hi)
        theta = rng.uniform(-math.pi / 2, math.pi / 2)
        margin = w / 2 + 2
        if 2 * margin >= size:
            continue
        box = np.array([rng.uniform(margin, size - margin), rng.uniform(margin, size - margin), w, h, theta])
        footprint = Polygon(_to_image(np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]]), box))
        if any(footprint.buffer(3).intersects(other) for other in placed):
            continue
        instance = len(objects) + 1
        drawn = np.zeros((size, size), np.uint8)
        for points, colour, in_mask in _shapes(kind, w, h, rng):
            # opencv puts pixel centres at integers, boxes at half-integers (pixel i covers [i, i+1));
            # 4 fractional bits.
            pixels = np.round((_to_image(points, box) - 0.5) * 16).astype(np.int32)
            cv2.fillPoly(image, [pixels], colour, lineType=cv2.LINE_AA, shift=4)
            if in_mask:
                cv2.fillPoly(drawn, [pixels], 1, lineType=cv2.LINE_8, shift=4)
        mask[drawn > 0] = instance
        placed.append(footprint)
        objects.append(SynthObject(kind, box.astype(np.float32), bool(rng.random() < 0.05)))
    return image, mask, objects


def _polygons(objects: list[SynthObject]) -> np.ndarray:
    import torch

    from accord.boxes import le90_to_polygon

    boxes = torch.from_numpy(np.stack([o.box for o in objects]) if objects else np.zeros((0, 5), np.float32))
    return le90_to_polygon(boxes.double()).numpy()


def synth_mutdet(out_dir: str | Path, *, num_train: int = 12, num_val: int = 2, num_test: int = 4,
                 size: int = 256, min_objects: int = 4, max_objects: int = 10, object_scale: float = 1.0,
                 seed: int = 0) -> Path:
    """Write the sample DIOR-R and DOTA datasets (see the module docstring) and return ``out_dir``.

    Args:
        out_dir: output root (created).
        num_train: training images (DIOR-R ``train``, DOTA ``train``).
        num_val: validation images (DIOR-R ``val``, DOTA ``val``).
        num_test: DIOR-R ``test`` images.
        size: canvas side in pixels.
        min_objects: fewest objects per canvas.
        max_objects: most objects per canvas (fewer when they do not fit).
        object_scale: object size factor (1: planes 30-46 px long, vehicles 11-15 px).
        seed: the one seed; the same arguments give the same files.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    options = dict(min_objects=min_objects, max_objects=max_objects, object_scale=object_scale)
    dior = out / "DIOR-R"
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    counts = {"train": num_train, "val": num_val, "test": num_test}
    number = 0
    for split, count in counts.items():
        for _ in range(count):
            number += 1
            image_id = f"{number:05d}"
            image, mask, objects = render(size, rng, **options)
            folder = IMAGE_DIRS["test" if split == "test" else "trainval"]
            write_image(dior / folder / f"{image_id}.jpg", image)
            write_image(dior / "Masks" / f"{image_id}.png", mask)
            write_dior_xml(dior / ANNOTATION_DIR / f"{image_id}.xml", f"{image_id}.jpg", size, size,
                           _polygons(objects), [SYNTH_CLASSES[o.kind][0] for o in objects],
                           [o.difficult for o in objects])
            splits[split].append(image_id)
    splits["trainval"] = splits["train"] + splits["val"]
    for split, ids in splits.items():
        write_text_atomically(dior / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    dota = out / "DOTA"
    number = 0
    for split, count in (("train", num_train), ("val", num_val)):
        for _ in range(count):
            image_id = f"P{number:04d}"
            number += 1
            image, mask, objects = render(size, rng, **options)
            write_image(dota / split / "images" / f"{image_id}.png", image)
            write_image(dota / split / "masks" / f"{image_id}.png", mask)
            write_dota_labels(dota / split / "labelTxt" / f"{image_id}.txt", _polygons(objects),
                              [SYNTH_CLASSES[o.kind][1] for o in objects], [o.difficult for o in objects], gsd=0.5)
    return out
