"""Precomputed embedding files: .npy and NIfTI, shape validation naming the file."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from accord_medssl.anatomy import file_embedder, load_anatomy_embedding, load_embedding_volume

VOLUME_SHAPE = (20, 17, 16)


def write_maps(directory: Path, key: str, local_grid: tuple[int, int, int] = (10, 9, 8)) -> None:
    rng = np.random.default_rng(0)
    np.save(directory / f"{key}_global.npy", rng.standard_normal((4, 3, 3, 2)).astype(np.float16))
    np.save(directory / f"{key}_local.npy", rng.standard_normal((6, *local_grid)).astype(np.float32))


def test_npy_and_nifti_round_trip(tmp_path: Path) -> None:
    array = np.random.default_rng(1).standard_normal((3, 5, 4, 2)).astype(np.float32)
    np.save(tmp_path / "map.npy", array)
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), tmp_path / "map.nii.gz")
    for name in ("map.npy", "map.nii.gz"):
        loaded = load_embedding_volume(tmp_path / name, channels=3, grid_shape=(5, 4, 2))
        assert loaded.dtype == torch.float32
        np.testing.assert_allclose(loaded.numpy(), array)


def test_mismatches_name_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros((5, 4, 2), dtype=np.float32))
    np.save(tmp_path / "map.npy", np.zeros((3, 5, 4, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="flat.npy.*4-D"):
        load_embedding_volume(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match="map.npy.*channels"):
        load_embedding_volume(tmp_path / "map.npy", channels=8)
    with pytest.raises(ValueError, match=r"map.npy.*\(5, 4, 3\)"):
        load_embedding_volume(tmp_path / "map.npy", grid_shape=(5, 4, 3))
    with pytest.raises(ValueError, match="map.pt"):
        load_embedding_volume(tmp_path / "map.pt")


def test_file_embedder_checks_grids_against_the_volume(tmp_path: Path) -> None:
    write_maps(tmp_path, "case_1")
    write_maps(tmp_path, "case_2", local_grid=(10, 9, 9))
    embed = file_embedder(tmp_path, global_stride=8, local_stride=2)
    embedding = embed("case_1", torch.zeros(1, *VOLUME_SHAPE))
    assert embedding.local_map.shape == (6, 10, 9, 8) and embedding.global_map.dtype == torch.float32
    with pytest.raises(ValueError, match="case_2_local.npy"):
        embed("case_2", torch.zeros(1, *VOLUME_SHAPE))
    with pytest.raises(ValueError, match="case_1_global.npy"):
        load_anatomy_embedding(tmp_path / "case_1_global.npy", tmp_path / "case_1_local.npy", VOLUME_SHAPE, 4, 2)
