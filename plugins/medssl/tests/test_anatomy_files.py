"""Precomputed embedding files: .npy and NIfTI, shape validation naming the file; the embedding store."""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from accord_medssl.anatomy import (
    AnatomySearchIndex,
    file_embedder,
    load_anatomy_embedding,
    load_embedding_volume,
    read_embedding_store,
    store_embedder,
)
from accord_medssl.anatomy.embedding import STORE_SUFFIX, STORE_VERSION

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


# --- the embedding store ------------------------------------------------------------------------


def stored_index(tmp_path: Path) -> tuple[AnatomySearchIndex, Path]:
    write_maps(tmp_path, "case_1")
    embedding = file_embedder(tmp_path, global_stride=8, local_stride=2)("case_1", torch.zeros(1, *VOLUME_SHAPE))
    index = AnatomySearchIndex.from_embedding(embedding)
    return index, index.save(tmp_path / "store" / f"case_1{STORE_SUFFIX}")


def test_store_round_trip_is_memory_mapped_and_exact(tmp_path: Path) -> None:
    index, path = stored_index(tmp_path)
    opened = AnatomySearchIndex.open(path)
    assert (opened.volume_shape, opened.global_stride, opened.local_stride) == (VOLUME_SHAPE, (8, 8, 8), (2, 2, 2))
    for name in ("global_vectors", "local_blocks", "local_block_norms", "upsampled_global_norms"):
        assert torch.equal(getattr(opened, name), getattr(index, name)), name
    # Local grid 10 x 9 x 8 in blocks of 8^3 cells: 2 x 2 x 1 blocks, zero-padded.
    assert opened.local_blocks.dtype == torch.float16 and opened.local_blocks.shape == (4, 512, 6)
    local = opened.local_vectors()
    assert local.shape == (10 * 9 * 8, 6)
    assert int((opened.local_blocks.float().norm(dim=2) > 0).sum()) == 720  # the rest is padding
    _, arrays = read_embedding_store(path)
    assert all(isinstance(array, np.memmap) for array in arrays.values())
    # Pre-normalised: unit rows up to float16 rounding.
    torch.testing.assert_close(local.float().norm(dim=1), torch.ones(720), atol=2e-3, rtol=0)
    torch.testing.assert_close(opened.local_block_norms, torch.ones(4), atol=2e-3, rtol=0)


def test_store_refuses_old_foreign_truncated_and_corrupt_files(tmp_path: Path) -> None:
    _, path = stored_index(tmp_path)
    data = path.read_bytes()
    cases = {
        "old.anat": np.lib.format.magic(1, 0) + data[8:],  # e.g. an .npy renamed
        "version.anat": data[:11] + struct.pack("<I", STORE_VERSION + 1) + data[15:],
        "v1.anat": data[:11] + struct.pack("<I", 1) + data[15:],  # the unblocked layout of earlier accords
        "truncated.anat": data[:-100],
        "header.anat": data[:19] + b"{" * 8 + data[27:],
    }
    messages = {"old.anat": "not an accord anatomy-embedding store", "version.anat": "format version",
                "v1.anat": "format version 1, this accord reads version 2; delete the file",
                "truncated.anat": "truncated", "header.anat": "corrupt"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*{messages[name]}"):
            AnatomySearchIndex.open(tmp_path / name)
    with pytest.raises(ValueError, match="missing.anat.*not found"):
        AnatomySearchIndex.open(tmp_path / "missing.anat")


def test_store_embedder_writes_each_volume_once(tmp_path: Path) -> None:
    write_maps(tmp_path, "case_1")
    calls: list[str] = []
    source = file_embedder(tmp_path, global_stride=8, local_stride=2)

    def counted(key: str, volume: torch.Tensor):
        calls.append(key)
        return source(key, volume)

    volume = torch.zeros(1, *VOLUME_SHAPE)
    for _ in range(2):
        index = store_embedder(tmp_path / "store", fallback=counted)("case_1", volume)
    assert calls == ["case_1"] and (tmp_path / "store" / "case_1.anat").is_file()
    assert isinstance(index, AnatomySearchIndex)
    # The last open_files mappings stay open: the same index again, a new one after eviction.
    write_maps(tmp_path, "case_3")
    embed = store_embedder(tmp_path / "store", fallback=source, open_files=1)
    first = embed("case_1", volume)
    assert embed("case_1", volume) is first
    embed("case_3", volume)
    assert embed("case_1", volume) is not first
    with pytest.raises(ValueError, match="open_files"):
        store_embedder(tmp_path / "store", open_files=0)
    with pytest.raises(ValueError, match="case_2.anat"):
        store_embedder(tmp_path / "store")("case_2", volume)
