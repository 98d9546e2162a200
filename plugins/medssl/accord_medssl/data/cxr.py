"""2D chest X-rays for GEMINI: a folder of PNG / JPEG / DICOM images with optional groups and masks.

Layout (GEMINI's chest trainers, JSRT/SCR-style masks)::

    ROOT/images/<group>/<case>.{png,jpg,jpeg,dcm}   # a group per sub-folder (e.g. AP_F, PA_M); or
    ROOT/images/<case>.*                            # no sub-folders: one group
    ROOT/masks/<structure>/<case>.png               # optional binary masks (0 / 255), one folder per
                                                    # structure (heart, left_lung, ...), same size as the image

Or a CSV file listing the images, one row each (NIH ChestX-ray14's ``Data_Entry_2017.csv`` is one)::

    ROOT/<table>.csv        # a header row; a path column and optional group columns (CxrTableOptions)
    ROOT/<image_folder>/... # the listed files: paths relative to ROOT/<image_folder> (default ROOT), or absolute
    ROOT/masks/<structure>/<case>.png

where a row's group is its group columns' values joined with ``_`` (``View Position`` and ``Patient
Gender`` give ``AP_F``, ``PA_M``, ...: the reference's sub-folder names). A pair of GEMINI images is
drawn from one group (GEMINI pairs AP/PA x sex), so every group needs at least two images.
:func:`read_cxr` reads any of these files as a float image in [0, 1]:
PNG / JPEG must be grey (8 or 16 bit); DICOM pixel data go through the modality LUT (rescale
slope / intercept), the VOI LUT or window centre / width of the tags, and MONOCHROME1 is inverted
so that bone is bright as in MONOCHROME2. :func:`check_cxr` reports every defect as one Problem.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch
from pydantic import Field
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from accord.config import StrictModel
from accord.registry import Problem

__all__ = ["CXR_SUFFIXES", "CxrTableOptions", "check_cxr", "cxr_items", "is_cxr_root", "read_cxr", "read_mask",
           "synth_cxr"]

CXR_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
IMAGES, MASKS = "images", "masks"
#: Structures of the synthetic masks (SCR annotates lungs, heart and clavicles).
STRUCTURES = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")


class CxrTableOptions(StrictModel):
    """How a CSV ``data`` lists chest X-rays (ignored for a folder, where sub-folders are the groups)."""

    path_column: str = Field("image", description="column holding each image's path (NIH ChestX-ray14: 'Image Index')")
    group_columns: list[str] = Field(
        [], description="columns whose joined values form a row's group, a pair coming from one group (GEMINI: "
        "['View Position', 'Patient Gender'], AP/PA x sex); empty: one group")
    image_folder: str = Field("", description="folder the CSV's relative paths start from, relative to the CSV's "
                                              "folder (NIH ChestX-ray14: 'images'); empty: the CSV's folder")


def is_cxr_root(root: str | Path) -> bool:
    """Whether ``root`` holds the chest X-ray layout: an ``images/`` folder, or a ``.csv`` file."""
    root = Path(root)
    return (root / IMAGES).is_dir() or (root.is_file() and root.suffix.lower() == ".csv")


def _masks_of(folder: Path, stem: str) -> dict[str, str]:
    """``{structure: path}`` of ``folder/masks/<structure>/<stem>.png`` that exist."""
    if not (folder / MASKS).is_dir():
        return {}
    return {structure.name: str(structure / f"{stem}.png") for structure in sorted((folder / MASKS).glob("*"))
            if (structure / f"{stem}.png").is_file()}


def _folder_items(root: Path) -> list[dict[str, str]]:
    files = sorted(p for p in (root / IMAGES).rglob("*") if p.suffix.lower() in CXR_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"{root / IMAGES}: no {'/'.join(CXR_SUFFIXES)} images")
    items = []
    for path in files:
        relative = path.relative_to(root / IMAGES)
        group = relative.parts[0] if len(relative.parts) > 1 else "all"
        items.append({"image": str(path), "group": group, "case": path.stem, "masks": _masks_of(root, path.stem)})
    return items


def _table_items(table: Path, options: CxrTableOptions) -> tuple[list[dict], list[Problem]]:
    """The images a CSV lists (in row order) and one Problem per defect of the table itself: unreadable,
    missing columns, rows with an empty or non-image path, a missing file, an empty group cell or a
    repeated image (a row named ``<csv>:<line>``)."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [], [Problem(str(table), f"not a readable CSV ({type(exc).__name__}: {exc})")]
    needed = [options.path_column, *options.group_columns]
    if not columns:
        return [], [Problem(str(table), f"empty; expected a header row naming the columns {needed}")]
    absent = [name for name in needed if name not in columns]
    if absent:
        return [], [Problem(str(table), f"no column {name!r} (columns: {[c for c in columns if c]}); set "
                                        f"cxr.path_column / cxr.group_columns") for name in absent]
    if not rows:
        return [], [Problem(str(table), "lists no image (a header row only)")]
    base = table.parent / options.image_folder
    items, problems, seen = [], [], {}
    for line, row in rows:
        where = f"{table}:{line}"
        value = (row.get(options.path_column) or "").strip()
        empty = [name for name in options.group_columns if not (row.get(name) or "").strip()]
        for name in empty:
            problems.append(Problem(where, f"empty {name!r} cell; every image needs its group"))
        if not value:
            problems.append(Problem(where, f"empty {options.path_column!r} cell; expected an image path"))
            continue
        path = base / value
        if path.suffix.lower() not in CXR_SUFFIXES:
            problems.append(Problem(where, f"{value!r} is not an image path ({'/'.join(CXR_SUFFIXES)} expected)"))
        elif not path.is_file():
            problems.append(Problem(where, f"{value!r} not found (looked for {path})"))
        elif str(path) in seen:
            problems.append(Problem(where, f"{value!r} is listed again (first on line {seen[str(path)]}); GEMINI pairs "
                                           "two different images"))
        elif not empty:
            seen[str(path)] = line
            group = "_".join(row[name].strip() for name in options.group_columns) or "all"
            items.append({"image": str(path), "group": group, "case": path.stem,
                          "masks": _masks_of(table.parent, path.stem)})
    return items, problems


