"""DIOR-R layout (as released, and as mmrotate's ``DIORDataset`` reads it)::

    <root>/JPEGImages-trainval/<id>.jpg     train and val images
    <root>/JPEGImages-test/<id>.jpg         test images
    <root>/Annotations/Oriented Bounding Boxes/<id>.xml
    <root>/ImageSets/Main/{train,val,trainval,test}.txt   one id per line

Each XML is VOC-style: ``<size><width>/<height>`` and one ``<object>`` per box with ``<name>``,
``<difficult>`` (optional, 0) and ``<robndbox>`` holding the four corners ``x_left_top``,
``y_left_top``, ``x_right_top``, ``y_right_top``, ``x_right_bottom``, ``y_right_bottom``,
``x_left_bottom``, ``y_left_bottom``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from accord.registry import Problem
from accord.utils.files import write_text_atomically
from accord_mutdet.data.records import DIOR_R_CLASSES, AnnotationError, ImageRecord, polygons_to_boxes

ANNOTATION_DIR = Path("Annotations") / "Oriented Bounding Boxes"
IMAGE_DIRS = {"trainval": "JPEGImages-trainval", "test": "JPEGImages-test"}
CORNER_TAGS = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",
               "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")


@dataclass
class DiorAnnotation:
    """The parsed content of one XML file (``polygons`` ``(N, 8)`` float64) and its problems."""

    width: int | None
    height: int | None
    polygons: np.ndarray
    labels: list[str]
    difficult: np.ndarray
    problems: list[Problem] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)


def parse_dior_xml(path: Path, classes: Sequence[str] = DIOR_R_CLASSES) -> DiorAnnotation:
    """Read one DIOR-R XML, collecting one :class:`Problem` per malformed object (named by line)."""
    empty = DiorAnnotation(None, None, np.zeros((0, 8)), [], np.zeros(0, bool))
    try:
        root = _parse_with_lines(Path(path))
    except (OSError, ET.ParseError) as exc:
        empty.problems.append(Problem(str(path), f"unreadable XML: {exc}"))
        return empty
    result = empty
    size = root.find("size")
    try:
        result.width, result.height = int(size.findtext("width")), int(size.findtext("height"))
    except (AttributeError, TypeError, ValueError):
        result.problems.append(Problem(str(path), "missing or non-integer <size><width>/<height>"))
    polygons, labels, difficult = [], [], []
    for obj in root.iter("object"):
        where = f"{path}:{obj.get('line', '?')}"
        name = (obj.findtext("name") or "").strip().lower()
        if name not in classes:
            result.problems.append(Problem(where, f"unknown class {obj.findtext('name')!r}; expected one of: "
                                                  f"{', '.join(classes)}"))
            continue
        box = obj.find("robndbox")
        try:
            coords = [float(box.findtext(tag)) for tag in CORNER_TAGS]
        except (AttributeError, TypeError, ValueError):
            result.problems.append(Problem(where, f"object {name!r}: <robndbox> needs numeric {', '.join(CORNER_TAGS)}"))
            continue
        hard = (obj.findtext("difficult") or "0").strip()
        if hard not in ("0", "1"):
            result.problems.append(Problem(where, f"object {name!r}: <difficult> must be 0 or 1, got {hard!r}"))
            continue
        polygons.append(coords)
        labels.append(name)
        difficult.append(hard == "1")
        result.line_numbers.append(int(obj.get("line", 0)))
    result.polygons = np.asarray(polygons, np.float64).reshape(-1, 8)
    result.labels, result.difficult = labels, np.asarray(difficult, bool)
    return result


def _parse_with_lines(path: Path) -> ET.Element:
    """Parse XML, recording the start line of each ``<object>`` as its attribute ``line``.

    ElementTree keeps no positions, so the lines come from the k-th ``<object`` tag in the text.
    """
    data = path.read_bytes()
    root = ET.fromstring(data)
    text = data.decode("utf-8", errors="replace")
    starts = [m.start() for m in re.finditer(r"<object[\s>]", text)]
    for obj, start in zip(root.iter("object"), starts):
        obj.set("line", str(text.count("\n", 0, start) + 1))
    return root


def split_ids(root: Path, split: str) -> list[str]:
    """The image ids of ``ImageSets/Main/<split>.txt`` (blank lines skipped)."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DIOR-R split file not found (expected ImageSets/Main/<split>.txt)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def dior_image_path(root: Path, split: str, image_id: str) -> Path:
    """Where DIOR-R keeps image ``image_id``: the split's folder first, then the other one."""
    first = IMAGE_DIRS["test"] if split == "test" else IMAGE_DIRS["trainval"]
    for folder in (first, *[d for d in IMAGE_DIRS.values() if d != first]):
        path = Path(root) / folder / f"{image_id}.jpg"
        if path.is_file():
            return path
    return Path(root) / first / f"{image_id}.jpg"


def load_dior_r(root: str | Path, split: str, *, classes: Sequence[str] = DIOR_R_CLASSES) -> list[ImageRecord]:
    """Read a DIOR-R split (``train``, ``val``, ``trainval``, ``test``) into :class:`ImageRecord` s.

    Raises:
        FileNotFoundError: no ``ImageSets/Main/<split>.txt``.
        AnnotationError: missing images or XML files, unreadable XML, unknown classes or malformed
            ``robndbox`` (one line each; geometry is checked by :func:`accord_mutdet.data.check_dataset`).
    """
    root = Path(root)
    records, problems = [], []
    for image_id in split_ids(root, split):
        image = dior_image_path(root, split, image_id)
        xml = root / ANNOTATION_DIR / f"{image_id}.xml"
        if not image.is_file():
            problems.append(Problem(str(image), f"missing image for id {image_id!r} of split {split!r}"))
            continue
        if not xml.is_file():
            problems.append(Problem(str(xml), f"missing annotation file for image {image.name}"))
            continue
        parsed = parse_dior_xml(xml, classes)
        problems += parsed.problems
        if parsed.width is None:
            continue
        records.append(ImageRecord(image, parsed.width, parsed.height, polygons_to_boxes(parsed.polygons),
                                   parsed.labels, parsed.difficult, image_id))
    if problems:
        raise AnnotationError(problems)
    return records


def format_dior_xml(filename: str, width: int, height: int, polygons: np.ndarray, labels: Sequence[str],
                    difficult: Sequence[bool] | np.ndarray) -> str:
    """The text of a DIOR-R annotation XML."""
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "filename").text = filename
    source = ET.SubElement(annotation, "source")
    ET.SubElement(source, "database").text = "DIOR"
    size = ET.SubElement(annotation, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(annotation, "segmented").text = "0"
    for polygon, label, hard in zip(np.asarray(polygons).reshape(-1, 8), labels, difficult):
        obj = ET.SubElement(annotation, "object")
        ET.SubElement(obj, "name").text = label
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(bool(hard)))
        box = ET.SubElement(obj, "robndbox")
        for tag, value in zip(CORNER_TAGS, polygon):
            ET.SubElement(box, tag).text = f"{value:.0f}"
    ET.indent(annotation)
    return ET.tostring(annotation, encoding="unicode") + "\n"


def write_dior_xml(path: Path, filename: str, width: int, height: int, polygons: np.ndarray,
                   labels: Sequence[str], difficult: Sequence[bool] | np.ndarray) -> Path:
    """Write one DIOR-R annotation XML atomically."""
    return write_text_atomically(Path(path), format_dior_xml(filename, width, height, polygons, labels, difficult))


__all__ = ["ANNOTATION_DIR", "IMAGE_DIRS", "load_dior_r", "parse_dior_xml", "write_dior_xml", "AnnotationError"]
