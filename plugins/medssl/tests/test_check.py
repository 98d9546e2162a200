"""check(): one Problem per defect, naming the file; require_valid() raises with every line."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from accord_medssl.data import check, require_valid, synth

CASE = "phantom_000.nii.gz"
TEST_IMAGE = "phantom_002.nii.gz"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A fresh, valid, very small MSD dataset this test may damage (2 training cases, 1 test)."""
    return synth(tmp_path / "msd", num_train=2, num_test=1, shape=(16, 16, 12))


def _resave(path: Path, array: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    """Rewrite a NIfTI with a replaced voxel array and/or affine."""
    image = nib.load(path)
    nib.save(nib.Nifti1Image(image.get_fdata() if array is None else array,
                             image.affine if affine is None else affine), path)


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _edit_json(root: Path, edit: Callable[[dict], None]) -> None:
    description = json.loads((root / "dataset.json").read_text())
    edit(description)
    (root / "dataset.json").write_text(json.dumps(description))


def _rewrite(folder: str, edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """A damage that rewrites ``folder/CASE`` with ``edit`` applied to its voxels."""

    def damage(root: Path) -> None:
        path = root / folder / CASE
        _resave(path, edit(_voxels(path)))

    return damage


def _set_corner(value: float, dtype: type = np.float32) -> Callable[[np.ndarray], np.ndarray]:
    def edit(array: np.ndarray) -> np.ndarray:
        array = array.astype(dtype)  # a writable copy
        array[0, 0, 0] = value
        return array

    return edit


_nan_voxel = _rewrite("imagesTr", _set_corner(np.nan))
_undeclared_label = _rewrite("labelsTr", _set_corner(9, np.uint8))


def _shifted_label(root: Path) -> None:
    path = root / "labelsTr" / CASE
    affine = nib.load(path).affine.copy()
    affine[:3, 3] += 2.0
    _resave(path, affine=affine)


def _truncated_gzip(root: Path) -> None:
    path = root / "imagesTr" / CASE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _gzip_crc_mismatch(root: Path) -> None:
    """Flip one voxel byte of a stored (uncompressed) deflate stream: nibabel decodes the wrong voxel
    without complaint, only the gzip CRC-32 at the end of the file tells."""
    path = root / "imagesTr" / CASE
    raw = gzip.decompress(path.read_bytes())
    data = bytearray(gzip.compress(raw, compresslevel=0))
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert np.asanyarray(nib.load(path).dataobj).shape == (16, 16, 12)  # nibabel alone accepts it


def _gzip_without_trailer(root: Path) -> None:
    """Drop the 8-byte CRC-32 and length trailer, as an interrupted copy does."""
    path = root / "imagesTr" / CASE
    path.write_bytes(path.read_bytes()[:-8])
    assert np.asanyarray(nib.load(path).dataobj).shape == (16, 16, 12)  # nibabel alone accepts it


def _thick_slices(root: Path) -> None:
    _resave(root / "imagesTs" / TEST_IMAGE, affine=np.diag([-1.5, -1.5, 50.0, 1.0]))


def _zero_pixdim(root: Path) -> None:
    """A header with no orientation and a zero slice thickness (nibabel would read it as 1 mm)."""
    path = root / "imagesTs" / TEST_IMAGE
    image = nib.Nifti1Image(_voxels(path), None)
    image.header.set_zooms((1.5, 1.5, 0.0))
    nib.save(image, path)


def _with_sform(affine: np.ndarray) -> Callable[[Path], None]:
    """A damage that gives the test image an sform-only header with ``affine``."""

    def damage(root: Path) -> None:
        path = root / "imagesTs" / TEST_IMAGE
        image = nib.Nifti1Image(_voxels(path), None)
        image.set_sform(affine, code=1)
        nib.save(image, path)

    return damage


_NAN_ORIGIN = np.diag([-1.5, -1.5, 2.0, 1.0])
_NAN_ORIGIN[0, 3] = np.nan


# (defect, damage, file the problem names, message pattern)
DEFECTS = [
    ("missing dataset.json", lambda r: (r / "dataset.json").unlink(), "dataset.json", "missing"),
    ("unparsable dataset.json", lambda r: (r / "dataset.json").write_text("{labels: 1,"), "dataset.json",
     "not valid JSON"),
    ("dataset.json is a list", lambda r: (r / "dataset.json").write_text("[]"), "dataset.json",
     "expected a JSON object"),
    ("missing fields", lambda r: _edit_json(r, lambda d: (d.pop("labels"), d.pop("numTraining"))),
     "dataset.json", r"missing required fields \['labels', 'numTraining'\]"),
    ("numTraining mismatch", lambda r: _edit_json(r, lambda d: d.update(numTraining=5)), "dataset.json", "numTraining"),
    ("training entry without label", lambda r: _edit_json(r, lambda d: d["training"][1].pop("label")),
     "dataset.json", '"training" must be a list'),
    ("no background label", lambda r: _edit_json(r, lambda d: d["labels"].pop("0")), "dataset.json",
     '"0" = background'),
    ("bad modality", lambda r: _edit_json(r, lambda d: d.update(modality=["CT"])), "dataset.json", '"modality"'),
    ("missing image", lambda r: (r / "imagesTr" / "phantom_001.nii.gz").unlink(), "phantom_001.nii.gz", "^missing$"),
    ("missing test image", lambda r: (r / "imagesTs" / TEST_IMAGE).unlink(), TEST_IMAGE, "^missing$"),
    ("garbage file", lambda r: (r / "labelsTr" / CASE).write_bytes(b"not a nifti"), CASE, "unreadable NIfTI"),
    ("truncated gzip", _truncated_gzip, CASE, "unreadable NIfTI"),
    ("gzip CRC mismatch", _gzip_crc_mismatch, CASE,
     r"^unreadable NIfTI: corrupt or truncated gzip data \(BadGzipFile: CRC check failed"),
    ("gzip without trailer", _gzip_without_trailer, CASE,
     r"^unreadable NIfTI: corrupt or truncated gzip data \(EOFError: Compressed file ended"),
    ("label shape mismatch", _rewrite("labelsTr", lambda label: label[:, :, :-1]), CASE,
     r"shape \(16, 16, 11\) differs from its image"),
    ("label affine mismatch", _shifted_label, CASE, "affine differs from its image .* by up to 2 mm"),
    ("undeclared label", _undeclared_label, CASE, r"label values \[9\] are not declared"),
    ("NaN voxel", _nan_voxel, CASE, "1 NaN and 0 Inf voxels"),
    ("Inf voxel", _rewrite("imagesTr", _set_corner(np.inf)), CASE, "0 NaN and 1 Inf voxels"),
    ("2D image", _rewrite("imagesTr", lambda hu: hu[:, :, 0]), CASE,
     r"expected a 3D volume .* got a 2D array of shape \(16, 16\)"),
    ("4D image with two channels", _rewrite("imagesTr", lambda hu: np.stack([hu, hu], -1)), CASE,
     r"got a 4D array of shape \(16, 16, 12, 2\)"),
    ("5D image", _rewrite("imagesTr", lambda hu: hu[..., None, None]), CASE, "got a 5D array"),
    ("50 mm slices", _thick_slices, TEST_IMAGE, r"implausible voxel spacing: affine \[1.5, 1.5, 50.0\] mm"),
    ("zero header pixdim", _zero_pixdim, TEST_IMAGE, r"header pixdim \[1.5, 1.5, 0.0\] mm"),
    ("singular affine", _with_sform(np.diag([-1.5, -1.5, 0.0, 1.0])), TEST_IMAGE, r"affine \[1.5, 1.5, 0.0\] mm"),
    ("NaN in affine", _with_sform(_NAN_ORIGIN), TEST_IMAGE, "affine has NaN or Inf entries"),
]


@pytest.mark.parametrize(("damage", "file_name", "pattern"), [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_each_defect_is_one_problem_naming_the_file(dataset: Path, damage, file_name: str, pattern: str) -> None:
    assert check(dataset) == []
    damage(dataset)
    problems = check(dataset)
    assert len(problems) == 1, problems
    assert Path(problems[0].path).name == file_name
    assert re.search(pattern, problems[0].message), problems[0].message


def test_singleton_fourth_dimension_counts_as_3d(dataset: Path) -> None:
    path = dataset / "imagesTr" / CASE
    _resave(path, _voxels(path)[..., None])
    assert nib.load(path).shape == (16, 16, 12, 1)
    assert check(dataset) == []


def test_multimodal_images_are_4d_with_one_channel_per_modality(dataset: Path) -> None:
    _edit_json(dataset, lambda d: d.update(modality={"0": "T1", "1": "T2"}, tensorImageSize="4D"))
    for path in [dataset / "imagesTr" / f"phantom_00{i}.nii.gz" for i in (0, 1)] + [dataset / "imagesTs" / TEST_IMAGE]:
        _resave(path, np.stack([_voxels(path)] * 2, -1))
    assert check(dataset) == []


def test_several_defects_are_all_reported(dataset: Path) -> None:
    (dataset / "imagesTr" / "phantom_001.nii.gz").unlink()
    _nan_voxel(dataset)
    _undeclared_label(dataset)
    assert len(check(dataset)) == 3


def test_msd_folders_without_dataset_json_are_not_checked_as_a_plain_folder(dataset: Path) -> None:
    (dataset / "dataset.json").unlink()
    assert [Path(p.path).name for p in check(dataset)] == ["dataset.json"]


def test_plain_folder_mode(dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "unlabeled"
    shutil.copytree(dataset / "imagesTr", folder / "batch_1")
    assert check(folder) == []
    with gzip.open(folder / "batch_1" / CASE, "wb") as broken:
        broken.write(b"\x00" * 10)
    _resave(folder / "batch_1" / "phantom_001.nii.gz", np.full((4, 4, 4), np.nan, dtype=np.float32))
    problems = check(folder)
    assert [(Path(p.path).name, p.message.split(" ")[0]) for p in problems] == [
        (CASE, "unreadable"),
        ("phantom_001.nii.gz", "64"),  # 64 NaN voxels
    ]


def test_empty_or_missing_roots(tmp_path: Path) -> None:
    assert "no .nii" in check(tmp_path)[0].message
    assert check(tmp_path / "absent")[0].message == "dataset root is not a directory"


def test_require_valid_raises_with_every_problem(dataset: Path) -> None:
    require_valid(dataset)
    (dataset / "imagesTr" / "phantom_001.nii.gz").unlink()
    _undeclared_label(dataset)
    with pytest.raises(ValueError, match="failed 2 check") as error:
        require_valid(dataset)
    lines = str(error.value).splitlines()[1:]
    assert len(lines) == 2 and all(str(dataset) in line for line in lines)