def _require_folder_defaults(root: Path, options: CxrTableOptions | None) -> None:
    if options is not None and options != CxrTableOptions():
        raise ValueError(f"{root}: cxr table options ({options.model_dump(exclude_defaults=True)}) apply to a CSV data "
                         "file; a folder's groups are its sub-folders of images/")


def cxr_items(root: str | Path, options: CxrTableOptions | None = None) -> list[dict[str, str]]:
    """``[{"image", "group", "case", "masks": {structure: path}}]`` of every image: sorted (a folder) or
    in row order (a CSV file read with ``options``).

    Raises:
        FileNotFoundError: no image under ``ROOT/images``.
        ValueError: a CSV with any problem :func:`check_cxr` reports about the table (the first few
            named), or table ``options`` given for a folder.
    """
    root = Path(root)
    if root.is_file():
        items, problems = _table_items(root, options or CxrTableOptions())
        if problems:
            raise ValueError(f"{root}: {len(problems)} problem(s) in the table, e.g. "
                             + "; ".join(map(str, problems[:3])))
        return items
    _require_folder_defaults(root, options)
    return _folder_items(root)


def _read_dicom(path: Path) -> np.ndarray:
    dataset = pydicom.dcmread(path)
    if "PixelData" not in dataset:
        raise ValueError("DICOM without pixel data")
    pixels = apply_modality_lut(dataset.pixel_array, dataset)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        pixels = apply_voi_lut(pixels, dataset)
    pixels = pixels.astype(np.float64)
    low, high = pixels.min(), pixels.max()
    image = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 1.0 - image
    return image


def _resize_to(size: int | tuple[int, int]) -> tuple[int, int]:
    """cv2's ``(width, height)`` of a square side or an ``(H, W)``."""
    height, width = (size, size) if isinstance(size, int) else size
    return int(width), int(height)


