"""MSD and plain-folder readers return MONAI data lists with absolute paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import pytest

from accord_medssl.data import decathlon_items, find_nifti_files, nifti_folder_items


def test_decathlon_training_and_test_items(msd_root: Path, phantom_spec) -> None:
    training = decathlon_items(msd_root)
    assert len(training) == phantom_spec.num_train
    assert all(set(item) == {"image", "label"} for item in training)
    assert training[0]["image"] == str(msd_root / "imagesTr" / "phantom_000.nii.gz")
    assert training[0]["label"] == str(msd_root / "labelsTr" / "phantom_000.nii.gz")
    test = decathlon_items(msd_root, "test")
    assert test == [{"image": str(msd_root / "imagesTs" / f"phantom_{phantom_spec.num_train:03d}.nii.gz")}]


def test_decathlon_items_needs_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        decathlon_items(tmp_path)


def test_nifti_folder_is_recursive_and_skips_hidden_files(msd_root: Path, tmp_path: Path) -> None:
    source = msd_root / "imagesTr" / "phantom_000.nii.gz"
    (tmp_path / "case_1").mkdir()
    shutil.copy(source, tmp_path / "case_1" / "ct.nii.gz")
    nib.save(nib.load(source), tmp_path / "b.nii")  # uncompressed NIfTI
    (tmp_path / "._b.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork, as in MSD tarballs
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_nifti_files(tmp_path) == [tmp_path / "b.nii", tmp_path / "case_1" / "ct.nii.gz"]
    assert nifti_folder_items(tmp_path) == [{"image": str(tmp_path / "b.nii")},
                                            {"image": str(tmp_path / "case_1" / "ct.nii.gz")}]


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no .nii"):
        nifti_folder_items(tmp_path)
