"""MS-CXR as users have it, and its conversion to the grounding JSONL (:mod:`accord_medrpg.data.records`).

A dataset root holds:

* ``MS_CXR_Local_Alignment_v1.0.0.csv`` (PhysioNet; any ``MS_CXR_Local_Alignment_*.csv``): columns
  ``dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height`` (``category``
  is accepted for ``category_name``; v1.1.0's extra ``split`` column is used when present). ``path``
  is relative to the MIMIC-CXR-JPG root (``files/p10/p10xxxxxx/sxxxxxxxx/<dicom_id>.jpg``); the box
  is in pixels of the original image.
* optionally the MedRPG reference split files ``MS_CXR_{train,val,test}.pth``: ``torch.save``d
  lists of tuples ``(anno_id, image_id, category_id 1..8, img_file, (x, y, w, h), width, height,
  phrase)`` whose box is in pixels of the authors' 640 x 640 square-resized copy (their
  ``width, height`` are unused, as upstream). They are read with ``torch.load(weights_only=True)``,
  never unpickled freely.

The images live under an image root (by default the dataset root): the MIMIC-CXR-JPG tree, or
MIMIC-CXR DICOMs (a ``.dcm`` beside the CSV's ``.jpg`` name is used when the JPEG is absent). An
image root that already ends in ``files/`` works too.

Splits: the reference split files when present (each tuple is matched to the CSV row with the same
``path`` and phrase and the nearest box; rows they do not list are left out, which reproduces the
reference's 890-pair subset), else the CSV's ``split`` column, else a seeded split by image
(70 / 10 / 20 %), so that no image is in two splits.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from accord.registry import Problem
from accord.utils.files import write_text_atomically

from accord_medrpg.data.records import (
    CATEGORIES,
    SPLITS,
    DataError,
    Located,
    check_records,
    read_jsonl,
    split_files,
)

__all__ = [
    "CSV_COLUMNS",
    "REFERENCE_CANVAS",
    "check",
    "convert",
    "find_csv",
    "read_mscxr",
    "read_reference_split",
]

CSV_COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
#: Side of the square images the reference split files' boxes refer to.
REFERENCE_CANVAS = 640
#: Fractions of images in train / val / test when neither split files nor a split column exist.
SEEDED_SPLIT = (0.7, 0.1, 0.2)


def find_csv(root: Path) -> Path | None:
    """The MS-CXR annotation CSV in ``root`` (``MS_CXR_Local_Alignment_*.csv``), or None."""
    candidates = sorted(root.glob("MS_CXR_Local_Alignment*.csv"))
    return candidates[-1] if candidates else None


def _image_path(images: Path, relative: str) -> Path:
    """The image file for a CSV ``path``: as given, below a root that ends in ``files/``, or a DICOM."""
    relative_path = Path(relative)
    candidates = [images / relative_path]
    if relative_path.parts and relative_path.parts[0] == "files" and images.name == "files":
        candidates.append(images / Path(*relative_path.parts[1:]))
    for candidate in list(candidates):
        candidates.append(candidate.with_suffix(".dcm"))
    return next((c for c in candidates if c.is_file()), candidates[0])


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def read_reference_split(path: Path) -> tuple[list[tuple[int, tuple]], list[Problem]]:
    """Read a reference ``MS_CXR_<split>.pth`` with ``weights_only=True``.

    Returns:
        ``(entries, problems)``: ``(position in the file, tuple)`` of each well-formed entry, and a
        Problem per malformed one (or for the whole file when it does not load).
    """
    import pickle

    import torch

    try:
        entries = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [], [Problem(str(path), f"not a readable reference split file (a torch.save'd list of tuples, "
                                       f"loaded with weights_only=True): {first}")]
    if not isinstance(entries, list):
        return [], [Problem(str(path), f"expected a list of tuples, got {type(entries).__name__}")]
    good, problems = [], []
    for index, entry in enumerate(entries):
        ok = (isinstance(entry, (tuple, list)) and len(entry) == 8 and isinstance(entry[3], str)
              and isinstance(entry[7], str) and isinstance(entry[4], (tuple, list)) and len(entry[4]) == 4
              and all(isinstance(v, (int, float)) for v in entry[4])
              and isinstance(entry[2], int) and 1 <= entry[2] <= len(CATEGORIES))
        if ok:
            good.append((index, tuple(entry)))
        else:
            problems.append(Problem(f"{path}[{index}]", "expected (anno_id, image_id, category_id 1..8, img_file, "
                                                        f"(x, y, w, h), width, height, phrase), got {entry!r}"))
    return good, problems


def _reference_splits(root: Path, rows: list[dict[str, Any]]) -> tuple[list[str | None], list[Problem]] | None:
    """Split of each CSV row from the reference split files, or None when there are none."""
    files = {split: root / f"MS_CXR_{split}.pth" for split in SPLITS}
    if not any(f.is_file() for f in files.values()):
        return None
    by_key: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(rows):
        by_key.setdefault((row["path"], row["label_text"].strip()), []).append(index)
    assigned: list[str | None] = [None] * len(rows)
    problems: list[Problem] = []
    for split, file in files.items():
        if not file.is_file():
            problems.append(Problem(str(file), f"missing: the other reference split files exist, {split} does not"))
            continue
        entries, entry_problems = read_reference_split(file)
        problems += entry_problems
        for index, entry in entries:
            candidates = by_key.get((entry[3], entry[7].strip()), [])
            if not candidates:
                problems.append(Problem(f"{file}[{index}]",
                                        f"no CSV row has path {entry[3]!r} and phrase {entry[7]!r}"))
                continue
            target = np.asarray(entry[4], dtype=float)

            def distance(row_index: int) -> float:
                row = rows[row_index]
                if row["x"] is None or row["image_width"] <= 0 or row["image_height"] <= 0:
                    return float("inf")  # reported by the row checks
                scale = np.array([REFERENCE_CANVAS / row["image_width"], REFERENCE_CANVAS / row["image_height"]] * 2)
                return float(np.abs(np.array([row[k] for k in "xywh"], dtype=float) * scale - target).sum())

            best = min(candidates, key=distance)
            if assigned[best] not in (None, split):
                problems.append(Problem(f"{file}[{index}]", f"the CSV row is already listed in split {assigned[best]}"))
                continue
            assigned[best] = split
    return assigned, problems


def _seeded_splits(rows: list[dict[str, Any]], seed: int) -> list[str]:
    images = sorted({row["dicom_id"] for row in rows})
    order = np.random.default_rng(seed).permutation(len(images))
    train_end = round(SEEDED_SPLIT[0] * len(images))
    val_end = train_end + round(SEEDED_SPLIT[1] * len(images))
    split_of = {images[i]: SPLITS[0] if rank < train_end else SPLITS[1] if rank < val_end else SPLITS[2]
                for rank, i in enumerate(order)}
    return [split_of[row["dicom_id"]] for row in rows]


def read_mscxr(root: str | Path, *, images: str | Path | None = None,
               seed: int = 0) -> tuple[list[Located], list[Problem], int]:
    """Read an MS-CXR root into grounding records (image paths absolute), without checking them.

    Args:
        root: directory with the annotation CSV (and optionally the reference split files).
        images: the MIMIC-CXR-JPG (or DICOM) root; default ``root``.
        seed: seeds the split by image when there are neither split files nor a split column.

    Returns:
        ``(records, problems, left_out)``: the rows with a split, the problems found while reading
        (missing columns, non-numeric fields, bad split files), and how many CSV rows the reference
        split files leave out.
    """
    root = Path(root)
    if not root.is_dir():
        return [], [Problem(str(root), "not a directory; expected an MS-CXR root with the annotation CSV")], 0
    images = Path(images) if images is not None else root
    csv_path = find_csv(root)
    if csv_path is None:
        return [], [Problem(str(root / "MS_CXR_Local_Alignment_v1.0.0.csv"), "missing: no MS-CXR annotation CSV")], 0
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        raw = list(reader)
    if "category_name" not in columns and "category" in columns:
        columns[columns.index("category")] = "category_name"
        for entry in raw:
            entry["category_name"] = entry.pop("category")
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        message = f"missing column(s) {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)}"
        return [], [Problem(str(csv_path), message)], 0
    rows, wheres, problems = [], [], []
    numeric = ("x", "y", "w", "h", "image_width", "image_height")
    for number, entry in enumerate(raw, start=2):  # line 1 is the header
        where = f"{csv_path}:{number}"
        try:
            row = {**entry, **{k: _number(entry[k]) for k in numeric}}
        except (TypeError, ValueError):
            values = {k: entry[k] for k in numeric}
            problems.append(Problem(where, f"x, y, w, h, image_width and image_height must be numbers, got {values}"))
            row = {**entry, **{k: None for k in numeric}}  # kept so that split files still find the row
        rows.append(row)
        wheres.append(where)
    reference = _reference_splits(root, rows)
    if reference is not None:
        splits, split_problems = reference
        problems += split_problems
    elif "split" in columns:
        splits = [row["split"] for row in rows]
    else:
        splits = _seeded_splits(rows, seed)
    records = []
    for row, where, split in zip(rows, wheres, splits):
        if split is None or row["x"] is None:
            continue
        records.append(Located({
            "id": f"mscxr-{int(where.rsplit(':', 1)[1]) - 1:05d}",
            "dicom_id": row["dicom_id"],
            "image": str(_image_path(images, row["path"]).resolve()),
            "phrase": row["label_text"],
            "category": row["category_name"],
            "box": [row["x"], row["y"], row["w"], row["h"]],
            "image_width": row["image_width"],  # a non-integer size is reported by the checks
            "image_height": row["image_height"],
            "split": split,
        }, where, root))
    return records, problems, sum(split is None for split in splits)


def _relative_if_inside(image: str, directory: Path) -> str:
    path = Path(image)
    try:
        return path.relative_to(directory.resolve()).as_posix()
    except ValueError:
        return str(path)


def convert(root: str | Path, out_dir: str | Path, *, images: str | Path | None = None,
            seed: int = 0) -> dict[str, Any]:
    """Convert an MS-CXR root into ``OUT/{train,val,test}.jsonl`` (``accord data convert medrpg``).

    The records are checked first (image headers, not full decodes); any problem refuses the
    conversion. Image paths are written relative to ``out_dir`` when the images lie below it,
    absolute otherwise.

    Returns:
        ``{"files": {split: path}, "records": {split: count}, "left_out": rows not in the split files}``.

    Raises:
        DataError: the dataset has problems (one line each).
    """
    root, out_dir = Path(root), Path(out_dir)
    records, problems, left_out = read_mscxr(root, images=images, seed=seed)
    problems += check_records(records, decode_images=False)
    if problems:
        raise DataError(root, problems)
    files, counts = {}, {}
    for split in SPLITS:
        lines = [json.dumps({**item.record, "image": _relative_if_inside(item.record["image"], out_dir)})
                 for item in records if item.record["split"] == split]
        files[split] = write_text_atomically(out_dir / f"{split}.jsonl", "".join(line + "\n" for line in lines))
        counts[split] = len(lines)
    return {"files": {k: str(v) for k, v in files.items()}, "records": counts, "left_out": left_out}


def check(root: str | Path, *, images: str | Path | None = None) -> list[Problem]:
    """``accord data check medrpg DIR``: an MS-CXR root (annotation CSV) or a converted JSONL directory.

    Every image is decoded. Returns one Problem per defect (empty when the data is valid).
    """
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "not a directory; expected an MS-CXR root (annotation CSV) or a converted "
                                   "directory with train/val/test.jsonl")]
    if find_csv(root) is None and split_files(root):
        items, problems = [], []
        for file in split_files(root):
            located, parse_problems = read_jsonl(file)
            items += located
            problems += parse_problems
        return problems + check_records(items, decode_images=True)
    records, problems, _ = read_mscxr(root, images=images)
    if not records and not problems:
        problems.append(Problem(str(root), "no records: the annotation CSV has no rows with a split"))
    return problems + check_records(records, decode_images=True)