def read_cxr(path: str | Path, size: int | tuple[int, int] | None = 512) -> torch.Tensor:
    """A chest X-ray as a float32 ``(1, H, W)`` tensor in [0, 1], resized to ``size`` (a side or ``(H, W)``;
    None: as stored).

    Raises:
        ValueError: unreadable, not grey, or a DICOM without pixel data; the message names the file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".dcm":
            image = _read_dicom(path)
        else:
            raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise ValueError("not a readable image")
            if raw.ndim == 3 and not all(np.array_equal(raw[..., 0], raw[..., c]) for c in range(1, raw.shape[2])):
                raise ValueError(f"colour image ({raw.shape[2]} channels that differ); a grey X-ray is expected")
            grey = raw if raw.ndim == 2 else raw[..., 0]
            image = grey.astype(np.float64) / np.iinfo(grey.dtype).max
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if size is not None:
        image = cv2.resize(image, _resize_to(size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(image.astype(np.float32))[None]


def read_mask(path: str | Path, size: int | tuple[int, int] | None = 512) -> torch.Tensor:
    """A binary PNG mask as a float32 ``(1, H, W)`` tensor of 0 / 1, resized with nearest."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{path}: not a readable image")
    if size is not None:
        mask = cv2.resize(mask, _resize_to(size), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy((mask > 0).astype(np.float32))[None]


def check_cxr(root: str | Path, path_column: str = "image", group_columns: Sequence[str] | str = (),
              image_folder: str = "") -> list[Problem]:
    """One Problem per defect of a chest X-ray folder or CSV: unreadable or non-image files, colour images,
    DICOMs without pixel data, masks that are not binary or whose size differs from their image,
    groups with fewer than two images; for a CSV (read with the :class:`CxrTableOptions` fields given
    here, as ``accord data check medssl TABLE.csv path_column=... group_columns=[...]``) also an
    unreadable table, missing columns, and rows with an empty or non-image path, a missing file, an
    empty group cell or a repeated image.

    Raises:
        TypeError: table options for a folder.
    """
    root = Path(root)
    columns = [group_columns] if isinstance(group_columns, str) else list(group_columns)
    options = CxrTableOptions(path_column=str(path_column), group_columns=[str(c) for c in columns],
                              image_folder=str(image_folder or ""))
    problems: list[Problem] = []
    if root.is_file():
        items, problems = _table_items(root, options)
    else:
        if options != CxrTableOptions():  # TypeError: the CLI's answer to an option a check does not take
            raise TypeError(f"options {sorted(options.model_dump(exclude_defaults=True))} apply to a chest X-ray "
                            f"CSV file, not to {root}")
        try:
            items = _folder_items(root)
        except FileNotFoundError as exc:
            return [Problem(str(root / IMAGES), str(exc).split(": ", 1)[-1])]
        for stray in sorted((root / IMAGES).rglob("*")):
            if stray.is_file() and stray.suffix.lower() not in CXR_SUFFIXES and not stray.name.startswith("."):
                problems.append(Problem(str(stray), f"not an image ({'/'.join(CXR_SUFFIXES)} expected)"))
    groups: dict[str, int] = {}
    for item in items:
        groups[item["group"]] = groups.get(item["group"], 0) + 1
        try:
            image = read_cxr(item["image"], size=None)
        except ValueError as exc:
            problems.append(Problem(item["image"], str(exc).split(": ", 1)[-1]))
            continue
        for structure, mask_path in item["masks"].items():
            mask = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
            if mask is None:
                problems.append(Problem(mask_path, "not a readable image"))
                continue
            values = np.unique(mask)
            if not set(values.tolist()) <= {0, 1, 255, 65535}:
                problems.append(Problem(mask_path, f"{structure} mask is not binary: values {values[:6].tolist()}"))
            if mask.shape[:2] != tuple(image.shape[1:]):
                problems.append(Problem(mask_path, f"mask size {mask.shape[:2]} differs from its image "
                                                   f"{Path(item['image']).name} {tuple(image.shape[1:])}"))
    for group, count in groups.items():
        if count < 2:
            where = str(root) if root.is_file() else str(root / IMAGES / group)
            by = f" ({' x '.join(options.group_columns)})" if root.is_file() and options.group_columns else ""
            problems.append(Problem(where, f"group {group!r}{by} has {count} image; GEMINI pairs two different images "
                                           "of one group"))
    return problems


def _phantom(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A frontal chest radiograph phantom in [0, 1] and its structure masks."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    jitter = lambda: rng.uniform(-0.03, 0.03)  # noqa: E731

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((y - cy - jitter()) / ry) ** 2 + ((x - cx - jitter()) / rx) ** 2 <= 1

    masks = {
        "right_lung": ellipse(-0.05, -0.42, 0.62, 0.27),  # image left = patient right
        "left_lung": ellipse(-0.05, 0.42, 0.6, 0.25),
        "heart": ellipse(0.25, 0.1, 0.3, 0.32),
        "right_clavicle": (np.abs(y + 0.72 + 0.25 * x + jitter()) < 0.05) & (x > -0.75) & (x < -0.05),
        "left_clavicle": (np.abs(y + 0.72 - 0.25 * x + jitter()) < 0.05) & (x < 0.75) & (x > 0.05),
    }
    image = np.where(np.abs(x) < 0.9, 0.75, 0.1)
    image[masks["right_lung"] | masks["left_lung"]] = 0.25
    image[masks["heart"]] = 0.6
    for name in ("right_clavicle", "left_clavicle"):
        image[masks[name]] = 0.95
    image = image + rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1), masks


#: NIH ChestX-ray14's ``Data_Entry_2017.csv`` header, trailing comma included (12 names, 11 values a row).
NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "")
NIH_TABLE = "Data_Entry_2017.csv"


