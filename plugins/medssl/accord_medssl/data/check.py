"""Validate a user's dataset before training: one :class:`~accord.registry.Problem` per defect.

:func:`check` picks the layout by what it finds in ROOT:

* ``ROOT/dataset.json`` exists, or ROOT has an ``imagesTr``/``labelsTr``/``imagesTs`` folder:
  **MSD mode**. dataset.json must parse and declare ``labels``, ``modality``, ``training`` and
  ``numTraining``; every listed file must exist and pass the volume checks below; every
  training label must match its image's grid and hold only declared label ids.
* otherwise: **plain folder mode** (unlabeled pretraining data). Every ``*.nii``/``*.nii.gz``
  under ROOT (recursive, hidden files skipped) must pass the volume checks as a single-channel
  3D CT; an empty folder is a problem.

Volume checks: a ``.nii.gz`` decompresses completely with a matching gzip checksum and length
(nibabel reads only the bytes it needs and never reaches the trailer, so flipped bytes or a
cut-off end would otherwise train on wrong voxels); the file opens with nibabel and its voxels
decode; the array is 3D ``(X, Y, Z)``, where a 4D ``(X, Y, Z, 1)`` counts as 3D because MONAI
loads it as one channel (``EnsureChannelFirstd`` gives the same ``(1, X, Y, Z)``), and an MSD
image of an N-modality dataset is ``(X, Y, Z, N)``; no NaN or Inf voxel; a finite affine whose
voxel sizes (the norms of its columns, which is what MONAI resamples by) and the header's pixdim
all lie in (0, 20] mm.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from accord.registry import Problem
from accord_medssl.data.layout import DATASET_JSON, find_nifti_files, is_msd_root

__all__ = ["MAX_SPACING_MM", "AFFINE_TOLERANCE_MM", "check", "require_valid"]

#: Largest voxel size accepted; thicker "slices" are almost surely a wrong header.
MAX_SPACING_MM = 20.0
#: Largest element-wise difference between an image's and its label's affine (mm). Tools that
#: round-trip affines through float32 quaternions differ by ~1e-5 mm; a real misregistration is
#: of the order of a voxel.
AFFINE_TOLERANCE_MM = 1e-3
REQUIRED_FIELDS = ("labels", "modality", "training", "numTraining")
_READ_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error)
_GZIP_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class _Volume:
    """A decoded NIfTI.

    Attributes:
        path: the file.
        array: voxels as stored, ``(X, Y, Z)`` or ``(X, Y, Z, C)`` for a valid volume.
        affine: ``(4, 4)`` voxel-to-RAS affine as nibabel (and MONAI) read it.
        pixdim: the header's voxel sizes of the spatial axes, before nibabel's fixes.
    """

    path: Path
    array: np.ndarray
    affine: np.ndarray
    pixdim: tuple[float, ...]


def _read_volume(path: Path, problems: list[Problem]) -> _Volume | None:
    """Decode ``path``; on failure append a Problem and return None."""
    if not path.is_file():
        problems.append(Problem(str(path), "missing"))
        return None
    if path.name.endswith(".gz"):
        try:
            _read_whole_gzip(path)
        except (OSError, EOFError, zlib.error) as exc:
            problems.append(Problem(str(path), f"unreadable NIfTI: corrupt or truncated gzip data "
                                               f"({type(exc).__name__}: {exc}); copy the file again"))
            return None
    try:
        image = nib.load(path)
        # nibabel "fixes" a zero pixdim to 1 mm while loading; re-read the header unfixed to see it.
        with nib.openers.ImageOpener(path) as stream:
            raw_header = type(image.header).from_fileobj(stream, check=False)
        return _Volume(path, np.asanyarray(image.dataobj), image.affine, raw_header.get_zooms()[:3])
    except _READ_ERRORS as exc:
        problems.append(Problem(str(path), f"unreadable NIfTI ({type(exc).__name__}: {exc})"))
        return None


def _read_whole_gzip(path: Path) -> None:
    """Decompress ``path`` to its end in chunks; :mod:`gzip` checks the CRC-32 and length trailer there.

    Raises:
        OSError: ``gzip.BadGzipFile`` for a wrong checksum, length or header.
        EOFError: the stream ends before its trailer.
        zlib.error: invalid compressed data.
    """
    with gzip.open(path, "rb") as stream:
        while stream.read(_GZIP_CHUNK_BYTES):
            pass


def _has_volume_shape(volume: _Volume, channels: int) -> bool:
    """``(X, Y, Z)``, ``(X, Y, Z, 1)`` (one channel for MONAI) or ``(X, Y, Z, channels)``."""
    shape = volume.array.shape
    return len(shape) == 3 or (len(shape) == 4 and shape[3] in {1, channels})


def _check_volume(volume: _Volume, channels: int) -> list[Problem]:
    """Dimensionality, finiteness and spacing of one volume with ``channels`` expected channels."""
    problems = []
    name, shape = str(volume.path), volume.array.shape
    if not _has_volume_shape(volume, channels):
        expected = "(X, Y, Z)" + (f" or (X, Y, Z, {channels})" if channels > 1 else "")
        problems.append(Problem(name, f"expected a 3D volume {expected}, got a {len(shape)}D array of shape {shape}"))
    if volume.array.dtype.kind in "fc":
        nan, inf = int(np.isnan(volume.array).sum()), int(np.isinf(volume.array).sum())
        if nan or inf:
            problems.append(Problem(name, f"{nan} NaN and {inf} Inf voxels; every voxel must be finite"))
    # The affine is what MONAI resamples by; a zero pixdim is checked too because nibabel would
    # silently read it as 1 mm.
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    if not np.isfinite(volume.affine).all():
        problems.append(Problem(name, f"affine has NaN or Inf entries: {volume.affine.tolist()}"))
    elif not (_plausible(spacing) and _plausible(np.asarray(volume.pixdim))):
        problems.append(
            Problem(name, f"implausible voxel spacing: affine {np.round(spacing, 4).tolist()} mm, header pixdim "
                          f"{np.round(volume.pixdim, 4).tolist()} mm; expected each in (0, {MAX_SPACING_MM:g}]")
        )
    return problems


def _plausible(spacing: np.ndarray) -> bool:
    return bool(((spacing > 0) & (spacing <= MAX_SPACING_MM)).all())


def _check_pair(image: _Volume, label: _Volume, declared: set[int]) -> list[Problem]:
    """Label grid against its image, and label values against the declared ids."""
    problems = []
    name = str(label.path)
    if image.array.shape[:3] != label.array.shape[:3]:
        problems.append(Problem(
            name, f"shape {label.array.shape[:3]} differs from its image {image.path.name} {image.array.shape[:3]}"
        ))
    difference = float(np.abs(image.affine - label.affine).max())
    # A non-finite affine gives NaN here, which compares False: it is reported once, per volume.
    if difference > AFFINE_TOLERANCE_MM:
        problems.append(
            Problem(name, f"affine differs from its image {image.path.name} by up to {difference:.4g} mm "
                          f"(tolerance {AFFINE_TOLERANCE_MM:g} mm)")
        )
    if np.isfinite(label.array).all():
        values = np.unique(label.array)
        non_integer = values[values != np.round(values)]
        undeclared = sorted(set(np.round(values).astype(np.int64).tolist()) - declared)
        if non_integer.size:
            problems.append(Problem(name, f"non-integer label values {non_integer[:5].tolist()}"))
        if undeclared:
            problems.append(
                Problem(name, f"label values {undeclared} are not declared in {DATASET_JSON} labels {sorted(declared)}")
            )
    return problems


def _parse_dataset_json(json_path: Path) -> tuple[dict | None, list[Problem]]:
    """Load dataset.json and validate its MSD fields; returns (description or None, problems)."""
    where = str(json_path)
    if not json_path.is_file():
        return None, [Problem(where, "missing; an MSD dataset needs dataset.json (labels, modality, training, ...)")]
    try:
        description = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, [Problem(where, f"not valid JSON: {exc}")]
    if not isinstance(description, dict):
        return None, [Problem(where, f"expected a JSON object, got {type(description).__name__}")]
    missing = [field for field in REQUIRED_FIELDS if field not in description]
    if missing:
        return None, [Problem(where, f"missing required fields {missing} (MSD needs {list(REQUIRED_FIELDS)})")]

    problems = []
    labels, modality, training = description["labels"], description["modality"], description["training"]
    if not isinstance(labels, dict) or not all(str(key).isdigit() for key in labels) or "0" not in labels:
        problems.append(Problem(where, f'"labels" must map id strings to names, "0" = background; got {labels!r}'))
    if not isinstance(modality, dict) or sorted(modality) != [str(i) for i in range(len(modality))] or not modality:
        problems.append(Problem(where, f'"modality" must map "0".."N-1" to names, got {modality!r}'))
    if not isinstance(training, list) or not all(
        isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("label"), str)
        for item in training
    ):
        problems.append(Problem(where, '"training" must be a list of {"image": path, "label": path}'))
    elif description["numTraining"] != len(training):
        problems.append(
            Problem(where, f'"numTraining" is {description["numTraining"]!r} but "training" lists {len(training)}')
        )
    test = description.get("test", [])
    if not isinstance(test, list) or not all(_test_image_path(item) for item in test):
        problems.append(Problem(where, '"test" must be a list of image paths (or of {"image": path})'))
    elif "numTest" in description and description["numTest"] != len(test):
        problems.append(Problem(where, f'"numTest" is {description["numTest"]!r} but "test" lists {len(test)}'))
    return (None if problems else description), problems


def _test_image_path(item: object) -> str | None:
    """MSD lists test images as bare paths; MONAI's datalists also write ``{"image": path}``."""
    path = item.get("image") if isinstance(item, dict) else item
    return path if isinstance(path, str) else None


