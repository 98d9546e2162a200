"""Synthesized phantoms: valid MSD layout, real-CT conventions, anatomy that corresponds across cases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from accord_medssl.data import LABELS, check, render_phantom
from accord_medssl.data.phantom import AXCODES


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _interior(label: np.ndarray, organ: int) -> np.ndarray:
    """Voxels of ``organ`` whose six face neighbours are the same organ (no partial volume)."""
    inside = label == organ
    for axis in range(3):
        for shift in (1, -1):
            inside &= np.roll(label, shift, axis) == organ
    return inside


def _training_cases(root: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(hu, label, affine) of every training case."""
    description = json.loads((root / "dataset.json").read_text())
    cases = []
    for item in description["training"]:
        hu, affine = _load(root / item["image"])
        label, _ = _load(root / item["label"])
        cases.append((hu, label, affine))
    return cases


def test_synth_writes_a_dataset_that_check_accepts(msd_root: Path, phantom_spec) -> None:
    assert check(msd_root) == []
    description = json.loads((msd_root / "dataset.json").read_text())
    assert description["labels"] == {str(k): v for k, v in LABELS.items()}
    assert description["modality"] == {"0": "CT"}
    assert description["numTraining"] == len(description["training"]) == phantom_spec.num_train
    assert description["numTest"] == len(description["test"]) == phantom_spec.num_test
    assert all(item["image"].startswith("./imagesTr/") and item["label"].startswith("./labelsTr/")
               for item in description["training"])
    assert all(path.startswith("./imagesTs/") for path in description["test"])


def test_volumes_follow_ct_conventions(msd_root: Path, phantom_spec) -> None:
    for hu, label, affine in _training_cases(msd_root):
        assert hu.dtype == np.int16 and label.dtype == np.uint8
        assert hu.shape == label.shape == phantom_spec.shape
        assert nib.aff2axcodes(affine) == AXCODES
        assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), phantom_spec.spacing)
        assert set(np.unique(label)) == set(LABELS)
        # Air fills the corners; organs sit at their nominal attenuation (noise averages out).
        assert np.median(hu[label == 0][:50]) < -950
        assert abs(np.median(hu[_interior(label, 1)]) - 60) < 8
        assert abs(np.median(hu[_interior(label, 2)]) - 50) < 8
        assert np.median(hu[_interior(label, 5)]) > 250
        header = nib.load(msd_root / "imagesTr" / "phantom_000.nii.gz").header
        assert header["qform_code"] == header["sform_code"] == 1


def test_noise_is_ct_like(msd_root: Path) -> None:
    hu, label, _ = _training_cases(msd_root)[0]
    # Inside the liver the only variation is noise (blurred a little by the point-spread function).
    assert 7 < hu[_interior(label, 1)].std() < 25


def test_same_organ_in_every_case_with_varying_position_and_size(msd_root: Path, phantom_spec) -> None:
    cases = _training_cases(msd_root)
    for organ in set(LABELS) - {0}:
        centroids, volumes = [], []
        for _, label, affine in cases:
            voxels = np.argwhere(label == organ)
            assert len(voxels) > 20, f"{LABELS[organ]} is missing or tiny"
            centroids.append(nib.affines.apply_affine(affine, voxels.mean(0)))
            volumes.append(len(voxels) * np.prod(phantom_spec.spacing))
        centroids, volumes = np.array(centroids), np.array(volumes)
        assert np.linalg.norm(centroids.std(0)) > 0.3, f"{LABELS[organ]} never moves"
        assert volumes.std() / volumes.mean() > 0.02, f"{LABELS[organ]} never changes size"
        # ...but it stays the same organ: centroids within a few cm of each other.
        assert np.linalg.norm(centroids.std(0)) < 15


def test_anatomy_is_on_the_correct_side(msd_root: Path) -> None:
    # World coordinates are RAS: +x is the patient's right.
    for _, label, affine in _training_cases(msd_root):
        centroids = {organ: np.argwhere(label == organ).mean(0) for organ in (1, 2, 3, 4)}
        world_x = {organ: nib.affines.apply_affine(affine, voxel)[0] for organ, voxel in centroids.items()}
        assert world_x[1] > 0 and world_x[3] > 0  # liver, right kidney
        assert world_x[2] < 0 and world_x[4] < 0  # spleen, left kidney


def test_render_is_a_function_of_the_seed() -> None:
    first = render_phantom((24, 24, 16), rng=np.random.default_rng(5))
    again = render_phantom((24, 24, 16), rng=np.random.default_rng(5))
    other = render_phantom((24, 24, 16), rng=np.random.default_rng(6))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], other[1])
