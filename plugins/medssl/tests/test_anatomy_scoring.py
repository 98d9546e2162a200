"""Matching scores: the reference's upsampled-global scoring on hand-built embeddings, the nearest
option, and identical mining results whether embeddings are in memory or in the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from accord_medssl.anatomy import (
    AnatomicalViewMiner,
    AnatomyEmbedding,
    AnatomySearchIndex,
    cell_to_voxel,
    embedding_grid_shape,
    file_embedder,
    similarity_map,
    store_embedder,
    voxel_to_cell,
)
from accord_medssl.views import MiningOptions, build_miner


def two_cell_embedding() -> AnatomyEmbedding:
    """Volume 8 x 2 x 2: global cells (stride 4) e1 then e2 along axis 0; every local cell (stride 2) e1."""
    global_map = torch.zeros(2, 2, 1, 1)
    global_map[0, 0] = 1.0
    global_map[1, 1] = 1.0
    local_map = torch.zeros(2, 4, 1, 1)
    local_map[0] = 1.0
    return AnatomyEmbedding(global_map=global_map, local_map=local_map, global_stride=(4, 2, 2),
                            local_stride=(2, 2, 2), volume_shape=(8, 2, 2))


def test_reference_scoring_by_hand() -> None:
    index = AnatomySearchIndex.from_embedding(two_cell_embedding())
    point = torch.tensor([[0, 0, 0]])
    # Trilinear upsampling of 2 -> 4 cells (align_corners=False) samples the global grid at
    # 0 (clamped), 0.25, 0.75, 1 (clamped): e1, (3 e1 + e2) / 4, (e1 + 3 e2) / 4, e2; re-normalised,
    # their cosine with the query's e1 is 1, 3 / sqrt(10), 1 / sqrt(10), 0. The local part is 1.
    expected = 0.5 * (1 + torch.tensor([1.0, 3 / 10**0.5, 1 / 10**0.5, 0.0]))
    torch.testing.assert_close(similarity_map(point, index, index)[0], expected, atol=1e-3, rtol=0)
    # Nearest: local cells 0, 1 (centre voxels 1, 3) lie in global cell 0, cells 2, 3 in cell 1.
    nearest = similarity_map(point, index, index, scoring="nearest")[0]
    torch.testing.assert_close(nearest, torch.tensor([1.0, 1.0, 0.5, 0.5]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="scoring"):
        similarity_map(point, index, index, scoring="bilinear")


def reference_find_point(query: AnatomyEmbedding, key: AnatomyEmbedding, point: torch.Tensor, stride: int):
    """The reference's ``find_point_in_vol`` (interfaces.py) on plain tensors: upsample each coarse
    map to its fine grid, re-normalise, take the query's vectors at its fine cell, 1x1x1 conv. SAM's
    maps are unit vectors, so the maps are normalised first."""

    def upsampled(embedding: AnatomyEmbedding) -> torch.Tensor:
        coarse = F.interpolate(F.normalize(embedding.global_map[None], dim=1), embedding.local_map.shape[1:],
                               mode="trilinear", align_corners=False)
        return F.normalize(coarse, dim=1)

    fine_query = F.normalize(query.local_map[None], dim=1)
    cell = tuple((point // stride).tolist())
    coarse_vector = upsampled(query)[0][(slice(None), *cell)]
    fine_vector = fine_query[0][(slice(None), *cell)]
    similarity = (F.conv3d(F.normalize(key.local_map[None], dim=1), fine_vector[None, :, None, None, None])
                  + F.conv3d(upsampled(key), coarse_vector[None, :, None, None, None]))[0, 0] / 2
    return similarity.flatten()


def random_embedding(seed: int, shape=(20, 18, 12)) -> AnatomyEmbedding:
    generator = torch.Generator().manual_seed(seed)

    def maps(channels: int, grid: tuple[int, int, int]) -> torch.Tensor:
        # A shared offset keeps cosines spread around 0.5 instead of 0.
        return torch.randn(channels, *grid, generator=generator) + 1.0

    return AnatomyEmbedding(global_map=maps(8, embedding_grid_shape(shape, 8)),
                            local_map=maps(6, embedding_grid_shape(shape, 2)), global_stride=(8, 8, 8),
                            local_stride=(2, 2, 2), volume_shape=shape)


def test_reference_scoring_matches_the_reference_formulation() -> None:
    query, key = random_embedding(0), random_embedding(1)
    points = torch.tensor([[0, 0, 0], [7, 9, 5], [19, 17, 11], [12, 3, 8]])
    scores = similarity_map(points, AnatomySearchIndex.from_embedding(query), AnatomySearchIndex.from_embedding(key))
    for point, row in zip(points, scores):
        # float16 storage of unit vectors: about 1e-3.
        torch.testing.assert_close(row, reference_find_point(query, key, point, 2), atol=3e-3, rtol=0)


def write_npy_maps(directory: Path, embeddings: dict[str, AnatomyEmbedding]) -> None:
    for key, embedding in embeddings.items():
        np.save(directory / f"{key}_global.npy", embedding.global_map.numpy())
        np.save(directory / f"{key}_local.npy", embedding.local_map.numpy())


@pytest.mark.parametrize("scoring", ["reference", "nearest"])
def test_mining_is_identical_in_memory_and_from_the_store(tmp_path: Path, scoring: str) -> None:
    embeddings = {"a": random_embedding(2), "b": random_embedding(3)}
    write_npy_maps(tmp_path, embeddings)
    volumes = [torch.rand(1, 20, 18, 12, generator=torch.Generator().manual_seed(seed)) for seed in (4, 5)]
    npy = file_embedder(tmp_path, global_stride=8, local_stride=2)
    results = []
    for embedder in (npy, store_embedder(tmp_path / "store", fallback=npy), store_embedder(tmp_path / "store")):
        miner = AnatomicalViewMiner(embedder, crop_size=(8, 8, 8), similarity_threshold=0.99, max_attempts=12,
                                    candidates_per_round=5, scoring=scoring)
        results.append(miner.mine(volumes, volumes[::-1], ["a", "b"], ["b", "a"],
                                  generator=torch.Generator().manual_seed(6)).as_batch())
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), name


def test_mining_options_build_a_store_backed_miner(tmp_path: Path) -> None:
    write_npy_maps(tmp_path, {"a": random_embedding(2)})
    miner = build_miner(MiningOptions(embeddings=tmp_path, store=tmp_path / "store", scoring="nearest"), (8, 8, 8))
    volume = torch.rand(1, 20, 18, 12)
    mined = miner.mine([volume], [volume], ["a"], ["a"])
    assert (tmp_path / "store" / "a.anat").is_file() and miner.scoring == "nearest"
    stored = build_miner(MiningOptions(embeddings=tmp_path / "store", embedding_suffix=".anat"), (8, 8, 8))
    assert stored.mine([volume], [volume], ["a"], ["a"]).scores.shape == mined.scores.shape


def test_block_search_equals_the_exhaustive_argmax() -> None:
    from accord_medssl.anatomy.miner import best_matches, search

    # Local grid 30 x 25 x 20: 4 x 4 x 3 blocks of 8^3 cells, the last ones padded.
    shape = (60, 50, 40)
    source, target = (AnatomySearchIndex.from_embedding(random_embedding(seed, shape)) for seed in (7, 8))
    generator = torch.Generator().manual_seed(9)
    points = torch.stack([torch.randint(0, size, (12,), generator=generator) for size in shape], dim=1)
    for scoring in ("reference", "nearest"):
        matched, best = best_matches(similarity_map(points, source, target, scoring), target)
        result = search(points, source, target, scoring)
        assert torch.equal(result.matched, matched), scoring
        torch.testing.assert_close(result.scores, best)
        assert result.blocks_total == 12 * 48 and 12 <= result.blocks_read <= result.blocks_total
    # Ties (a constant embedding): the lowest cell wins, as the exhaustive argmax.
    flat = AnatomyEmbedding(global_map=torch.ones(4, 8, 7, 5), local_map=torch.ones(3, 30, 25, 20),
                            global_stride=(8, 8, 8), local_stride=(2, 2, 2), volume_shape=shape)
    index = AnatomySearchIndex.from_embedding(flat)
    result = search(points[:2], index, index)
    assert result.matched.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert torch.equal(result.matched, best_matches(similarity_map(points[:2], index, index), index)[0])


def test_block_search_reads_few_blocks_of_a_distinctive_embedding(tmp_path: Path) -> None:
    from accord_medssl.anatomy.miner import search

    # Zero-mean random vectors: every cell unlike the others, as a trained embedding far from the
    # query's anatomy. Matching a volume into itself finds each point's own cell (score 1) after
    # reading the blocks near it only; from the memory-mapped store the same.
    shape = (64, 64, 48)
    generator = torch.Generator().manual_seed(10)
    embedding = AnatomyEmbedding(global_map=torch.randn(32, 8, 8, 6, generator=generator),
                                 local_map=torch.randn(32, 32, 32, 24, generator=generator),
                                 global_stride=(8, 8, 8), local_stride=(2, 2, 2), volume_shape=shape)
    index = AnatomySearchIndex.from_embedding(embedding)
    stored = AnatomySearchIndex.open(index.save(tmp_path / "volume.anat"))
    points = torch.tensor([[0, 0, 0], [33, 20, 17], [63, 63, 47], [10, 50, 30]])
    for target in (index, stored):
        result = search(points, index, target)
        assert torch.equal(result.matched, cell_to_voxel(voxel_to_cell(points, 2, shape), 2, shape))
        torch.testing.assert_close(result.scores, torch.ones(4), atol=2e-3, rtol=0)
        assert result.blocks_read <= result.blocks_total // 4, (result.blocks_read, result.blocks_total)