def _check_msd(root: Path) -> list[Problem]:
    description, problems = _parse_dataset_json(root / DATASET_JSON)
    if description is None:
        return problems
    declared = {int(key) for key in description["labels"]}
    channels = len(description["modality"])
    for item in description["training"]:
        image = _read_volume(root / item["image"], problems)
        label = _read_volume(root / item["label"], problems)
        for volume, volume_channels in ((image, channels), (label, 1)):
            if volume is not None:
                problems += _check_volume(volume, volume_channels)
        if image is None or label is None:
            continue
        # A pair whose arrays are not volumes has already been reported; comparing grids would
        # only restate it.
        if _has_volume_shape(image, channels) and _has_volume_shape(label, 1):
            problems += _check_pair(image, label, declared)
    for item in description.get("test", []):
        image = _read_volume(root / _test_image_path(item), problems)
        if image is not None:
            problems += _check_volume(image, channels)
    return problems


def _check_folder(root: Path) -> list[Problem]:
    files = find_nifti_files(root)
    if not files:
        return [Problem(str(root), "no .nii or .nii.gz files (and no dataset.json for an MSD dataset)")]
    problems: list[Problem] = []
    for path in files:
        volume = _read_volume(path, problems)
        if volume is not None:
            problems += _check_volume(volume, channels=1)
    return problems


def check(root: str | Path) -> list[Problem]:
    """Validate an MSD dataset or a plain folder of NIfTI CTs (the module docstring has the rules).

    Args:
        root: dataset root directory.

    Returns:
        One Problem per defect, each naming the offending file (or dataset.json); empty if valid.
    """
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "dataset root is not a directory")]
    return _check_msd(root) if is_msd_root(root) else _check_folder(root)


def require_valid(root: str | Path) -> None:
    """Raise if :func:`check` finds any problem; training calls this before reading data.

    Raises:
        ValueError: one line per problem, ``"<file>: <what is wrong>"``.
    """
    problems = check(root)
    if problems:
        raise ValueError(f"dataset {root} failed {len(problems)} check(s):\n" + "\n".join(map(str, problems)))
