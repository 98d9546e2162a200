"""The medrpg data layer: MS-CXR reading and conversion, synthetic radiographs, checks, the training pipeline.

Heavy imports (torch, Pillow, pydicom, OpenCV) happen when this package is imported, never when the
accord plugin host merely loads :mod:`accord_medrpg.plugin`.
"""

from __future__ import annotations

from accord_medrpg.data.dataset import GroundingDataset, canvas_to_original, collate_grounding, normalise_image
from accord_medrpg.data.images import ImageReadError, image_size, read_image, write_dicom, write_image
from accord_medrpg.data.mscxr import check, convert, find_csv, read_mscxr, read_reference_split
from accord_medrpg.data.records import (
    CATEGORIES,
    SPLITS,
    DataError,
    Located,
    check_records,
    load_records,
    read_jsonl,
    require_valid,
    validate_records,
)
from accord_medrpg.data.synth import FINDINGS, render_case, synth
from accord_medrpg.data.transforms import (
    DIRECTION_WORDS,
    Placement,
    has_direction_word,
    place_on_canvas,
    sample_negatives,
)

__all__ = [
    "CATEGORIES",
    "DIRECTION_WORDS",
    "GroundingDataset",
    "Placement",
    "canvas_to_original",
    "collate_grounding",
    "has_direction_word",
    "normalise_image",
    "place_on_canvas",
    "sample_negatives",
    "FINDINGS",
    "SPLITS",
    "DataError",
    "ImageReadError",
    "Located",
    "check",
    "check_records",
    "convert",
    "find_csv",
    "image_size",
    "load_records",
    "read_image",
    "read_jsonl",
    "read_mscxr",
    "read_reference_split",
    "render_case",
    "require_valid",
    "synth",
    "validate_records",
    "write_dicom",
    "write_image",
]
