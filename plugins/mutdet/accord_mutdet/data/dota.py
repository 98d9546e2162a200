"""DOTA v1.0 / v1.5 layout: ``<root>/<split>/images/<id>.png`` and ``<root>/<split>/labelTxt/<id>.txt``.

A label file may start with the header lines ``imagesource:...`` and ``gsd:...``; every other
non-empty line is ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` (the corners in order around the
object, ``difficult`` 0 or 1; the DOTA devkit's patch splitter writes 2 for cut objects, read as
difficult). A split without a ``labelTxt`` folder (DOTA's test set) gives records without boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from accord.registry import Problem
from accord.utils.files import write_text_atomically
from accord_mutdet.data.records import (
    DOTA_V1_CLASSES,
    DOTA_V15_CLASSES,
    AnnotationError,
    ImageRecord,
    image_size,
    polygons_to_boxes,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
HEADER_KEYS = ("imagesource:", "gsd:")
DOTA_VERSIONS = {"1.0": DOTA_V1_CLASSES, "1.5": DOTA_V15_CLASSES}


def dota_classes(version: str) -> tuple[str, ...]:
    """The class names of DOTA ``version`` (``"1.0"`` or ``"1.5"``)."""
    if version not in DOTA_VERSIONS:
        from accord.config import ConfigError

        raise ConfigError([f"DOTA version: expected one of {', '.join(sorted(DOTA_VERSIONS))}, got {version!r}"])
    return DOTA_VERSIONS[version]


@dataclass
class DotaLabels:
    """The parsed content of one label file (``polygons`` ``(N, 8)`` float64) and its problems."""

    polygons: np.ndarray
    labels: list[str]
    difficult: np.ndarray
    problems: list[Problem] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)


def parse_dota_labels(path: Path, classes: Sequence[str] | None) -> DotaLabels:
    """Read one DOTA label file, collecting one :class:`Problem` per malformed line.

    Args:
        path: the ``.txt`` file.
        classes: allowed class names; None accepts any name (pseudo-label files).

    Returns:
        The well-formed objects (malformed lines are left out and reported in ``problems``).
    """
    polygons, labels, difficult, problems, numbers = [], [], [], [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return DotaLabels(np.zeros((0, 8)), [], np.zeros(0, bool), [Problem(str(path), f"unreadable label file: {exc}")])
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(HEADER_KEYS):
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) != 10:
            problems.append(Problem(where, f"malformed DOTA line: expected 10 fields "
                                           f"'x1 y1 x2 y2 x3 y3 x4 y4 class difficult', got {len(fields)}: {line!r}"))
            continue
        try:
            coords = [float(value) for value in fields[:8]]
        except ValueError:
            problems.append(Problem(where, f"malformed DOTA line: the first 8 fields must be numbers: {line!r}"))
            continue
        if not np.all(np.isfinite(coords)):
            problems.append(Problem(where, f"malformed DOTA line: non-finite coordinate: {line!r}"))
            continue
        if fields[9] not in ("0", "1", "2"):
            problems.append(Problem(where, f"malformed DOTA line: difficult must be 0, 1 or 2, got {fields[9]!r}"))
            continue
        if classes is not None and fields[8] not in classes:
            problems.append(Problem(where, f"unknown class {fields[8]!r}; expected one of: {', '.join(classes)}"))
            continue
        polygons.append(coords)
        labels.append(fields[8])
        difficult.append(fields[9] != "0")
        numbers.append(number)
    return DotaLabels(np.asarray(polygons, np.float64).reshape(-1, 8), labels, np.asarray(difficult, bool),
                      problems, numbers)


def dota_images(image_dir: Path) -> list[Path]:
    """The image files of a DOTA ``images`` folder, sorted by name."""
    return sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_dota(root: str | Path, split: str, *, version: str = "1.0",
              classes: Sequence[str] | None = None) -> list[ImageRecord]:
    """Read a DOTA split into :class:`ImageRecord` s (boxes le90, original pixels).

    Args:
        root: the dataset root holding ``<split>/images`` and ``<split>/labelTxt``.
        split: ``train``, ``val``, ``test`` or a patch folder name.
        version: ``"1.0"`` or ``"1.5"``: the allowed class names.
        classes: allowed class names instead of the version's (e.g. ``["SAMObject"]``).

    Raises:
        FileNotFoundError: no ``<split>/images`` folder.
        AnnotationError: a missing label file, a malformed line or an unknown class (one line each;
            geometry is checked by :func:`accord_mutdet.data.check_dataset`).
    """
    split_dir = Path(root) / split
    image_dir, label_dir = split_dir / "images", split_dir / "labelTxt"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: DOTA images folder not found (expected <root>/<split>/images)")
    allowed = tuple(classes) if classes is not None else dota_classes(version)
    records, problems = [], []
    for image in dota_images(image_dir):
        label_file = label_dir / f"{image.stem}.txt"
        width, height = image_size(image)
        if not label_dir.is_dir():  # the test split ships without labels
            records.append(ImageRecord(image, width, height, id=image.stem))
            continue
        if not label_file.is_file():
            problems.append(Problem(str(label_file), f"missing annotation file for image {image.name}"))
            continue
        parsed = parse_dota_labels(label_file, allowed)
        problems += parsed.problems
        records.append(ImageRecord(image, width, height, polygons_to_boxes(parsed.polygons), parsed.labels,
                                   parsed.difficult, image.stem))
    if problems:
        raise AnnotationError(problems)
    return records


def format_dota_labels(polygons: np.ndarray, labels: Sequence[str], difficult: Sequence[bool] | np.ndarray,
                       *, gsd: float | None = None) -> str:
    """The text of a DOTA label file (with the ``imagesource`` / ``gsd`` header when ``gsd`` is given)."""
    lines = [] if gsd is None else ["imagesource:GoogleEarth", f"gsd:{gsd:g}"]
    for polygon, label, hard in zip(np.asarray(polygons).reshape(-1, 8), labels, difficult):
        lines.append(" ".join(f"{value:.1f}" for value in polygon) + f" {label} {int(bool(hard))}")
    return "\n".join(lines) + "\n"


def write_dota_labels(path: Path, polygons: np.ndarray, labels: Sequence[str],
                      difficult: Sequence[bool] | np.ndarray, *, gsd: float | None = None) -> Path:
    """Write one DOTA label file atomically."""
    return write_text_atomically(Path(path), format_dota_labels(polygons, labels, difficult, gsd=gsd))
