"""2D chest X-rays for GEMINI: a folder of PNG / JPEG / DICOM images with optional groups and masks.

Layout (GEMINI's chest trainers, JSRT/SCR-style masks)::

    ROOT/images/<group>/<case>.{png,jpg,jpeg,dcm}   # a group per sub-folder (e.g. AP_F, PA_M); or
    ROOT/images/<case>.*                            # no sub-folders: one group
    ROOT/masks/<structure>/<case>.png               # optional binary masks (0 / 255), one folder per
                                                    # structure (heart, left_lung, ...), same size as the image

A pair of GEMINI images is drawn from one group (GEMINI pairs AP/PA x sex), so every group needs
at least two images. :func:`read_cxr` reads any of these files as a float image in [0, 1]:
PNG / JPEG must be grey (8 or 16 bit); DICOM pixel data go through the modality LUT (rescale
slope / intercept), the VOI LUT or window centre / width of the tags, and MONOCHROME1 is inverted
so that bone is bright as in MONOCHROME2. :func:`check_cxr` reports every defect as one Problem.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from accord.registry import Problem

__all__ = ["CXR_SUFFIXES", "check_cxr", "cxr_items", "is_cxr_root", "read_cxr", "read_mask", "synth_cxr"]

CXR_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
IMAGES, MASKS = "images", "masks"
#: Structures of the synthetic masks (SCR annotates lungs, heart and clavicles).
STRUCTURES = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")


def is_cxr_root(root: str | Path) -> bool:
    """Whether ``root`` holds the chest X-ray layout (an ``images/`` folder)."""
    return (Path(root) / IMAGES).is_dir()


def cxr_items(root: str | Path) -> list[dict[str, str]]:
    """``[{"image", "group", "case", "masks": {structure: path}}]`` of every image, sorted.

    Raises:
        FileNotFoundError: no image under ``ROOT/images``.
    """
    root = Path(root)
    files = sorted(p for p in (root / IMAGES).rglob("*") if p.suffix.lower() in CXR_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"{root / IMAGES}: no {'/'.join(CXR_SUFFIXES)} images")
    items = []
    for path in files:
        relative = path.relative_to(root / IMAGES)
        group = relative.parts[0] if len(relative.parts) > 1 else "all"
        masks = {folder.name: str(folder / f"{path.stem}.png") for folder in sorted((root / MASKS).glob("*"))
                 if (folder / f"{path.stem}.png").is_file()} if (root / MASKS).is_dir() else {}
        items.append({"image": str(path), "group": group, "case": path.stem, "masks": masks})
    return items


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


def check_cxr(root: str | Path) -> list[Problem]:
    """One Problem per defect of a chest X-ray folder: unreadable or non-image files, colour images,
    DICOMs without pixel data, masks that are not binary or whose size differs from their image,
    groups with fewer than two images."""
    root = Path(root)
    try:
        items = cxr_items(root)
    except FileNotFoundError as exc:
        return [Problem(str(root / IMAGES), str(exc).split(": ", 1)[-1])]
    problems = []
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
            problems.append(Problem(str(root / IMAGES / group), f"group {group!r} has {count} image; GEMINI pairs two "
                                                                "different images of one group"))
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


def synth_cxr(out_dir: str | Path, num_images: int = 8, size: int = 128, groups: tuple[str, ...] = ("AP_F", "PA_M"),
              seed: int = 0, dicom_every: int = 4) -> Path:
    """Write chest X-ray phantoms in the layout of the module docstring: one template deformed per
    case (random smooth displacement), 8-bit PNGs (every ``dicom_every``-th case a MONOCHROME1 DICOM
    with a window in its tags, 0: none), binary PNG masks per structure; cases cycle over ``groups``."""
    from accord_medssl.data.pairs import random_smooth_flow
    from accord_medssl.gemini.warp import warp

    root = Path(out_dir)
    template, masks = _phantom(size, np.random.default_rng([seed, 10**6]))
    stack = torch.from_numpy(np.stack([template, *[masks[name] for name in STRUCTURES]]).astype(np.float32))[None]
    for index in range(num_images):
        flow = random_smooth_flow((size, size), torch.Generator().manual_seed(seed * 100_003 + index))[None]
        image = warp(stack[:, :1], flow)[0, 0].numpy()
        warped_masks = warp(stack[:, 1:], flow, "nearest")[0].numpy()
        group, case = groups[index % len(groups)], f"cxr_{index:03d}"
        (root / IMAGES / group).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        if dicom_every and index % dicom_every == dicom_every - 1:
            _write_dicom(root / IMAGES / group / f"{case}.dcm", pixels)
        else:
            cv2.imwrite(str(root / IMAGES / group / f"{case}.png"), pixels)
        for name, mask in zip(STRUCTURES, warped_masks):
            (root / MASKS / name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / MASKS / name / f"{case}.png"), (mask > 0.5).astype(np.uint8) * 255)
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