def synth_cxr(out_dir: str | Path, num_images: int = 8, size: int = 128, groups: tuple[str, ...] = ("AP_F", "PA_M"),
              seed: int = 0, dicom_every: int = 4, max_displacement: float = 0.1,
              layout: str = "folders") -> Path:
    """Write chest X-ray phantoms: one template deformed per case (random smooth displacement of at
    most ``max_displacement`` x ``size``), 8-bit PNGs (every ``dicom_every``-th case a MONOCHROME1
    DICOM with a window in its tags, 0: none), binary PNG masks per structure; cases cycle over ``groups``.

    ``layout="folders"``: ``images/<group>/<case>``, the module docstring's folder layout.
    ``layout="nih"``: NIH ChestX-ray14's, all images in ``images/`` and their groups in
    ``Data_Entry_2017.csv`` (each group name ``<view>_<sex>`` gives its ``View Position`` and
    ``Patient Gender``); read it with ``CxrTableOptions(path_column="Image Index", image_folder="images",
    group_columns=["View Position", "Patient Gender"])``.

    Raises:
        ValueError: an unknown layout, or (``nih``) a group name that is not ``<view>_<sex>``.
    """
    from accord_medssl.data.pairs import random_smooth_flow
    from accord_medssl.gemini.warp import warp

    if layout not in ("folders", "nih"):
        raise ValueError(f"layout: expected 'folders' or 'nih', got {layout!r}")
    if layout == "nih" and any(len(group.split("_")) != 2 for group in groups):
        raise ValueError(f"groups: the nih layout needs <view>_<sex> names such as AP_F, got {list(groups)}")
    root = Path(out_dir)
    template, masks = _phantom(size, np.random.default_rng([seed, 10**6]))
    stack = torch.from_numpy(np.stack([template, *[masks[name] for name in STRUCTURES]]).astype(np.float32))[None]
    rows = []
    for index in range(num_images):
        flow = random_smooth_flow((size, size), torch.Generator().manual_seed(seed * 100_003 + index),
                                  max_displacement)[None]
        image = warp(stack[:, :1], flow)[0, 0].numpy()
        warped_masks = warp(stack[:, 1:], flow, "nearest")[0].numpy()
        group, case = groups[index % len(groups)], f"cxr_{index:03d}"
        folder = root / IMAGES / (group if layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        name = f"{case}.dcm" if dicom_every and index % dicom_every == dicom_every - 1 else f"{case}.png"
        if name.endswith(".dcm"):
            _write_dicom(folder / name, pixels)
        else:
            cv2.imwrite(str(folder / name), pixels)
        view, sex = group.split("_") if layout == "nih" else ("", "")
        rows.append([name, "No Finding", "0", str(index + 1), "50", sex, view, str(size), str(size), "0.143", "0.143"])
        for structure, mask in zip(STRUCTURES, warped_masks):
            (root / MASKS / structure).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / MASKS / structure / f"{case}.png"), (mask > 0.5).astype(np.uint8) * 255)
    if layout == "nih":
        with (root / NIH_TABLE).open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(NIH_COLUMNS)
            writer.writerows(rows)
    return root


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit DICOM radiograph, stored MONOCHROME1 (inverted) with a full-range window."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME1"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.WindowCenter, dataset.WindowWidth = 127.5, 256
    dataset.PixelData = (255 - pixels).tobytes()
    dataset.save_as(path, enforce_file_format=True)
