"""On-disk layouts: the Medical Segmentation Decathlon (MSD) and a plain folder of NIfTI volumes.

MSD layout (http://medicaldecathlon.com)::

    ROOT/dataset.json        # labels, modality, training [{image, label}], test [image], numTraining, ...
    ROOT/imagesTr/<case>.nii.gz
    ROOT/labelsTr/<case>.nii.gz
    ROOT/imagesTs/<case>.nii.gz

Plain folder layout (unlabeled pretraining data, e.g. FLARE22's unlabeled CTs or AbdomenAtlas's
``<case>/ct.nii.gz``): every ``*.nii`` / ``*.nii.gz`` under ROOT, searched recursively.

Both readers return MONAI-style data lists: ``[{"image": path}]`` or ``[{"image": path, "label": path}]``
with absolute paths, ready for :func:`accord_medssl.data.pipeline.build_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from monai.data import load_decathlon_datalist

__all__ = ["DATASET_JSON", "MSD_DIRS", "decathlon_items", "nifti_folder_items", "find_nifti_files", "is_msd_root"]

DATASET_JSON = "dataset.json"
#: Sub-directories that mark a folder as an MSD dataset even when its dataset.json is missing.
MSD_DIRS = ("imagesTr", "labelsTr", "imagesTs")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_msd_root(root: str | Path) -> bool:
    """Whether ``root`` looks like an MSD dataset: it has a dataset.json or an MSD sub-directory."""
    root = Path(root)
    return (root / DATASET_JSON).exists() or any((root / name).is_dir() for name in MSD_DIRS)


def decathlon_items(root: str | Path, split: Literal["training", "test"] = "training") -> list[dict[str, str]]:
    """Read one split of an MSD dataset.

    Args:
        root: the dataset root holding ``dataset.json``.
        split: ``"training"`` gives ``{"image", "label"}`` dicts; ``"test"`` gives ``{"image"}`` dicts
            (MSD lists test cases as bare paths).

    Returns:
        The data list with absolute, normalised paths, in dataset.json order.

    Raises:
        FileNotFoundError: ``root/dataset.json`` does not exist.
        ValueError: dataset.json has no ``split`` key (MONAI's message names the key).
    """
    json_path = Path(root) / DATASET_JSON
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: missing; an MSD dataset needs ROOT/{DATASET_JSON}")
    # MONAI resolves "./imagesTr/x.nii.gz" against base_dir and wraps bare test paths as {"image": ...}.
    items = load_decathlon_datalist(json_path, is_segmentation=True, data_list_key=split, base_dir=json_path.parent)
    return [{key: str(Path(value).absolute()) for key, value in item.items()} for item in items]


def find_nifti_files(root: str | Path) -> list[Path]:
    """Every NIfTI file under ``root`` (recursive, sorted), skipping hidden files.

    Hidden files are skipped because archives made on macOS (including the MSD tarballs) carry
    ``._<name>.nii.gz`` resource-fork files that are not NIfTI.
    """
    root = Path(root)
    return sorted(
        path
        for path in root.rglob("*.nii*")
        if path.name.endswith(NIFTI_SUFFIXES)
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def nifti_folder_items(root: str | Path) -> list[dict[str, str]]:
    """A plain folder of NIfTI volumes as an unlabeled data list ``[{"image": path}]``.

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no NIfTI file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    files = find_nifti_files(root)
    if not files:
        raise FileNotFoundError(f"{root}: no .nii or .nii.gz files found (searched recursively)")
    return [{"image": str(path.absolute())} for path in files]
