"""The medssl data layer: MSD / NIfTI-folder readers, CT preprocessing with caching, phantoms, checks.

Heavy imports (MONAI, nibabel, torch) happen when this package is imported, never when the accord
plugin host merely loads :mod:`accord_medssl.plugin`.
"""

from __future__ import annotations

from accord_medssl.data.check import check, require_valid
from accord_medssl.data.layout import decathlon_items, find_nifti_files, nifti_folder_items
from accord_medssl.data.phantom import LABELS, render_phantom, synth
from accord_medssl.data.pipeline import HU_WINDOW, build_dataset, preprocessing

__all__ = [
    "HU_WINDOW",
    "LABELS",
    "build_dataset",
    "check",
    "decathlon_items",
    "find_nifti_files",
    "nifti_folder_items",
    "preprocessing",
    "render_phantom",
    "require_valid",
    "synth",
]
