"""Grounding records: the JSONL format training reads, and the checks every record must pass.

One JSON object per line, one file per split (``train.jsonl``, ``val.jsonl``, ``test.jsonl``)::

    {"id": "mscxr-00012", "dicom_id": "4decce85-...", "image": "files/p10/.../4decce85-....jpg",
     "phrase": "Large right-sided pneumothorax", "category": "Pneumothorax",
     "box": [55, 22, 184, 552], "image_width": 2544, "image_height": 3056, "split": "train"}

``box`` is ``[x, y, w, h]`` in pixels of the original image (MS-CXR's convention: top-left corner,
width, height) whose size is ``image_width x image_height``. ``image`` is relative to the JSONL's
directory, or absolute. The image on disk may be a resized copy: the pipeline scales the box by
the actual size over the declared one, so the aspect ratio must agree (within
:data:`ASPECT_TOLERANCE`).

The same checks serve ``accord data check medrpg``, ``accord data convert medrpg`` and training
(:func:`load_records` raises :class:`DataError` with the same lines): one
:class:`~accord.registry.Problem` per defect, named by file and line (or CSV row) and record id.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accord.errors import UserError
from accord.registry import Problem

from accord_medrpg.data.images import ImageReadError, image_size, read_image

__all__ = [
    "ASPECT_TOLERANCE",
    "BOX_TOLERANCE",
    "CATEGORIES",
    "SPLITS",
    "DataError",
    "Located",
    "check_records",
    "load_records",
    "read_jsonl",
    "require_valid",
    "resolve_image",
    "split_files",
    "validate_records",
]

#: The 8 MS-CXR findings, in the reference's id order (category id = index + 1).
CATEGORIES = (
    "Cardiomegaly",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
)
SPLITS = ("train", "val", "test")
#: Pixels a box may reach beyond the image border (annotation tools round outwards).
BOX_TOLERANCE = 1.0
#: Largest relative difference between the aspect ratio on disk and the declared one.
ASPECT_TOLERANCE = 0.02
_FIELDS = {"id": str, "dicom_id": str, "image": str, "phrase": str, "category": str, "box": list,
           "image_width": int, "image_height": int, "split": str}


class DataError(UserError):
    """A dataset that fails its checks; ``lines`` holds one line per problem (the CLI prints each)."""

    def __init__(self, source: str | Path, problems: list[Problem]):
        self.problems = problems
        self.lines = [f"{len(problems)} problem(s) in {source}; fix them (accord data check medrpg) and retry",
                      *(str(p) for p in problems)]
        super().__init__("\n".join(self.lines))


@dataclass
class Located:
    """A record and where it came from.

    Attributes:
        record: the record's fields (the JSONL object).
        where: file and line or row, e.g. ``"out/train.jsonl:3"``.
        base: directory that a relative ``image`` is resolved against.
    """

    record: dict[str, Any]
    where: str
    base: Path = field(default_factory=Path)

    def problem(self, message: str) -> Problem:
        """A Problem at this record, prefixed by its id when it has one."""
        rid = self.record.get("id")
        return Problem(self.where, f"[{rid}] {message}" if isinstance(rid, str) and rid else message)


def resolve_image(image: str, base: Path) -> Path:
    """``image`` as a path: absolute as given, relative to ``base`` otherwise."""
    path = Path(image)
    return path if path.is_absolute() else base / path


def split_files(directory: str | Path) -> list[Path]:
    """The ``<split>.jsonl`` files present in ``directory``, in :data:`SPLITS` order."""
    directory = Path(directory)
    return [directory / f"{split}.jsonl" for split in SPLITS if (directory / f"{split}.jsonl").is_file()]


def read_jsonl(path: str | Path) -> tuple[list[Located], list[Problem]]:
    """Parse a split file into located records; lines that are not JSON objects become Problems."""
    path = Path(path)
    located: list[Located] = []
    problems: list[Problem] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(str(path), f"cannot read the split file ({exc})")]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(where, f"not valid JSON ({exc.msg}); expected one record object per line"))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(where, f"expected a JSON object, got {type(record).__name__}"))
            continue
        if path.stem in SPLITS and record.get("split", path.stem) != path.stem:
            problems.append(Problem(where, f"record of split {record['split']!r} in the {path.stem} split file"))
        located.append(Located(record, where, path.parent))
    if not located and not problems:
        problems.append(Problem(str(path), "no records: the split file is empty"))
    return located, problems


def _field_problems(item: Located) -> list[Problem]:
    record = item.record
    problems = []
    for name, kind in _FIELDS.items():
        value = record.get(name)
        # bool is an int subclass; an int is not a valid str and so on.
        if name not in record or not isinstance(value, kind) or isinstance(value, bool):
            problems.append(item.problem(f"field {name!r} must be a {kind.__name__}, got {value!r}"))
    return problems


def _box_problems(item: Located) -> list[Problem]:
    record = item.record
    box = record["box"]
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                for v in box):
        return [item.problem(f"box must be 4 finite numbers [x, y, w, h], got {box!r}")]
    x, y, w, h = box
    width, height = record["image_width"], record["image_height"]
    if width <= 0 or height <= 0:
        return [item.problem(f"image_width and image_height must be positive, got {width} x {height}")]
    if w <= 0 or h <= 0:
        return [item.problem(f"box [x, y, w, h] = {box} has zero or negative size")]
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        return [item.problem(f"box [x, y, w, h] = {box} lies outside the {width} x {height} image")]
    return []


def _image_problem(item: Located, decode: bool, cache: dict[tuple[Path, int, int], str | None]) -> Problem | None:
    key = (resolve_image(item.record["image"], item.base), item.record["image_width"], item.record["image_height"])
    if key not in cache:
        cache[key] = _image_error(*key, decode)
    return item.problem(cache[key]) if cache[key] else None


def _image_error(path: Path, width: int, height: int, decode: bool) -> str | None:
    try:
        if decode:
            pixels = read_image(path)
            actual = (pixels.shape[1], pixels.shape[0])
        else:
            actual = image_size(path)
    except ImageReadError as exc:
        return str(exc)
    if abs(actual[0] / actual[1] - width / height) > ASPECT_TOLERANCE * width / height:
        return (f"{path}: image is {actual[0]} x {actual[1]} pixels, but the record declares {width} x {height}; "
                "a resized copy must keep the aspect ratio")
    return None


def check_records(items: list[Located], *, decode_images: bool = True) -> list[Problem]:
    """Every problem of a set of records (one dataset: all its splits), one Problem per defect.

    Args:
        items: the records with their locations.
        decode_images: decode every image fully (``accord data check``); otherwise read headers
            only (training, conversion), which finds missing and non-image files but not a
            truncated JPEG.

    Returns:
        Problems in record order, then the split leaks.
    """
    problems: list[Problem] = []
    image_cache: dict[tuple[Path, int, int], str | None] = {}
    first_with_id: dict[str, str] = {}
    splits_of_image: dict[str, dict[str, str]] = defaultdict(dict)  # image key -> split -> first location
    for item in items:
        field_problems = _field_problems(item)
        problems += field_problems
        record = item.record
        rid = record.get("id")
        if isinstance(rid, str):
            if rid in first_with_id:
                problems.append(item.problem(f"duplicate id, first used at {first_with_id[rid]}"))
            else:
                first_with_id[rid] = item.where
        if field_problems:
            continue
        if not record["phrase"].strip():
            problems.append(item.problem("empty phrase"))
        if record["category"] not in CATEGORIES:
            problems.append(item.problem(f"unknown category {record['category']!r}; expected one of the MS-CXR "
                                         f"findings: {', '.join(CATEGORIES)}"))
        if record["split"] not in SPLITS:
            problems.append(item.problem(f"unknown split {record['split']!r}; expected one of {', '.join(SPLITS)}"))
        box_problems = _box_problems(item)
        problems += box_problems
        if not box_problems:
            image_problem = _image_problem(item, decode_images, image_cache)
            if image_problem:
                problems.append(image_problem)
        splits_of_image[record["dicom_id"]].setdefault(record["split"], item.where)
    for dicom_id, splits in splits_of_image.items():
        if len(splits) > 1:
            places = ", ".join(f"{split} ({where})" for split, where in splits.items())
            problems.append(Problem(next(iter(splits.values())),
                                    f"image {dicom_id!r} leaks into several splits: {places}; an image "
                                    "(and all its phrases) must belong to one split"))
    return problems


def validate_records(items: list[Located], source: str | Path, *, decode_images: bool = False) -> None:
    """Raise :class:`DataError` listing every problem of ``items`` (see :func:`check_records`)."""
    problems = check_records(items, decode_images=decode_images)
    if problems:
        raise DataError(source, problems)


def load_records(path: str | Path, *, decode_images: bool = False) -> list[Located]:
    """Read and validate one split file; training calls this and refuses bad data.

    Raises:
        DataError: any problem, one line each, the same lines ``accord data check`` prints.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: grounding split file not found (write it with accord data convert medrpg)")
    items, problems = read_jsonl(path)
    problems += check_records(items, decode_images=decode_images)
    if problems:
        raise DataError(path, problems)
    return items


def require_valid(directory: str | Path, *, decode_images: bool = False) -> dict[str, list[Located]]:
    """Validate all split files of a converted directory together (ids and leaks across splits).

    Returns:
        ``{split: records}`` for the splits present.

    Raises:
        DataError: any problem; FileNotFoundError: no ``<split>.jsonl`` in ``directory``.
    """
    files = split_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no {', '.join(s + '.jsonl' for s in SPLITS)}; "
                                "write them with accord data convert medrpg")
    by_split: dict[str, list[Located]] = {}
    problems: list[Problem] = []
    for file in files:
        by_split[file.stem], parse_problems = read_jsonl(file)
        problems += parse_problems
    problems += check_records([item for items in by_split.values() for item in items], decode_images=decode_images)
    if problems:
        raise DataError(directory, problems)
    return by_split
