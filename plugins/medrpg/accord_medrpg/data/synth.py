"""Synthetic chest X-rays with grounded phrases, written in the MS-CXR layout.

``accord data synth medrpg OUT`` writes what a user of MS-CXR has, so the converter and the checks
serve generated and real data alike:

* ``OUT/MS_CXR_Local_Alignment_v1.0.0.csv`` (``dicom_id, category_name, label_text, path, x, y, w,
  h, image_width, image_height``, boxes in original pixels);
* the images under ``OUT/files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` (MIMIC-CXR-JPG layout),
  some as PNG and some as DICOM (MONOCHROME1 and MONOCHROME2, with and without a VOI window);
* the reference split files ``OUT/MS_CXR_{train,val,test}.pth`` (lists of tuples, boxes in the 640
  square frame), splitting by image.

Each radiograph has a body, two dark lungs with ribs, a heart, the spine and domed diaphragms,
with random position, size, exposure and noise. It carries one or two findings, each a record:
cardiomegaly (an enlarged heart), pleural effusion (a bright meniscus at a lung base), pneumothorax
(a dark rim along the apex and chest wall behind a thin pleural line), consolidation and pneumonia
(bright patches), a nodular opacity ("Lung Opacity"), atelectasis (a bright band at a base) and
edema (bilateral perihilar haze). Phrases come from templates with side words (the patient's
left / right: right is on the image's left, as on a PA film), zone words (upper / mid / lower) and
size words that follow the drawn size, so a grounding model can learn them. The box is the extent
of the drawn finding. Everything follows from ``seed``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accord.utils.files import write_atomically, write_text_atomically

from accord_medrpg.data.images import write_dicom, write_image
from accord_medrpg.data.mscxr import CSV_COLUMNS, REFERENCE_CANVAS
from accord_medrpg.data.records import CATEGORIES, SPLITS

__all__ = ["FINDINGS", "SynthCase", "render_case", "synth"]

CSV_NAME = "MS_CXR_Local_Alignment_v1.0.0.csv"
#: Finding kinds -> MS-CXR category. Nodules are labelled "Lung Opacity", as MS-CXR does.
FINDINGS = {
    "cardiomegaly": "Cardiomegaly",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "nodule": "Lung Opacity",
    "atelectasis": "Atelectasis",
    "edema": "Edema",
}
#: Findings that sit in one lung, so a second finding can go to the other side.
_LATERAL = ("effusion", "pneumothorax", "consolidation", "pneumonia", "nodule", "atelectasis")
_SPLIT_FRACTIONS = (0.7, 0.15)  # train, val; the rest is test


@dataclass
class SynthCase:
    """One rendered radiograph and its grounded phrases.

    Attributes:
        image: ``float32 (H, W)`` in ``[0, 1]``.
        findings: ``(kind, phrase, (x, y, w, h))`` per finding, boxes in integer pixels.
    """

    image: np.ndarray
    findings: list[tuple[str, str, tuple[int, int, int, int]]]


class _Canvas:
    """Normalised coordinates ``u = x / W``, ``v = y / H`` over a ``(H, W)`` grid."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.v, self.u = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width,
                                     indexing="ij")

    def ellipse(self, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        """``((u - cu) / ru)^2 + ((v - cv) / rv)^2``: < 1 inside the ellipse."""
        return ((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2

    def box(self, mask: np.ndarray) -> tuple[int, int, int, int]:
        """Integer ``(x, y, w, h)`` enclosing a non-empty mask."""
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in ``[-1, 1]``: a coarse random grid upsampled bilinearly."""
    import cv2

    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).clip(-1, 1)


def _size_word(value: float, small: float, large: float, words: tuple[str, str, str]) -> str:
    return words[0] if value < small else words[2] if value > large else words[1]


def render_case(rng: np.random.Generator, height: int, width: int, kinds: list[str], sides: list[str]) -> SynthCase:
    """Render one radiograph with the given findings (``sides``: ``"left"``/``"right"`` per finding)."""
    import cv2

    canvas = _Canvas(height, width)
    shift_u, shift_v = rng.uniform(-0.03, 0.03, size=2)
    scale = rng.uniform(0.93, 1.05)
    image = np.full((height, width), 0.04, dtype=np.float32)
    image[canvas.ellipse(0.5 + shift_u, 0.58 + shift_v, 0.47 * scale, 0.55 * scale) < 1] = 0.42
    image[np.abs(canvas.u - 0.5 - shift_u) < 0.045 * scale] += 0.18  # spine and mediastinum

    # Lungs: the patient's right lung is on the image's left.
    lung_centre = {"right": 0.31, "left": 0.69}
    lungs = {}
    for side, cu in lung_centre.items():
        cu = 0.5 + (cu - 0.5) * scale + shift_u
        cv = 0.45 + shift_v + (0.015 if side == "left" else 0.0)  # the left hemidiaphragm sits lower
        lungs[side] = (cu, cv, 0.155 * scale, 0.30 * scale)
    lung_mask = np.zeros((height, width), bool)
    for cu, cv, ru, rv in lungs.values():
        lung_mask |= canvas.ellipse(cu, cv, ru, rv) < 1
    texture = 0.03 * _smooth_noise(rng, (height, width), 12)
    image[lung_mask] = 0.14 + texture[lung_mask]

    heart_scale = 1.0
    if "cardiomegaly" in kinds:
        heart_scale = rng.uniform(1.3, 1.65)
    heart = (0.54 + shift_u, 0.64 + shift_v, 0.115 * scale * heart_scale, 0.10 * scale * min(heart_scale, 1.3))
    heart_mask = canvas.ellipse(*heart) < 1
    image[heart_mask] = np.maximum(image[heart_mask], 0.5)

    # Ribs: curved bright bands over the lungs, falling laterally.
    for k in range(9):
        v0 = 0.17 + shift_v + 0.068 * k * scale
        curve = v0 + 0.9 * (canvas.u - 0.5 - shift_u) ** 2
        band = (np.abs(canvas.v - curve) < 0.011 * scale) & lung_mask
        image[band] += 0.09

    findings = []
    for kind, side in zip(kinds, sides):
        findings.append(_draw_finding(rng, canvas, image, kind, side, lungs, heart, heart_scale))

    gamma = rng.uniform(0.85, 1.15)
    image = np.clip(image, 0, 1) ** gamma
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=max(0.6, height / 320))
    image = image + rng.normal(0, 0.015, size=image.shape).astype(np.float32)
    return SynthCase(np.clip(image, 0, 1).astype(np.float32), findings)


def _draw_finding(rng: np.random.Generator, canvas: _Canvas, image: np.ndarray, kind: str, side: str,
                  lungs: dict[str, tuple[float, float, float, float]], heart: tuple[float, float, float, float],
                  heart_scale: float) -> tuple[str, str, tuple[int, int, int, int]]:
    cu, cv, ru, rv = lungs[side]
    lung = canvas.ellipse(cu, cv, ru, rv) < 1
    lateral = -1.0 if side == "right" else 1.0  # the chest wall's direction on the image

    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    if kind == "cardiomegaly":
        mask = canvas.ellipse(*heart) < 1
        size = _size_word(heart_scale, 1.42, 1.54, ("mild", "moderate", "severe"))
        phrase = pick([f"{size} cardiomegaly", "cardiomegaly", "enlarged cardiac silhouette",
                       f"{size} enlargement of the cardiac silhouette"])
    elif kind == "effusion":
        fraction = rng.uniform(0.12, 0.45)
        level = cv + rv - 2 * rv * fraction
        meniscus = level - 0.25 * np.clip(lateral * (canvas.u - cu), 0, None)  # climbs along the chest wall
        mask = lung & (canvas.v > meniscus)
        image[mask] = 0.5 + 0.3 * (image[mask] - 0.14)
        size = _size_word(fraction, 0.22, 0.34, ("small", "moderate", "large"))
        phrase = pick([f"{size} {side} pleural effusion", f"{size} {side}-sided effusion",
                       f"{side} pleural effusion", f"{size} {side} effusion"])
    elif kind == "pneumothorax":
        fraction = rng.uniform(0.2, 0.45)
        inner = canvas.ellipse(cu - lateral * ru * fraction * 0.5, cv + rv * fraction * 0.5,
                               ru * (1 - fraction * 0.7), rv * (1 - fraction * 0.5))
        mask = lung & (inner >= 1) & (canvas.v < cv + 0.35 * rv)
        image[mask] = 0.03
        pleural_line = lung & (np.abs(inner - 1) < 0.07) & (canvas.v < cv + 0.35 * rv)
        image[pleural_line] = 0.45
        mask |= pleural_line
        size = _size_word(fraction, 0.28, 0.37, ("small", "moderate", "large"))
        phrase = pick([f"{size} {side} pneumothorax", f"{size} {side}-sided pneumothorax",
                       f"{side} apical pneumothorax", f"{size} {side} apical pneumothorax"])
    elif kind in ("consolidation", "pneumonia", "nodule", "atelectasis"):
        zone = pick(["upper", "mid", "lower"]) if kind != "atelectasis" else "lower"
        zone_v = {"upper": cv - 0.5 * rv, "mid": cv, "lower": cv + 0.5 * rv}[zone]
        centre_u = cu + lateral * ru * rng.uniform(-0.3, 0.3)
        if kind == "nodule":
            radius = rng.uniform(0.018, 0.045)
            mask = canvas.ellipse(centre_u, zone_v, radius, radius * canvas.width / canvas.height) < 1
            image[mask] += 0.42
            size = _size_word(radius, 0.027, 0.037, ("small", "", "large"))
            words = f"{size} " if size else ""
            phrase = pick([f"{words}nodular opacity in the {side} {zone} lung", f"{side} {zone} lung nodule",
                           f"{words}{side} {zone} zone opacity"])
        elif kind == "atelectasis":
            thickness = rng.uniform(0.02, 0.045)
            mask = lung & (canvas.ellipse(centre_u, zone_v + 0.15 * rv, ru * 0.75, thickness) < 1)
            image[mask] += 0.33
            phrase = pick([f"{side} basilar atelectasis", f"linear atelectasis at the {side} base",
                           f"{side} lower lobe atelectasis"])
        else:
            extent = rng.uniform(0.35, 0.7)
            blobs = np.zeros_like(image)
            for _ in range(4 if kind == "consolidation" else 6):
                bu = centre_u + rng.uniform(-0.4, 0.4) * ru * extent
                bv = zone_v + rng.uniform(-0.3, 0.3) * rv * extent
                blobs = np.maximum(blobs, np.exp(-canvas.ellipse(bu, bv, ru * extent * 0.45, rv * extent * 0.25)))
            mask = lung & (blobs > 0.4)
            strength = 0.38 if kind == "consolidation" else 0.28
            image[mask] += strength * blobs[mask]
            size = _size_word(extent, 0.47, 0.6, ("small", "patchy", "extensive"))
            if kind == "consolidation":
                phrase = pick([f"{side} {zone} lobe consolidation", f"{size} consolidation in the {side} {zone} lung",
                               f"{side} {zone} zone consolidation"])
            else:
                phrase = pick([f"{side} {zone} lobe pneumonia", f"{size} opacity in the {side} {zone} lung "
                               "concerning for pneumonia", f"{side} {zone} zone pneumonia"])
    elif kind == "edema":
        haze = np.zeros_like(image)
        for lu, lv, lru, lrv in lungs.values():
            haze = np.maximum(haze, np.exp(-canvas.ellipse(lu - (lu - 0.5) * 0.5, lv + 0.05, lru * 0.7, lrv * 0.55)))
        severity = rng.uniform(0.15, 0.3)
        lungs_mask = np.zeros_like(lung)
        for lu, lv, lru, lrv in lungs.values():
            lungs_mask |= canvas.ellipse(lu, lv, lru, lrv) < 1
        mask = lungs_mask & (haze > 0.45)
        image[mask] += severity * haze[mask]
        size = _size_word(severity, 0.2, 0.25, ("mild", "moderate", "severe"))
        phrase = pick([f"{size} pulmonary edema", f"{size} interstitial edema", "bilateral perihilar edema"])
    else:
        raise ValueError(f"unknown finding kind {kind!r}; expected one of {', '.join(FINDINGS)}")
    return kind, " ".join(phrase.split()), canvas.box(mask)


def _case_plan(rng: np.random.Generator, index: int) -> tuple[list[str], list[str]]:
    """Findings and sides of case ``index``: every category in turn, a second lateral finding at 35 %."""
    kinds_in_turn = list(FINDINGS)
    first = kinds_in_turn[index % len(kinds_in_turn)]
    side = "left" if rng.random() < 0.5 else "right"
    kinds, sides = [first], [side]
    if rng.random() < 0.35:
        second = _LATERAL[int(rng.integers(len(_LATERAL)))]
        kinds.append(second)
        sides.append("left" if side == "right" else "right")
    return kinds, sides


def _hex_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))


def synth(out_dir: str | Path, *, num_images: int = 48, image_size: int = 256, seed: int = 0,
          formats: tuple[str, ...] = ("jpg", "jpg", "jpg", "dcm", "jpg", "png", "jpg", "jpg")) -> Path:
    """Write a synthetic MS-CXR-layout dataset (see the module docstring) and return ``out_dir``.

    Args:
        out_dir: output directory.
        num_images: radiographs (each has one or two phrases).
        image_size: image height in pixels; widths are the height or 0.85 of it (portrait films).
        seed: everything follows from it.
        formats: file format of image ``i`` is ``formats[i % len(formats)]`` (``jpg``, ``png``, ``dcm``).
    """
    if num_images < 3:
        raise ValueError(f"num_images must be >= 3 (one image per split at least), got {num_images}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 pixels, got {image_size}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_images)
    train_end = max(1, round(_SPLIT_FRACTIONS[0] * num_images))
    val_end = max(train_end + 1, train_end + round(_SPLIT_FRACTIONS[1] * num_images))
    split_of = {int(i): SPLITS[0] if rank < train_end else SPLITS[1] if rank < val_end else SPLITS[2]
                for rank, i in enumerate(order)}
    rows, reference = [], {split: [] for split in SPLITS}
    dicom_count = 0
    for index in range(num_images):
        case_rng = np.random.default_rng([seed, index])
        height = image_size
        width = image_size if case_rng.random() < 0.5 else round(0.85 * image_size)
        kinds, sides = _case_plan(case_rng, index)
        case = render_case(case_rng, height, width, kinds, sides)
        dicom_id = _hex_id(case_rng)
        subject = 10_000_000 + 7919 * index
        suffix = formats[index % len(formats)]
        relative = f"files/p{str(subject)[:2]}/p{subject}/s{50_000_000 + 104_729 * index}/{dicom_id}.{suffix}"
        if suffix == "dcm":
            window = (2048.0, 3000.0) if dicom_count % 2 else None
            write_dicom(out_dir / relative, case.image, monochrome1=dicom_count % 2 == 0, window=window,
                        patient_id=str(subject))
            dicom_count += 1
        else:
            write_image(out_dir / relative, case.image)
        for kind, phrase, box in case.findings:
            category = FINDINGS[kind]
            rows.append([dicom_id, category, phrase, relative, *box, width, height])
            square = (round(box[0] * REFERENCE_CANVAS / width), round(box[1] * REFERENCE_CANVAS / height),
                      round(box[2] * REFERENCE_CANVAS / width), round(box[3] * REFERENCE_CANVAS / height))
            # (anno_id, image_id, category_id, img_file, bbox in the 640 frame, width, height, phrase);
            # the reference stores the original size as (height, width) in its width/height slots.
            reference[split_of[index]].append((len(rows), index, CATEGORIES.index(category) + 1, relative, square,
                                               height, width, phrase))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    write_text_atomically(out_dir / CSV_NAME, text.getvalue())
    _write_reference_splits(out_dir, reference)
    return out_dir


def _write_reference_splits(out_dir: Path, reference: dict[str, list[tuple]]) -> None:
    import torch

    for split, entries in reference.items():
        buffer = io.BytesIO()
        torch.save(entries, buffer)
        write_atomically(out_dir / f"MS_CXR_{split}.pth", lambda handle: handle.write(buffer.getvalue()))
